"""The diagonal of the Hessian / GGN / empirical Fisher, entry by entry, with per-layer summaries.

* Hutchinson (Bekas, Kokiopoulou & Saad 2007; the estimator of ADAHESSIAN and curvlinops):
  ``diag(A) = E[z ⊙ A z]`` for Rademacher ``z`` (``z_i² = 1``, ``E[z_i z_j] = 0`` for ``i ≠ j``). With
  ``m`` probes the estimate of entry ``i`` is the mean of the samples ``s_ki = z_ki (A z_k)_i`` and its
  standard error is their sample standard deviation over ``√m`` (``ddof=1``). The variance of one
  sample is ``Σ_{j≠i} A_ij²``: entries coupled to many others are noisy, isolated ones exact.
  Probes go through ``matmat`` in blocks (one data pass per block); samples are merged block by block
  (Chan's parallel mean/variance update), so memory is ``O(P · block)``.
* Exact (``method="exact"``): the Hessian / GGN diagonal of the parameters of the model's last chain of
  known layers (Linear, Conv2d, elementwise activations, reshapes, pooling; cross-entropy, MSE, half-SSE)
  by second-order backpropagation (:mod:`~dynascope.probes.second_order`, BackPACK's ``DiagHessian``:
  one pass over the data), every other entry by ``A e_j`` for unit vectors ``e_j`` in blocks, keeping
  entry ``j`` (one product per entry; ``exact_backprop=False``: every entry so).
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .budget import CHUNK_BYTES, RademacherProbes, largest, names_the_knob, resolve_budget, too_small
from .curvature_setup import RecordingOperator, spec_settings, spectral_meta, takes_operator_spec
from .memory import peak_memory
from .operators import LinearOperator, OperatorSpec
from .results import Result
from .second_order import FORMULA as BACKPROP_FORMULA
from .second_order import SecondOrderDiagonal
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
    """Running mean and sum of squared deviations per row, merged block by block of sample columns (Chan et
    al.); a block may arrive in row chunks (:meth:`add`), then :meth:`commit` counts its columns."""

    def __init__(self, size: int) -> None:
        self.n = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def add(self, S: torch.Tensor, lo: int = 0) -> None:
        """Merge the samples in the columns of ``S`` (``[rows, b]``, float64) into rows ``lo:lo+rows``."""
        b = S.shape[-1]
        mean_b = S.mean(dim=-1)
        m2_b = ((S - mean_b[..., None]) ** 2).sum(dim=-1)
        n = self.n + b
        hi = lo + S.shape[0]
        delta = mean_b - self.mean[lo:hi]
        self.mean[lo:hi] = self.mean[lo:hi] + delta * (b / n)
        self.m2[lo:hi] = self.m2[lo:hi] + m2_b + delta**2 * (self.n * b / n)

    def commit(self, b: int) -> None:
        self.n += b

    def stderr(self) -> torch.Tensor:
        return (self.m2 / (self.n - 1)).sqrt() / math.sqrt(self.n)


def _chunks(shapes: Sequence[tuple[int, ...]], b: int, spatial_average: bool) -> list[tuple[int, int, int]]:
    """``(tensor index, lo, hi)`` row ranges of the flat parameter vector: within one tensor, at most
    :data:`CHUNK_BYTES` of float64 ``[rows, b]`` each, whole kernels when spatially averaged."""
    rows = max(1, CHUNK_BYTES // (8 * b))
    out, start = [], 0
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        unit = math.prod(shape[2:]) if spatial_average and len(shape) >= 3 else 1
        step = max(unit, rows // unit * unit)
        out += [(i, start + lo, start + min(lo + step, numel)) for lo in range(0, numel, step)]
        start += numel
    return out


def _spatial_average(S: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Rows of a ≥3-dim tensor ``[out, in, *kernel]`` (whole kernels, ``[rows, b]``) averaged over each
    kernel's entries."""
    k = math.prod(shape[2:])
    t = S.reshape(-1, k, S.shape[1])
    return t.mean(dim=1, keepdim=True).expand_as(t).reshape(S.shape)


def _exact_layers(
    diag: torch.Tensor, shapes: Sequence[tuple[int, ...]], spatial_average: bool
) -> torch.Tensor:
    """Per-tensor means of an exact diagonal (spatially averaged in place first where asked)."""
    layer = torch.empty(len(shapes), dtype=torch.float64)
    for i, (shape, blk) in enumerate(zip(shapes, torch.split(diag, [math.prod(s) for s in shapes]))):
        if spatial_average and len(shape) >= 3:
            blk.copy_(_spatial_average(blk[:, None], shape)[:, 0])
        layer[i] = blk.mean()
    return layer


