"""The diagonal of the Hessian / GGN / empirical Fisher, entry by entry, with per-layer summaries.

* Hutchinson (Bekas, Kokiopoulou & Saad 2007; the estimator of ADAHESSIAN and curvlinops):
  ``diag(A) = E[z ⊙ A z]`` for Rademacher ``z`` (``z_i² = 1``, ``E[z_i z_j] = 0`` for ``i ≠ j``). With
  ``m`` probes the estimate of entry ``i`` is the mean of the samples ``s_ki = z_ki (A z_k)_i`` and its
  standard error is their sample standard deviation over ``√m`` (``ddof=1``). The variance of one
  sample is ``Σ_{j≠i} A_ij²``: entries coupled to many others are noisy, isolated ones exact.
  Probes go through ``matmat`` in blocks (one data pass per block); samples are merged block by block
  (Chan's parallel mean/variance update), so memory is ``O(P · block)``.
* Exact (``method="exact"``): ``A e_j`` for unit vectors ``e_j`` in blocks, keeping entry ``j``: ``P``
  products — for small models and tests.
* Spatial averaging (``spatial_average=True``, ADAHESSIAN, Yao et al. 2021): the entries of each
  convolution kernel (a parameter with ≥ 3 dims, ``[out, in, *kernel]``) are replaced by their mean
  over the kernel's spatial dims, per probe (so the standard error is that of the averaged quantity).
  ADAHESSIAN also takes absolute values for its preconditioner; this probe does not.

Per-layer summaries (:meth:`HessianDiagonalResult.layer_frame`): for each parameter tensor, the mean
of its diagonal entries (``= tr(A_ℓℓ)/n_ℓ``) with the standard error of that mean taken from the
per-probe layer means (entries of one layer are correlated, so it is not the entries' s.e. averaged),
their standard deviation (spread), min and max.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .curvature_setup import RecordingOperator, spectral_meta
from .operators import LinearOperator, OperatorSpec, random_vectors
from .results import Result
from .validation import check_choice, check_int

DIAGONAL_METHODS = ("hutchinson", "exact")


@dataclass(frozen=True, kw_only=True)
class HessianDiagonalResult(Result):
    """``diag(A)`` entry by entry: ``values`` and ``stderr`` ``[P]`` (float64; ``stderr`` 0 for the exact
    method), in the order of ``names`` (parameter tensors, ``named_parameters`` order) with ``shapes``;
    ``layer_mean`` / ``layer_mean_stderr`` per tensor (see the module docstring); ``n_matvecs``."""

    values: torch.Tensor
    stderr: torch.Tensor
    names: list[str]
    shapes: list[list[int]]
    layer_mean: torch.Tensor
    layer_mean_stderr: torch.Tensor
    method: str
    n_matvecs: int

    def split(self, what: str = "values") -> dict[str, torch.Tensor]:
        """``{parameter name: tensor of its shape}`` of ``values`` or ``stderr``."""
        flat = check_choice("what", what, ("values", "stderr"))
        vec = getattr(self, flat)
        sizes = [math.prod(s) for s in self.shapes]
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(vec, sizes), self.shapes)}

    def to_frame(self):
        """One row per entry: ``parameter, index`` (flat index within the tensor), ``value, stderr``."""
        import numpy as np
        import pandas as pd

        sizes = [math.prod(s) for s in self.shapes]
        return pd.DataFrame(
            {
                "parameter": np.repeat(np.array(self.names, dtype=object), sizes),
                "index": np.concatenate([np.arange(n) for n in sizes]),
                "value": self.values.numpy(),
                "stderr": self.stderr.numpy(),
            }
        )

    def layer_frame(self):
        """One row per parameter tensor: ``parameter, n_params, mean, mean_stderr, std, min, max, sum``."""
        import pandas as pd

        rows = []
        for i, (name, t) in enumerate(self.split().items()):
            v = t.reshape(-1)
            rows.append({
                "parameter": name, "n_params": v.numel(), "mean": float(self.layer_mean[i]),
                "mean_stderr": float(self.layer_mean_stderr[i]),
                "std": float(v.std()) if v.numel() > 1 else 0.0, "min": float(v.min()), "max": float(v.max()),
                "sum": float(v.sum()),
            })  # fmt: skip
        return pd.DataFrame(rows)


class _Moments:
    """Running mean and sum of squared deviations of sample columns, merged block by block (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, S: torch.Tensor) -> None:
        """Merge the samples in the columns of ``S`` (``[..., b]``, float64)."""
        b = S.shape[-1]
        mean_b = S.mean(dim=-1)
        m2_b = ((S - mean_b[..., None]) ** 2).sum(dim=-1)
        if self.mean is None:
            self.n, self.mean, self.m2 = b, mean_b, m2_b
            return
        assert self.m2 is not None
        n = self.n + b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * b / n)
        self.n = n

    def stderr(self) -> torch.Tensor:
        assert self.m2 is not None
        return (self.m2 / (self.n - 1)).sqrt() / math.sqrt(self.n)


def _spatial_average(
    S: torch.Tensor, shapes: Sequence[tuple[int, ...]], numels: Sequence[int]
) -> torch.Tensor:
    """Each ≥3-dim block of ``S`` (``[P, b]``) averaged over its dims after the second (kernel dims)."""
    parts = []
    for block, shape in zip(torch.split(S, list(numels), dim=0), shapes):
        if len(shape) >= 3:
            t = block.reshape(*shape, -1)
            dims = tuple(range(2, len(shape)))
            block = t.mean(dim=dims, keepdim=True).expand_as(t).reshape(-1, S.shape[1])
        parts.append(block)
    return torch.cat(parts, dim=0)


