"""Batching: turn whatever a user hands a probe into weighted batches.

Every probe reduces over the *whole* dataset with the mean, batches weighted by their
sample count:  L = (1/N) Σ_b n_b · mean_b(ℓ)  =  (1/N) Σ_i ℓ_i.
:class:`BatchSource` is the single place that knows how to iterate a DataLoader, an
``(x, y)`` tuple of tensors or a ``torch.utils.data.Dataset``, optionally restricted to
one shard ``rank`` of ``world_size`` (contiguous, possibly uneven shards).

Data are checked as they stream, on the first complete pass of a source only (later passes cost
nothing): NaN/Inf in floating inputs or targets raise ``ValueError`` naming the tensor (``inputs (x)``
/ ``targets (y)``) and the first bad sample's index.

**Inputs** are a tensor or a dict of tensors (Hugging Face style batches): a dict item
``{"input_ids", "attention_mask", "labels"}`` is split by :func:`split_item` into its targets (the
``target_key``; by default the first of :data:`TARGET_KEYS` present, else ``input_ids`` themselves,
the causal-LM convention) and its inputs (every other key), which reach ``forward`` as keyword arguments
(:func:`dynascope.probes.functional.call_model`). The helpers :func:`slice_inputs`,
:func:`concat_inputs`, :func:`input_count` and :func:`describe_inputs` treat both forms alike, so
per-example probes slice every key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

#: A batch's inputs: one tensor (positional argument), a tuple of tensors (positional arguments, e.g. a
#: diffusion model's ``(x_t, t)``) or a dict of tensors (keyword arguments).
Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]  # noqa: UP007 (runtime alias)

#: Target keys of a dict item, tried in order when no ``target_key`` is named.
TARGET_KEYS = ("labels", "label", "y")


@dataclass(frozen=True)
class Batch:
    """One batch: inputs ``x`` (a tensor or a dict of tensors), targets ``y`` and its sample count ``n``."""

    x: Inputs
    y: torch.Tensor
    n: int


def map_inputs(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` applied to the tensor, or to every tensor of a tuple or dict of inputs."""
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(fn(t) for t in x)
    return fn(x)


def input_tensors(x: Inputs) -> dict[str, torch.Tensor]:
    """The inputs as ``{name: tensor}`` (a single tensor is named ``x``, a tuple's ``x0``, ``x1``, ...)."""
    if isinstance(x, tuple):
        return {f"x{i}": t for i, t in enumerate(x)}
    return dict(x) if isinstance(x, Mapping) else {"x": x}


def input_count(x: Inputs) -> int:
    """Samples in a batch of inputs (the leading dimension; every key of a dict shares it)."""
    return int(next(iter(input_tensors(x).values())).shape[0])


def slice_inputs(x: Inputs, index: Any) -> Inputs:
    """``x[index]`` along the sample dimension, for every key of a dict."""
    return map_inputs(x, lambda t: t[index])


def concat_inputs(parts: list[Inputs]) -> Inputs:
    """Batches of inputs concatenated along the sample dimension (dicts key by key, tuples by position)."""
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def inputs_nbytes(x: Inputs) -> int:
    """Bytes held by the inputs (every key)."""
    return sum(t.nbytes for t in input_tensors(x).values())


def describe_inputs(x: Inputs) -> str:
    """``"[4, 12]"`` for a tensor, ``"input_ids [4, 12], attention_mask [4, 12]"`` for a dict,
    ``"x0 [4, 3], x1 [4]"`` for a tuple (positional)."""
    if isinstance(x, (Mapping, tuple)):
        return ", ".join(f"{k} {list(v.shape)}" for k, v in input_tensors(x).items())
    return str(list(x.shape))