def plan_diagonal(
    method: str, size: int, n_matvecs: int, itemsize: int, *, block: int, budget: int
) -> dict[str, Any]:
    """Probes per product (``block_used``) and whether the Hutchinson signs are held (``int8``, the values of
    ``random_vectors``) or drawn per block, so that the vectors fit ``budget`` bytes; their bytes by the
    formula in ``memory_formula``. Raises :class:`MemoryBudgetError` when one probe does not fit."""
    V = size * itemsize
    exact = method == "exact"
    block = min(block, size if exact else n_matvecs)
    chunk = lambda b: 4 * min(size * b * 8, CHUNK_BYTES)  # noqa: E731 - float64 row chunks of a block

    def need(b: int, hold: bool) -> int:
        if exact:
            return 2 * b * V + 16 * size + chunk(b)
        return 2 * b * V + 24 * size + (n_matvecs if hold else b) * size + chunk(b)

    formula = (
        "2b·P·itemsize (unit vectors, products) + 16·P (diagonal, stderr: float64)" if exact
        else "2b·P·itemsize (probe block, product block) + 24·P (mean, M2, stderr: float64) + probe signs "
        "(m·P int8 held, else b·P) + float64 row chunks"
    )  # fmt: skip
    for hold in (True, False) if not exact else (False,):
        if need(block, hold) <= budget:
            b = block
            break
    else:
        hold = False
        b = largest(lambda b: need(b, False) <= budget, 1, block)
        if b is None:
            raise too_small(
                f"hessian_diagonal ({method})", budget, need(1, False), "one probe and its product"
            )
    binds = (b, hold) != (block, not exact)
    return {"memory_budget": budget, "memory_formula": formula, "vector_bytes": need(b, hold),
            "block_used": b, "probes_held": hold, "budget_binds": binds}  # fmt: skip


