"""Batching: turn whatever a user hands a probe into weighted batches.

Every probe reduces over the *whole* dataset with the mean, batches weighted by their
sample count:  L = (1/N) Σ_b n_b · mean_b(ℓ)  =  (1/N) Σ_i ℓ_i.
:class:`BatchSource` is the single place that knows how to iterate a DataLoader, an
``(x, y)`` tuple of tensors or a ``torch.utils.data.Dataset``, optionally restricted to
one shard ``rank`` of ``world_size`` (contiguous, possibly uneven shards).

Data are checked as they stream, on the first complete pass of a source only (later passes cost
nothing): NaN/Inf in floating inputs or targets raise ``ValueError`` naming the tensor (``inputs (x)``
/ ``targets (y)``) and the first bad sample's index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


@dataclass(frozen=True)
class Batch:
    """One batch: inputs ``x``, targets ``y`` and its sample count ``n``."""

    x: torch.Tensor
    y: torch.Tensor
    n: int


def _as_tensor(value: Any, what: str = "batch element") -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what} cannot be converted to a tensor ({type(value).__name__}): {err}") from None


def check_finite(t: torch.Tensor, what: str, offset: int = 0) -> None:
    """Raise ``ValueError`` if floating ``t`` holds NaN/Inf, naming ``what`` and the first bad sample.

    ``offset``: the index of ``t[0]`` in the whole dataset (iteration order for loaders).
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = ~finite
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(t.shape))]
    value = t.reshape(-1)[flat].item()
    raise ValueError(
        f"{what} contain NaN/Inf: first at sample {offset + index[0]} (element {index[1:] or ''} = {value}); "
        f"{int(bad.sum())} non-finite values in a batch of {t.shape[0]}"
    )


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _pair(item: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(f"{where} must yield (x, y) pairs; got {type(item).__name__}")
    return item[0], item[1]


def _shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard [lo, hi) of ``n`` items for ``rank``; sizes differ by at most one."""
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if not rank < world_size:
        raise ValueError(f"invalid shard rank={rank} of world_size={world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class BatchSource:
    """Re-iterable source of :class:`Batch` objects over a dataset (or one shard of it).

    Parameters
    ----------
    data:
        ``(x, y)`` tuple/list of tensors (or arrays), a ``DataLoader`` yielding ``(x, y)``,
        a map-style ``Dataset`` (with ``__len__``) or an ``IterableDataset`` of ``(x, y)`` items.
    batch_size:
        Batch size for tensors and Datasets (``None``: the whole dataset/shard as one batch).
        A DataLoader keeps its own batching.
    rank, world_size:
        Iterate only shard ``rank`` of ``world_size``. For tensors and map-style Datasets
        the shards are contiguous sample ranges (sizes differ by at most one; a shard may
        be empty when there are fewer samples than ranks); for a DataLoader, batches are
        dealt round-robin; for an ``IterableDataset``, samples are dealt round-robin.
    device, dtype:
        Move batches to ``device``; cast floating inputs/targets to ``dtype``.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(data, BatchSource):
            data = data.data
        self.data = data
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        _shard_bounds(world_size, rank, world_size)  # validates rank / world_size
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._verified = False  # set after one complete pass found every batch finite
        if isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise ValueError(f"data tuple must be (x, y); got {len(data)} elements")
            x, y = _as_tensor(data[0], "x"), _as_tensor(data[1], "y")
            if x.ndim == 0 or y.ndim == 0:
                raise ValueError("x and y need a leading sample dimension (got a 0-d tensor)")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
            if x.shape[0] == 0:
                raise ValueError("data is empty (0 samples)")
            self._tensors: tuple[torch.Tensor, torch.Tensor] | None = (x, y)
        elif isinstance(data, DataLoader):
            self._tensors = None
        elif isinstance(data, Dataset):
            self._tensors = None
            if not isinstance(data, IterableDataset):
                try:
                    n = len(data)  # type: ignore[arg-type]
                except TypeError:
                    raise TypeError(
                        f"a map-style Dataset needs __len__ ({type(data).__name__} has none)"
                    ) from None
                if n == 0:
                    raise ValueError("data is empty (0 samples)")
        else:
            raise TypeError(
                "data must be an (x, y) tuple of tensors, a DataLoader or a Dataset; "
                f"got {type(data).__name__}"
            )

    # ------------------------------------------------------------------ helpers
    def _finish(self, x: Any, y: Any, offset: int = 0) -> Batch:
        x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"a batch's x and y disagree on the number of samples: {tuple(x.shape)} vs {tuple(y.shape)}"
            )
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        if self.dtype is not None:
            if x.is_floating_point():
                x = x.to(self.dtype)
            if y.is_floating_point():
                y = y.to(self.dtype)
        if not self._verified:
            check_finite(x, "inputs (x)", offset)
            check_finite(y, "targets (y)", offset)
        return Batch(x, y, int(x.shape[0]))

    def _ranges(self, n: int) -> Iterator[tuple[int, int]]:
        lo, hi = _shard_bounds(n, self.rank, self.world_size)
        step = self.batch_size or max(hi - lo, 1)
        for start in range(lo, hi, step):
            yield start, min(start + step, hi)

    # ------------------------------------------------------------------ API
    def __iter__(self) -> Iterator[Batch]:
        yield from self._batches()
        self._verified = True  # a complete pass: every batch was checked

    def _batches(self) -> Iterator[Batch]:
        if self._tensors is not None:
            x, y = self._tensors
            for lo, hi in self._ranges(x.shape[0]):
                yield self._finish(x[lo:hi], y[lo:hi], lo)
        elif isinstance(self.data, DataLoader):
            seen = 0
            for i, item in enumerate(self.data):
                if i % self.world_size != self.rank:
                    continue
                batch = self._finish(*_pair(item, "a DataLoader for probes"), seen)
                seen += batch.n
                yield batch
        elif isinstance(self.data, IterableDataset):
            items: list[tuple[Any, Any]] = []
            seen = 0
            for i, item in enumerate(self.data):
                if i % self.world_size != self.rank:
                    continue
                items.append(_pair(item, "a Dataset for probes"))
                if self.batch_size is not None and len(items) == self.batch_size:
                    yield self._stack(items, seen)
                    seen += len(items)
                    items = []
            if items:
                yield self._stack(items, seen)
        else:
            ds = self.data
            for lo, hi in self._ranges(len(ds)):
                yield self._stack([_pair(ds[i], "a Dataset for probes") for i in range(lo, hi)], lo)

    def _stack(self, items: list[tuple[Any, Any]], offset: int = 0) -> Batch:
        try:
            xs = torch.stack([_as_tensor(it[0], "x") for it in items])
            ys = torch.stack([_as_tensor(it[1], "y") for it in items])
        except RuntimeError as err:
            raise ValueError(f"Dataset items have inconsistent shapes: {err}") from None
        return self._finish(xs, ys, offset)

    def num_samples(self) -> int:
        """Samples in this shard (iterates a DataLoader / IterableDataset once to count)."""
        if self._tensors is not None:
            lo, hi = _shard_bounds(self._tensors[0].shape[0], self.rank, self.world_size)
            return hi - lo
        if isinstance(self.data, (DataLoader, IterableDataset)):
            return sum(b.n for b in self)
        lo, hi = _shard_bounds(len(self.data), self.rank, self.world_size)
        return hi - lo

    def single_batch(self) -> Batch | None:
        """The shard as one batch when it is held as tensors and batching is off."""
        if self._tensors is None:
            return None
        batches = list(self)
        return batches[0] if len(batches) == 1 else None

    def targets(self) -> torch.Tensor:
        """All targets of this shard, concatenated."""
        return self.tensors()[1]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs and targets of this shard, concatenated (an empty shard of tensors gives
        0-length tensors; an empty shard of a DataLoader/Dataset raises ``ValueError``)."""
        bs = list(self)
        if not bs:
            if self._tensors is not None:
                x, y = self._tensors
                lo, _ = _shard_bounds(x.shape[0], self.rank, self.world_size)
                empty = self._finish(x[lo:lo], y[lo:lo])
                return empty.x, empty.y
            raise ValueError(f"shard rank={self.rank} of world_size={self.world_size} holds no samples")
        return torch.cat([b.x for b in bs]), torch.cat([b.y for b in bs])


def as_batches(data: Any, batch_size: int | None = None, **kwargs: Any) -> BatchSource:
    """Wrap ``data`` as a :class:`BatchSource`.

    A BatchSource is returned as is when nothing is overridden; otherwise a new one is made
    whose unspecified settings (batch size, rank, world size, device, dtype) are inherited.
    """
    if isinstance(data, BatchSource):
        if batch_size is None and not kwargs:
            return data
        settings = {
            "rank": data.rank,
            "world_size": data.world_size,
            "device": data.device,
            "dtype": data.dtype,
        }
        settings.update(kwargs)
        return BatchSource(data.data, batch_size if batch_size is not None else data.batch_size, **settings)
    return BatchSource(data, batch_size, **kwargs)