def split_item(item: Mapping[str, Any], target_key: str | None = None) -> tuple[Inputs, Any]:
    """A dict item (or batch) → ``(inputs, targets)``.

    Targets: ``item[target_key]``; without one, the first of :data:`TARGET_KEYS` present, else
    ``input_ids`` (a causal LM's labels are its inputs). Inputs: every other key (a lone ``x`` is
    returned as a tensor, the positional form). ``ValueError`` names the keys when no target is found.
    """
    keys = list(item.keys())
    if target_key is not None:
        if target_key not in item:
            raise ValueError(f"items are dicts with keys {keys}; the target_key {target_key!r} is not one")
        key = target_key
    else:
        key = next((k for k in TARGET_KEYS if k in item), None)
        if key is None:
            if "input_ids" not in item:
                raise ValueError(
                    f"items are dicts with keys {keys} and no target: name it with target_key= (looked for "
                    f"{list(TARGET_KEYS)}, or input_ids as a causal LM's labels)"
                )
            return {k: v for k, v in item.items() if v is not None}, item["input_ids"]
    inputs = {k: v for k, v in item.items() if k != key and v is not None}
    if not inputs:
        raise ValueError(f"items are dicts with keys {keys}: no input is left beside the target {key!r}")
    if list(inputs) == ["x"]:
        return inputs["x"], item[key]
    return inputs, item[key]


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


def _pair(item: Any, where: str, target_key: str | None = None) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        try:
            return split_item(item, target_key)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(f"{where} must yield (x, y) pairs or dicts with labels; got {type(item).__name__}")
    return item[0], item[1]


def _as_inputs(value: Any) -> Inputs:
    if isinstance(value, Mapping):
        return {str(k): _as_tensor(v, f"input {k!r}") for k, v in value.items()}
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_as_tensor(v, f"input {i}") for i, v in enumerate(value))  # positional inputs
    return _as_tensor(value, "x")