def diagonal_estimate(
    op: LinearOperator,
    *,
    method: str = "hutchinson",
    n_matvecs: int = 100,
    seed: int = 0,
    block: int = 32,
    shapes: Sequence[tuple[int, ...]] | None = None,
    spatial_average: bool = False,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, stderr, layer_mean, layer_mean_stderr)`` (float64, CPU) of ``diag(op)``.

    ``shapes``: the parameter tensors' shapes in order (for spatial averaging and layer means; default
    one block of ``P`` entries). Vectors within ``memory_budget`` bytes (default: half the available
    memory; :func:`plan_diagonal`): probes streamed ``block`` at a time, samples reduced in row chunks.
    """
    check_choice("method", method, DIAGONAL_METHODS)
    check_int("block", block, min=1)
    shapes = [tuple(s) for s in shapes] if shapes is not None else [(op.size,)]
    numels = [math.prod(s) for s in shapes]
    if sum(numels) != op.size:
        raise ValueError(f"shapes hold {sum(numels)} entries but the operator has {op.size}")
    if method == "hutchinson" and n_matvecs < 2:
        raise ValueError(f"hutchinson needs n_matvecs >= 2 for a standard error; got {n_matvecs}")
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    plan = plan_diagonal(method, op.size, n_matvecs, itemsize, block=block,
                         budget=resolve_budget(memory_budget, op.device))  # fmt: skip
    block = plan["block_used"]
    if method == "exact":
        diag = torch.empty(op.size, dtype=torch.float64)
        for lo in range(0, op.size, block):
            hi = min(lo + block, op.size)
            E = torch.zeros(op.size, hi - lo, dtype=op.dtype, device=op.device)
            idx = torch.arange(lo, hi, device=op.device)
            E[idx, torch.arange(hi - lo, device=op.device)] = 1
            diag[lo:hi] = op.matmat(E)[idx, torch.arange(hi - lo, device=op.device)].double().cpu()
            del E
        layer = _exact_layers(diag, shapes, spatial_average)
        return diag, torch.zeros_like(diag), layer, torch.zeros_like(layer)
    chunks = _chunks(shapes, block, spatial_average)
    entries, layers = _Moments(op.size), _Moments(len(shapes))
    probes = RademacherProbes(op.size, n_matvecs, torch.Generator().manual_seed(seed),
                              hold=plan["probes_held"], dtype=op.dtype, device=op.device)  # fmt: skip
    for nb in [min(block, n_matvecs - lo) for lo in range(0, n_matvecs, block)]:
        Zb = probes.take(nb)
        AZb = op.matmat(Zb)
        means = torch.zeros(len(shapes), nb, dtype=torch.float64)  # per-probe layer means
        for i, lo, hi in chunks:
            S = (Zb[lo:hi].double() * AZb[lo:hi].double()).cpu()  # samples z ⊙ A z
            if spatial_average and len(shapes[i]) >= 3:
                S = _spatial_average(S, shapes[i])
            entries.add(S, lo)
            if hi - lo == numels[i]:
                means[i] = S.mean(dim=0)
            else:  # a tensor in several chunks: sum, then divide
                means[i] += S.sum(dim=0) / numels[i]
        layers.add(means)
        entries.commit(nb)
        layers.commit(nb)
        del Zb, AZb
    return entries.mean, entries.stderr(), layers.mean, layers.stderr()


@takes_operator_spec("loss", "operator", "params", "batch_size", "mode", "dtype", "device", "reduce_fn")
def hessian_diagonal(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    n_matvecs: int = 100,
    method: str = "hutchinson",
    spatial_average: bool = False,
    seed: int = 0,
    block: int = 32,
    check_determinism: bool = True,
    memory_budget: int | None = None,
    exact_backprop: bool = True,
) -> HessianDiagonalResult:
    """``diag(A)`` of the Hessian (``operator="hessian"``), GGN or empirical Fisher of the dataset-mean loss.

    ``spec``: the operator (:class:`~dynascope.probes.operators.OperatorSpec`), or its fields as keywords
    (``loss``, ``operator``, ``params``, ``batch_size``, ``mode``, ``dtype``, ``device``, ``reduce_fn``).

    ``method="hutchinson"``: ``n_matvecs`` Rademacher probes, ``block`` per data pass, with a per-entry
    standard error; ``"exact"``: with ``exact_backprop`` (default) the Hessian / GGN diagonal of the
    parameters of the model's last chain of known layers by second-order backpropagation
    (:mod:`~dynascope.probes.second_order`; cross-entropy, MSE, half-SSE), every other entry (and every entry
    with ``exact_backprop=False`` or the Fisher) by unit-vector products (``n_matvecs`` is ignored;
    ``n_matvecs`` of the result counts those products). ``meta["exact_backprop"]`` /
    ``meta["exact_products"]`` name the parameters each way covered.
    ``spatial_average``: ADAHESSIAN's averaging over convolution kernels' spatial dims (module docstring).
    ``memory_budget``: bytes of vectors held at once (default: half the available RAM / free GPU memory);
    never ``[P, n_matvecs]``: probes go ``block`` at a time (fewer where the budget binds, their signs then
    drawn per block) and samples are reduced in row chunks; the backpropagated factors go a chunk of
    samples at a time. ``meta`` records the budget, the formula, the plan and the measured peak
    (:func:`plan_diagonal`).
    """
    check_choice("method", method, DIAGONAL_METHODS)
    check_int("n_matvecs", n_matvecs, min=2)
    check_int("seed", seed)
    check_choice("spatial_average", spatial_average, (True, False))
    check_choice("exact_backprop", exact_backprop, (True, False))
    t0 = time.perf_counter()
    op = spec.build(model, data)
    shapes = op.space.shapes
    budget = resolve_budget(memory_budget, op.device)
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    fast = SecondOrderDiagonal.plan(op) if method == "exact" and exact_backprop else None
    rest = [n for n in op.space.names if fast is None or n not in fast.fast]
    prod_op = op if fast is None else spec.replace(params=tuple(rest)).build(model, data) if rest else None
    rec = RecordingOperator(prod_op if prod_op is not None else op)
    plan = (
        plan_diagonal(method, rec.size, n_matvecs, itemsize, block=block, budget=budget)
        if prod_op is not None
        else {"memory_budget": budget, "memory_formula": BACKPROP_FORMULA}
    )
    backprop: dict[str, Any] = {}
    with names_the_knob("hessian_diagonal", budget, plan["memory_formula"]), peak_memory(op.device) as peak:
        if fast is None:
            values, se, layer, layer_se = diagonal_estimate(
                rec, method=method, n_matvecs=n_matvecs, seed=seed, block=block, shapes=shapes,
                spatial_average=spatial_average, memory_budget=budget,
            )  # fmt: skip
        else:
            by_name = fast.run(budget)
            if prod_op is not None:
                d_rest = diagonal_estimate(rec, method="exact", block=block, memory_budget=budget)[0]
                by_name |= prod_op.space.split(d_rest)
            values = torch.cat([by_name[n].reshape(-1) for n in op.space.names])
            layer = _exact_layers(values, shapes, spatial_average)
            se, layer_se = torch.zeros_like(values), torch.zeros_like(layer)
            backprop = {"backprop_formula": BACKPROP_FORMULA, "backprop_samples_per_chunk": fast.chunk,
                        "backprop_vector_bytes": fast.vector_bytes}  # fmt: skip
    settings = {"n_matvecs": n_matvecs, "method": method, "spatial_average": spatial_average,
                **spec_settings(spec), "block": block, "memory_budget": memory_budget,
                "exact_backprop": exact_backprop}  # fmt: skip
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
        exact_backprop=list(fast.fast) if fast is not None else [],
        exact_products=rest if method == "exact" else [],
        **plan, **backprop, measured_peak_bytes=peak.bytes, measured_peak_how=peak.how,
    )  # fmt: skip
    return HessianDiagonalResult(
        values=values, stderr=se, names=list(op.space.names), shapes=[list(s) for s in shapes],
        layer_mean=layer, layer_mean_stderr=layer_se, method=method, n_matvecs=rec.n_matvecs, meta=meta,
    )  # fmt: skip


__all__ = [
    "DIAGONAL_METHODS",
    "HessianDiagonalResult",
    "diagonal_estimate",
    "hessian_diagonal",
    "plan_diagonal",
]