def _layer_means(S: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """``[L, b]``: the mean of each tensor's rows of ``S`` (``[P, b]``)."""
    return torch.stack([blk.mean(dim=0) for blk in torch.split(S, list(numels), dim=0)])


def diagonal_estimate(
    op: LinearOperator,
    *,
    method: str = "hutchinson",
    n_matvecs: int = 100,
    seed: int = 0,
    block: int = 32,
    shapes: Sequence[tuple[int, ...]] | None = None,
    spatial_average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, stderr, layer_mean, layer_mean_stderr)`` (float64, CPU) of ``diag(op)``.

    ``shapes``: the parameter tensors' shapes in order (for spatial averaging and layer means; default
    one block of ``P`` entries).
    """
    check_choice("method", method, DIAGONAL_METHODS)
    check_int("block", block, min=1)
    shapes = [tuple(s) for s in shapes] if shapes is not None else [(op.size,)]
    numels = [math.prod(s) for s in shapes]
    if sum(numels) != op.size:
        raise ValueError(f"shapes hold {sum(numels)} entries but the operator has {op.size}")
    if method == "exact":
        diag = torch.empty(op.size, dtype=torch.float64)
        for lo in range(0, op.size, block):
            hi = min(lo + block, op.size)
            E = torch.zeros(op.size, hi - lo, dtype=op.dtype, device=op.device)
            idx = torch.arange(lo, hi, device=op.device)
            E[idx, torch.arange(hi - lo, device=op.device)] = 1
            diag[lo:hi] = op.matmat(E)[idx, torch.arange(hi - lo, device=op.device)].double().cpu()
        if spatial_average:
            diag = _spatial_average(diag[:, None], shapes, numels)[:, 0]
        layer = _layer_means(diag[:, None], numels)[:, 0]
        return diag, torch.zeros_like(diag), layer, torch.zeros_like(layer)
    if n_matvecs < 2:
        raise ValueError(f"hutchinson needs n_matvecs >= 2 for a standard error; got {n_matvecs}")
    entries, layers = _Moments(), _Moments()
    Z = random_vectors(op.size, n_matvecs, seed=seed, dtype=op.dtype, device=op.device, kind="rademacher")
    for lo in range(0, n_matvecs, block):
        Zb = Z[:, lo : lo + block]
        S = (Zb.double() * op.matmat(Zb).double()).cpu()  # samples z ⊙ A z, [P, b]
        if spatial_average:
            S = _spatial_average(S, shapes, numels)
        entries.add(S)
        layers.add(_layer_means(S, numels))
    assert entries.mean is not None and layers.mean is not None
    return entries.mean, entries.stderr(), layers.mean, layers.stderr()


def hessian_diagonal(
    model: nn.Module,
    data: Any,
    *,
    n_matvecs: int = 100,
    method: str = "hutchinson",
    loss: str | Callable = "auto",
    operator: str = "hessian",
    spatial_average: bool = False,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block: int = 32,
    reduce_fn: Callable | None = None,
    check_determinism: bool = True,
) -> HessianDiagonalResult:
    """``diag(A)`` of the Hessian (``operator="hessian"``), GGN or empirical Fisher of the dataset-mean loss.

    ``method="hutchinson"``: ``n_matvecs`` Rademacher probes, ``block`` per data pass, with a per-entry
    standard error; ``"exact"``: ``P`` unit-vector products (``n_matvecs`` is ignored; small models).
    ``spatial_average``: ADAHESSIAN's averaging over convolution kernels' spatial dims (module docstring).
    """
    check_choice("method", method, DIAGONAL_METHODS)
    check_int("n_matvecs", n_matvecs, min=2)
    check_int("seed", seed)
    check_choice("spatial_average", spatial_average, (True, False))
    t0 = time.perf_counter()
    op = OperatorSpec(
        kind=operator, loss=loss, params=params, batch_size=batch_size, mode=mode, dtype=dtype, device=device,
        reduce_fn=reduce_fn,
    ).build(model, data)  # fmt: skip
    rec = RecordingOperator(op)
    shapes = op.space.shapes
    values, se, layer, layer_se = diagonal_estimate(
        rec, method=method, n_matvecs=n_matvecs, seed=seed, block=block, shapes=shapes,
        spatial_average=spatial_average,
    )  # fmt: skip
    settings = {"n_matvecs": n_matvecs, "method": method, "spatial_average": spatial_average,
                "params": params, "batch_size": batch_size, "block": block}  # fmt: skip
    meta = spectral_meta(
        "hessian_diagonal", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism,
        probes="rademacher" if method == "hutchinson" else "unit vectors",
        stderr_definition=(
            "per entry: std(z_i (A z)_i)/sqrt(m) over m Rademacher probes (ddof=1)" if method == "hutchinson"
            else "0 (exact)"
        ),
        spatial_average_definition=(
            "mean over the kernel dims (dims >= 2) of each >=3-dim parameter, per probe; no absolute value"
            if spatial_average else None
        ),
    )  # fmt: skip
    return HessianDiagonalResult(
        values=values, stderr=se, names=list(op.space.names), shapes=[list(s) for s in shapes],
        layer_mean=layer, layer_mean_stderr=layer_se, method=method, n_matvecs=rec.n_matvecs, meta=meta,
    )  # fmt: skip


__all__ = ["DIAGONAL_METHODS", "HessianDiagonalResult", "diagonal_estimate", "hessian_diagonal"]