def _check_counts(x: Inputs, y: torch.Tensor, what: str) -> None:
    shapes = {k: tuple(t.shape) for k, t in input_tensors(x).items()}
    if y.ndim == 0 or any(len(s) == 0 for s in shapes.values()):
        raise ValueError(f"{what} need a leading sample dimension (got a 0-d tensor)")
    if any(s[0] != y.shape[0] for s in shapes.values()):
        if isinstance(x, torch.Tensor):
            raise ValueError(f"{what} disagree on the number of samples: {x.shape[0]} vs {y.shape[0]} "
                             f"({list(x.shape)} vs {list(y.shape)})")  # fmt: skip
        inputs = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
        raise ValueError(
            f"{what} disagree on the number of samples: inputs {inputs} vs targets {list(y.shape)} "
            "(every key needs the same leading sample dimension)"
        )


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
        ``(x, y)`` tuple/list of tensors (or arrays; ``x`` may be a dict of tensors), a dict of tensors
        with its targets under ``target_key`` (HF style), a ``DataLoader`` yielding ``(x, y)`` or dicts,
        a map-style ``Dataset`` (with ``__len__``) or an ``IterableDataset`` of ``(x, y)`` or dict items.
    target_key:
        The key of dict items holding the targets (default: :data:`TARGET_KEYS`, see :func:`split_item`).
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
        target_key: str | None = None,
    ) -> None:
        if isinstance(data, BatchSource):
            target_key = target_key if target_key is not None else data.target_key
            data = data.data
        self.target_key = target_key
        if isinstance(data, Mapping):
            data = split_item(data, target_key)
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
            x, y = _as_inputs(data[0]), _as_tensor(data[1], "y")
            _check_counts(x, y, "x and y")
            if y.shape[0] == 0:
                raise ValueError("data is empty (0 samples)")
            self._tensors: tuple[Inputs, torch.Tensor] | None = (x, y)
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
                "data must be an (x, y) tuple of tensors, a dict of tensors, a DataLoader or a Dataset; "
                f"got {type(data).__name__}"
            )

    # ------------------------------------------------------------------ helpers
    def _finish(self, x: Any, y: Any, offset: int = 0) -> Batch:
        x, y = _as_inputs(x), _as_tensor(y, "y")
        _check_counts(x, y, "a batch's x and y")
        device, dtype = self.device, self.dtype

        def move(t: torch.Tensor) -> torch.Tensor:
            if device is not None:
                t = t.to(device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t

        x, y = map_inputs(x, move), move(y)
        if not self._verified:
            for name, t in input_tensors(x).items():
                check_finite(t, "inputs (x)" if name == "x" else f"inputs ({name})", offset)
            check_finite(y, "targets (y)", offset)
        return Batch(x, y, int(y.shape[0]))

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
            for lo, hi in self._ranges(y.shape[0]):
                yield self._finish(slice_inputs(x, slice(lo, hi)), y[lo:hi], lo)
        elif isinstance(self.data, DataLoader):
            seen = 0
            for i, item in enumerate(self.data):
                if i % self.world_size != self.rank:
                    continue
                batch = self._finish(*_pair(item, "a DataLoader for probes", self.target_key), seen)
                seen += batch.n
                yield batch
        elif isinstance(self.data, IterableDataset):
            items: list[tuple[Any, Any]] = []
            seen = 0
            for i, item in enumerate(self.data):
                if i % self.world_size != self.rank:
                    continue
                items.append(_pair(item, "a Dataset for probes", self.target_key))
                if self.batch_size is not None and len(items) == self.batch_size:
                    yield self._stack(items, seen)
                    seen += len(items)
                    items = []
            if items:
                yield self._stack(items, seen)
        else:
            ds = self.data
            for lo, hi in self._ranges(len(ds)):
                yield self._stack(
                    [_pair(ds[i], "a Dataset for probes", self.target_key) for i in range(lo, hi)], lo
                )

    def _stack(self, items: list[tuple[Any, Any]], offset: int = 0) -> Batch:
        try:
            first = items[0][0]
            if isinstance(first, Mapping):
                xs: Inputs = {
                    k: torch.stack([_as_tensor(it[0][k], f"input {k!r}") for it in items]) for k in first
                }
            elif isinstance(first, tuple) and all(isinstance(t, torch.Tensor) for t in first):
                xs = tuple(torch.stack([it[0][i] for it in items]) for i in range(len(first)))
            else:
                xs = torch.stack([_as_tensor(it[0], "x") for it in items])
            ys = torch.stack([_as_tensor(it[1], "y") for it in items])
        except RuntimeError as err:
            raise ValueError(f"Dataset items have inconsistent shapes: {err}") from None
        return self._finish(xs, ys, offset)

    def num_samples(self) -> int:
        """Samples in this shard (iterates a DataLoader / IterableDataset once to count)."""
        if self._tensors is not None:
            lo, hi = _shard_bounds(self._tensors[1].shape[0], self.rank, self.world_size)
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

    def tensors(self) -> tuple[Inputs, torch.Tensor]:
        """All inputs and targets of this shard, concatenated (an empty shard of tensors gives
        0-length tensors; an empty shard of a DataLoader/Dataset raises ``ValueError``)."""
        bs = list(self)
        if not bs:
            if self._tensors is not None:
                x, y = self._tensors
                lo, _ = _shard_bounds(y.shape[0], self.rank, self.world_size)
                empty = self._finish(slice_inputs(x, slice(lo, lo)), y[lo:lo])
                return empty.x, empty.y
            raise ValueError(f"shard rank={self.rank} of world_size={self.world_size} holds no samples")
        return concat_inputs([b.x for b in bs]), torch.cat([b.y for b in bs])


def as_batches(data: Any, batch_size: int | None = None, **kwargs: Any) -> BatchSource:
    """Wrap ``data`` as a :class:`BatchSource`.

    A BatchSource is returned as is when nothing is overridden; otherwise a new one is made
    whose unspecified settings (batch size, rank, world size, device, dtype) are inherited.
    """
    if isinstance(data, BatchSource):
        if batch_size is None and not kwargs:
            return data
        settings = {
            "target_key": data.target_key,
            "rank": data.rank,
            "world_size": data.world_size,
            "device": data.device,
            "dtype": data.dtype,
        }
        settings.update(kwargs)
        return BatchSource(data.data, batch_size if batch_size is not None else data.batch_size, **settings)
    return BatchSource(data, batch_size, **kwargs)
