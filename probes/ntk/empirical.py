"""Empirical neural tangent kernel (finite-width NTK) and its matrix-free operator.

For a network ``f(x; θ) ∈ R^O`` with per-sample Jacobian ``J(x) = ∂f(x)/∂θ ∈ R^{O×P}``, the
empirical NTK is ``Θ(x, x') = J(x) J(x')ᵀ ∈ R^{O×O}``. :func:`empirical_ntk` returns either

* the full kernel ``[N1·O, N2·O]``, sample-major (row ``i·O + o`` is output ``o`` of sample ``i``), or
* the output-traced kernel ``[N1, N2]``: ``Θ_tr(x, x') = Σ_o Θ(x, x')_{oo} = ⟨J(x), J(x')⟩_F``.

Two strategies (the cost model follows Novak et al. 2022, "Fast finite width neural tangent kernel"):

* ``"jacobian"`` (Jacobian contraction): per-sample Jacobians by ``vmap(jacrev)`` in sample chunks,
  contracted one parameter tensor at a time. Cost ``≈ (2·O + G)·F·n_jac + 2·N1·N2·O^a·P`` flops, where
  ``F`` is the forward cost of one sample, ``a = 2`` (full) or ``1`` (traced), ``G`` the number of output
  groups (the traced kernel ``Σ_o J_o J_oᵀ`` is accumulated over groups of outputs when all outputs'
  Jacobians do not fit the memory budget; 1 otherwise) and ``n_jac`` the number of per-sample
  Jacobians evaluated (``N1 + N2`` when a group's Jacobians fit and are cached; otherwise column
  chunks are recomputed for every row chunk). Memory: at most ``memory_budget`` bytes of Jacobians
  (never the whole ``[N·O, P]`` Jacobian unless it fits): the Gram is built from row-blocks of ``c``
  samples' Jacobians, ``2·c·g·(P + A)·itemsize ≤ memory_budget`` (two chunks alive), or
  ``(N1 + N2)·g·P·itemsize ≤ memory_budget / 2`` when every Jacobian of an output group is cached.
* ``"ntk_vp"`` (NTK-vector products): ``Θ E = J1 (J2ᵀ E)`` for blocks of unit columns ``E``: the
  tangents ``J2ᵀ e`` come from vector-Jacobian products (one per column) and ``J1 t`` from a
  forward-mode ``jvp`` over ``x1``. Cost ``≈ 3·F·N2·O + 3·F·N1·N2·O`` flops, memory
  ``block·P`` numbers for the tangents; it never holds per-sample Jacobians of ``x1``.

With ``structured=True`` (default) the Jacobian contraction builds the Jacobians of ``nn.Linear`` and
``nn.Conv2d`` weights from the layers' inputs and output gradients (a backward pass without weight
gradients), and contracts Linear layers in factored form where that is cheaper: ``2·O^a·d_in·d_out``
flops per pair become ``2·T²·(d_in + O^a·d_out)`` (module ``ntk.structure``); the cost formula then uses
the structured per-pair flops. For ``x2 = x1`` only the upper-triangular blocks of ``K`` are contracted.

``strategy="auto"`` evaluates both formulas (``F`` counted on one sample by forward hooks:
``2·MACs`` of Linear/conv layers plus one flop per other activation, at least ``2·P``) and takes the
cheaper strategy that fits ``memory_budget`` bytes (the Jacobian contraction needs at least ``2·O·P``
numbers; the NTK-vector products at least ``2·P``: one tangent column, else
:class:`~dynascope.probes.budget.MemoryBudgetError`). ``memory_budget`` (:mod:`~dynascope.probes.budget`)
defaults to :data:`DEFAULT_MAX_MEMORY` or half the available memory, whichever is less; ``max_memory`` is its
former name (deprecated). The kernel itself (``N1·N2·O^a`` numbers) is the result, on top of the budget.

:class:`NTKOperator` is the matrix-free kernel on a fixed data set (``v ↦ J (Jᵀ v)``: one
vector-Jacobian and one Jacobian-vector product per batch), used by Lanczos when the kernel is too
large to form. Everything runs on the model's device and dtype; no host synchronisation inside loops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from ...datasets.batching import Inputs, input_count, input_tensors, map_inputs, slice_inputs
from ...datasets.batching import check_finite as check_data_finite
from ..budget import resolve_budget, too_small
from ..functional import FunctionalModel, ModeGuard, derivative_error
from ..operators import LinearOperator
from ..validation import check_float, check_int
from .structure import Factors, Site, Taps, contract_site, find_sites

STRATEGIES = ("auto", "jacobian", "ntk_vp")
REDUCTIONS = ("trace", None)
DEFAULT_MAX_MEMORY = 1 << 30  # default memory_budget's cap: bytes for Jacobian chunks / tangent blocks
NTK_FORMULA = (
    "jacobian: max(2·c·g·(P + A), cached (N1 + N2)·g·P)·itemsize (c samples per row-block, g outputs per "
    "group, A activations per sample); ntk_vp: (b·P + r·b·(A + O))·itemsize (b tangent columns, r rows per "
    "jvp); plus the kernel N1·N2·O^a"
)
JACREV_SAMPLES = 8  # samples per vmap(jacrev) call inside a Jacobian chunk
SYM_BLOCK = 32  # x2 = x1, cached Jacobians, ≥ 4·SYM_BLOCK kernel rows: contract 4×4 blocks, upper triangle

# modules whose train-mode output is not a deterministic per-sample function
_NOT_PER_SAMPLE_IN_TRAIN = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


# --------------------------------------------------------------------------- model as a function
class _NTKModel(FunctionalModel):
    """The functional view of :mod:`dynascope.probes.functional` plus what the NTK needs: per-sample
    ``[O]`` and batched ``[B, O]`` outputs, input checks, the output count and a cost profile."""

    def __init__(
        self,
        model: nn.Module,
        *,
        params: Sequence[str] | str | None,
        mode: str,
        device: torch.device | str | None,
    ) -> None:
        super().__init__(model, params=params, mode=mode, device=device)
        if mode == "train":
            coupled = [
                type(m).__name__ for m in self.model.modules() if isinstance(m, _NOT_PER_SAMPLE_IN_TRAIN)
            ]
            if coupled:
                raise ValueError(
                    "the empirical NTK is per-sample and deterministic; mode='train' is not supported for "
                    f"models with {sorted(set(coupled))} (use mode='eval')"
                )

    def batch(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[B, O]`` (trailing output dimensions flattened)."""
        out = self(p, x)
        return out.reshape(out.shape[0], -1)

    def single(self, p: dict[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """Output ``[O]`` of one sample (the model sees a batch of one)."""
        return self.batch(p, map_inputs(x, lambda t: t.unsqueeze(0)))[0]

    def prepare(self, x: Any, what: str) -> Inputs:
        """Validate and move inputs (a tensor; a tuple of tensors: positional arguments; a dict of tensors:
        keyword arguments) to the model's device (floating inputs cast to its dtype)."""
        if isinstance(x, dict) and x:
            return {k: self._prepare_one(v, f"{what}[{k!r}]") for k, v in x.items()}
        if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
            return tuple(self._prepare_one(t, f"{what}[{i}]") for i, t in enumerate(x))
        return self._prepare_one(x, what)

    def _prepare_one(self, x: Any, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{what} must be a torch.Tensor (or a tuple or dict of tensors); got {type(x).__name__}"
            )
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(
                f"{what} needs a leading, non-empty sample dimension; got shape {tuple(x.shape)}"
            )
        x = x.to(self.device)
        x = x.to(self.dtype) if x.is_floating_point() else x
        check_data_finite(x, f"inputs ({what})")
        return x

    def output_dim(self, x: Inputs) -> int:
        with torch.no_grad(), ModeGuard(self.model, self.mode):
            try:
                out = self.batch(self.params, slice_inputs(x, slice(0, 1)))
            except Exception as err:  # a model/input mismatch: say so instead of a deep traceback
                shapes = {k: tuple(t.shape[1:]) for k, t in input_tensors(x).items()}
                raise ValueError(
                    f"the model cannot be evaluated on inputs of shape {shapes} per sample: {err}"
                ) from err
        return int(out.shape[1])

    def profile(self, x: Inputs) -> tuple[float, int]:
        """``(F, A)`` for one sample: forward flops (``2·MACs`` of Linear / conv layers, one flop per
        output value of other leaf modules; at least ``2·P``) and the number of activation values."""
        flops, acts = [0.0], [0]

        def hook(m: nn.Module, _i: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            acts[0] += out.numel()
            if isinstance(m, nn.Linear):
                flops[0] += 2.0 * out.numel() * m.in_features
            elif isinstance(m, nn.modules.conv._ConvNd):
                flops[0] += 2.0 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            else:
                flops[0] += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad(), ModeGuard(self.model, self.mode):
                self.batch(self.params, slice_inputs(x, slice(0, 1)))
        finally:
            for h in handles:
                h.remove()
        return max(flops[0], 2.0 * self.size), max(acts[0], 1)


# --------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class NTKPlan:
    """The strategy chosen by :func:`plan_ntk` with its cost estimates (flops) and chunk sizes."""

    strategy: str
    chunk_size: int  # samples per Jacobian chunk ("jacobian") / unit columns per tangent block ("ntk_vp")
    row_chunk: int  # samples of x1 per jvp call ("ntk_vp"); equal to chunk_size for "jacobian"
    cost_jacobian: float
    cost_ntk_vp: float
    cached: bool  # "jacobian": an output group's per-sample Jacobians fit the budget and are computed once
    flops_per_sample: float
    n_params: int
    n_outputs: int
    output_chunk: int  # "jacobian": outputs per group (O unless the traced kernel is split by outputs)
    structured: tuple[str, ...] = ()  # "jacobian": Linear/Conv2d modules in structured form (ntk.structure)
    factored: tuple[str, ...] = ()  # those of them contracted by factors (the others materialised)
    fallback: str | None = None  # why the planned strategy failed and per-example jacrev ran instead
    attention: str | None = None  # "math SDPA" for models with attention (functional.kernel_meta)

    def as_meta(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _deprecated_alias(memory_budget: Any, max_memory: int | None, default: Any) -> Any:
    """``memory_budget``, or the deprecated ``max_memory`` when that was given instead (with a warning)."""
    if max_memory is None:
        return memory_budget
    if memory_budget is not None and memory_budget != default:
        raise ValueError("give memory_budget only (max_memory is its former, deprecated name)")
    warnings.warn("max_memory is deprecated: use memory_budget (bytes)", DeprecationWarning, stacklevel=3)
    return max_memory


def ntk_budget(memory_budget: int | None, max_memory: int | None, device: Any) -> int:
    """The bytes an NTK probe plans within: ``memory_budget`` (or the deprecated ``max_memory``), by default
    the smaller of :data:`DEFAULT_MAX_MEMORY` and half the available memory (:mod:`..budget`)."""
    given = _deprecated_alias(memory_budget, max_memory, None)
    if given is not None:
        check_float("memory_budget", given, min=0, min_open=True)
        return int(given)
    return min(DEFAULT_MAX_MEMORY, resolve_budget(None, device))


def plan_ntk(
    n1: int,
    n2: int | None,
    n_outputs: int,
    n_params: int,
    *,
    flops_per_sample: float,
    activations_per_sample: int = 1,
    traced: bool,
    itemsize: int = 4,
    strategy: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MAX_MEMORY,
    jacobian_numbers: int | None = None,
    pair_flops: float | None = None,
    max_memory: int | None = None,
) -> NTKPlan:
    """Choose the strategy by the cost formulas in the module docstring (``n2=None``: symmetric ``x2=x1``).

    ``jacobian_numbers``: numbers stored per sample and output by the Jacobian contraction (default
    ``n_params``; less with structured Linear sites); ``pair_flops``: its contraction flops per sample
    pair (default ``2·O^a·n_params``). ``memory_budget``: bytes (``max_memory``: its deprecated name).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    check_int("chunk_size", chunk_size, min=1, optional=True)
    memory_budget = _deprecated_alias(memory_budget, max_memory, DEFAULT_MAX_MEMORY)
    check_float("memory_budget", memory_budget, min=0, min_open=True)
    O, F, A = n_outputs, flops_per_sample, activations_per_sample
    P = n_params if jacobian_numbers is None else jacobian_numbers
    sym = n2 is None
    m2 = n1 if sym else n2
    a = 1 if traced else 2
    pair = 2.0 * O**a * P if pair_flops is None else pair_flops
    budget = int(memory_budget) // itemsize  # numbers
    # Jacobian contraction: chunk c samples, two chunks alive, each c·O·(P + A) numbers
    jac_fits = 2 * O * P <= budget
    total_n = n1 + (0 if sym else m2)
    g = min(O, max(1, (budget // 2) // (total_n * (P + A)))) if traced else O  # outputs per group
    n_groups = math.ceil(O / g)
    c_jac = chunk_size or max(1, min(n1 + m2, budget // (2 * g * (P + A))))
    cached = total_n * g * P <= budget // 2 and chunk_size is None
    if cached:
        n_jac = total_n
    else:
        row_chunks = math.ceil(n1 / c_jac)
        n_jac = n1 + (m2 * (row_chunks + 1) / 2 if sym else m2 * row_chunks)
    cost_jac = (2.0 * O + n_groups) * F * n_jac + n1 * m2 * pair
    # NTK-vector products: b unit columns per block (b·P tangent numbers), r rows of x1 per jvp call
    b_vp = chunk_size or max(1, min(m2 * O, (budget // 2) // max(n_params, 1)))
    r_vp = max(1, min(n1, (budget // 2) // (b_vp * (A + O))))
    cost_vp = 3.0 * F * m2 * O + 3.0 * F * n1 * m2 * O
    vp_least = n_params + A + O  # one tangent column and one row's jvp
    vp_fits = chunk_size is not None or vp_least <= budget
    if strategy == "auto":
        strategy = "jacobian" if jac_fits and (cost_jac <= cost_vp or not vp_fits) else "ntk_vp"
    if chunk_size is None and not (jac_fits if strategy == "jacobian" else vp_fits):
        least = (2 * O * P if strategy == "jacobian" else vp_least) * itemsize
        what = "2·O·P numbers: two samples' Jacobians" if strategy == "jacobian" else "P + A + O: one tangent"
        raise too_small(f"empirical_ntk ({strategy})", int(memory_budget), least, what)
    if strategy == "jacobian":
        c = min(c_jac, max(n1, m2))
        # x2 = x1 with enough kernel rows: 4×4 blocks, upper triangle only (5/8 of the flops)
        if sym and cached and n1 * O ** (a - 1) >= 4 * SYM_BLOCK:
            c = min(c, math.ceil(n1 / 4))
        return NTKPlan("jacobian", c, c, cost_jac, cost_vp, cached, F, n_params, O, g)
    return NTKPlan("ntk_vp", b_vp, r_vp, cost_jac, cost_vp, False, F, n_params, O, O)


# --------------------------------------------------------------------------- strategies
Chunk = tuple[list[torch.Tensor], list[Factors]]  # plain per-parameter Jacobians, structured site factors


def _jacobian_chunk(
    fm: _NTKModel, x: torch.Tensor, outputs: tuple[int, int] | None = None, taps: Taps | None = None
) -> Chunk:
    """Per-sample Jacobians of a chunk: one ``[c, O, numel]`` tensor per plain parameter (``outputs=(lo,
    hi)``: only those outputs, ``[c, hi − lo, numel]``) and, with ``taps``, for each structured site
    (module ``ntk.structure``) its factors ``δ [c, O, T, d_out]``, ``a [c, T, d_in]`` or, materialised,
    its weight (and bias) Jacobians ``δᵀ a`` (``Σ_t δ``) as further ``[c, O, numel]`` tensors.

    ``vmap(jacrev)`` runs on sub-chunks of ``JACREV_SAMPLES`` samples (large vmapped batches of
    convolution backward are slower per sample on CPU) written into preallocated tensors.
    """
    sites = taps.sites if taps is not None else []
    in_sites = {n for s in sites for n in (s.weight, s.bias) if n}
    plain = [(n, k) for n, k in zip(fm.names, fm.numels) if n not in in_sites]
    p_plain = {n: fm.params[n] for n, _ in plain}
    p_sites = {n: fm.params[n] for n in in_sites}
    eps = {s.module: torch.zeros(s.out_shape, dtype=fm.dtype, device=fm.device) for s in sites}

    def fn(p: dict[str, torch.Tensor], e: dict[str, torch.Tensor], xi: torch.Tensor) -> Any:
        if taps is None:
            out, inputs = fm.single(p, xi), {}
        else:
            out, inputs = taps.call(lambda: fm.single({**p_sites, **p}, xi), e)
        return (out if outputs is None else out[outputs[0] : outputs[1]]), inputs

    c = input_count(x)
    out: list[torch.Tensor] | None = None
    for lo in range(0, c, JACREV_SAMPLES):
        xs = slice_inputs(x, slice(lo, lo + JACREV_SAMPLES))
        b = input_count(xs)
        (jp, je), inputs = vmap(jacrev(fn, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0))(
            p_plain, eps, xs
        )
        parts = [jp[n].reshape(b, -1, k) for n, k in plain]
        mats = []
        for s in sites:
            delta, acts = s.deltas(je[s.module], b), s.acts(inputs[s.module], b)
            if s.factored:
                parts += [delta, acts]
                continue
            mats.append(torch.matmul(delta.transpose(2, 3), acts[:, None]).reshape(b, delta.shape[1], -1))
            if s.bias is not None:
                mats.append(delta.sum(2))
        parts += mats
        if lo == 0 and b == c:
            out = parts
            break
        if out is None:
            out = [torch.empty((c, *p.shape[1:]), dtype=p.dtype, device=p.device) for p in parts]
        for buf, p in zip(out, parts):
            buf[lo : lo + b] = p
    assert out is not None
    n, fs = len(plain), [s for s in sites if s.factored]
    factors = [Factors(out[n + 2 * i], out[n + 2 * i + 1], s.bias is not None) for i, s in enumerate(fs)]
    return out[:n] + out[n + 2 * len(fs) :], factors


def _contract(J1: Chunk, J2: Chunk, traced: bool) -> torch.Tensor:
    """Σ over parameter tensors of ``J1 J2ᵀ`` plus the structured sites' blocks: ``[c1, c2]`` (traced)
    or ``[c1·O, c2·O]`` (full)."""
    out = None
    for a, b in zip(J1[0], J2[0]):
        if traced:
            blk = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
        else:
            blk = a.reshape(-1, a.shape[2]) @ b.reshape(-1, b.shape[2]).T
        out = blk if out is None else out + blk
    for f1, f2 in zip(J1[1], J2[1]):
        blk = contract_site(f1, f2, traced)
        out = blk if out is None else out + blk
    assert out is not None
    return out


def _ntk_jacobian(
    fm: _NTKModel,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    O: int,
    traced: bool,
    plan: NTKPlan,
    taps: Taps | None = None,
    outputs: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The kernel from Jacobian chunks (``plan.chunk_size`` samples each, cached when ``plan.cached``) of the
    ``outputs`` range (all when ``None``); a traced kernel ``Σ_o J_o J_oᵀ`` whose Jacobians would not fit is
    summed over groups of ``plan.output_chunk`` outputs."""
    g = plan.output_chunk
    if outputs is None and traced and g < O:
        groups = [(lo, min(lo + g, O)) for lo in range(0, O, g)]
        blocks = (_ntk_jacobian(fm, x1, x2, O, traced, plan, taps, o) for o in groups)
        return functools.reduce(torch.add, blocks)  # summed group by group: one block held at a time
    sym = x2 is None
    xs2 = x1 if sym else x2
    assert xs2 is not None
    n1, n2, c = input_count(x1), input_count(xs2), plan.chunk_size
    w = 1 if traced else O
    K = torch.empty(n1 * w, n2 * w, dtype=fm.dtype, device=fm.device)
    rows = [(lo, min(lo + c, n1)) for lo in range(0, n1, c)]
    cols = rows if sym else [(lo, min(lo + c, n2)) for lo in range(0, n2, c)]

    def jac(x: Inputs, lo: int, hi: int) -> Chunk:
        return _jacobian_chunk(fm, slice_inputs(x, slice(lo, hi)), outputs, taps)

    cache1 = [jac(x1, lo, hi) for lo, hi in rows] if plan.cached else None
    cache2 = cache1 if sym else ([jac(xs2, lo, hi) for lo, hi in cols] if plan.cached else None)
    for i, (lo1, hi1) in enumerate(rows):
        J1 = cache1[i] if cache1 is not None else jac(x1, lo1, hi1)
        for j, (lo2, hi2) in enumerate(cols):
            if sym and j < i:
                continue
            if sym and j == i:
                J2 = J1
            else:
                J2 = cache2[j] if cache2 is not None else jac(xs2, lo2, hi2)
            blk = _contract(J1, J2, traced)
            K[lo1 * w : hi1 * w, lo2 * w : hi2 * w] = blk
            if sym and j > i:
                K[lo2 * w : hi2 * w, lo1 * w : hi1 * w] = blk.T
    if sym:
        K = 0.5 * (K + K.T)  # exact symmetry (diagonal blocks are symmetric up to rounding)
    return K


def _tangents(fm: _NTKModel, x2: torch.Tensor, cols: torch.Tensor, O: int) -> dict[str, torch.Tensor]:
    """``J2ᵀ e`` for unit columns ``e`` with flat indices ``cols`` (sample ``c // O``, output ``c % O``)."""
    xs = slice_inputs(x2, cols // O)
    E = torch.nn.functional.one_hot(cols % O, O).to(fm.dtype)

    def one(x: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pull = vjp(lambda p: fm.single(p, x), fm.params)
        return pull(e)[0]

    return vmap(one)(xs, E)


def _ntk_vp(
    fm: _NTKModel, x1: torch.Tensor, x2: torch.Tensor | None, O: int, traced: bool, plan: NTKPlan
) -> torch.Tensor:
    xs2 = x1 if x2 is None else x2
    n1, n2 = input_count(x1), input_count(xs2)
    b, r = plan.chunk_size, plan.row_chunk
    w = 1 if traced else O
    K = torch.zeros(n1 * w, n2 * w, dtype=fm.dtype, device=fm.device)
    for lo in range(0, n2 * O, b):
        cols = torch.arange(lo, min(lo + b, n2 * O), device=fm.device)
        T = _tangents(fm, xs2, cols, O)  # {name: [b, *shape]}
        for rlo in range(0, n1, r):
            xr = slice_inputs(x1, slice(rlo, rlo + r))
            rhi = rlo + input_count(xr)

            def push(t: dict[str, torch.Tensor], xr: torch.Tensor = xr) -> torch.Tensor:
                return jvp(lambda p: fm.batch(p, xr), (fm.params,), (t,))[1]

            out = vmap(push)(T)  # [b, r, O]: out[c, i, o] = Θ[(i, o), col c]
            if traced:  # Θ_tr[i, j] = Σ_o Θ[(i, o), (j, o)]: keep output o_c of column c, add into j_c
                vals = out[torch.arange(cols.numel(), device=fm.device), :, cols % O]  # [b, r]
                K[rlo:rhi].index_add_(1, cols // O, vals.T)
            else:
                K[rlo * O : rhi * O, lo : lo + cols.numel()] = out.reshape(cols.numel(), -1).T
    if x2 is None:
        K = 0.5 * (K + K.T)
    return K


def per_example_jacobians(fm: _NTKModel, x: Inputs) -> torch.Tensor:
    """``[n, O, P]``: each sample's Jacobian by a plain ``jacrev`` (no ``vmap`` over samples) — the
    fallback for models whose ops have no batching rule for ``vmap(jacrev)`` / batched ``jvp``
    (``nn.GRU``/``nn.LSTM`` in eval mode)."""
    rows = []
    for i in range(input_count(x)):
        xi = slice_inputs(x, i)
        J = jacrev(lambda p, xi=xi: fm.single(p, xi))(fm.params)
        rows.append(torch.cat([J[n].reshape(J[n].shape[0], -1) for n in fm.names], dim=1))
    return torch.stack(rows)


def _ntk_per_example(
    fm: _NTKModel, x1: Inputs, x2: Inputs | None, O: int, traced: bool, memory_budget: int
) -> torch.Tensor:
    """The kernel from :func:`per_example_jacobians` (memory ``(N1 + N2)·O·P`` numbers, checked
    against ``memory_budget``)."""
    n = input_count(x1) + (input_count(x2) if x2 is not None else 0)
    need = n * O * fm.size * torch.empty((), dtype=fm.dtype).element_size()
    if need > memory_budget:
        raise too_small("empirical_ntk (per-example Jacobian fallback)", memory_budget, need,
                        "every per-example Jacobian, N·O·P numbers; or use fewer samples")  # fmt: skip
    J1 = per_example_jacobians(fm, x1)
    J2 = J1 if x2 is None else per_example_jacobians(fm, x2)
    if traced:
        K = torch.einsum("iop,jop->ij", J1, J2)
    else:
        K = J1.reshape(-1, fm.size) @ J2.reshape(-1, fm.size).T
    return 0.5 * (K + K.T) if x2 is None else K


def _vmap_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failure of the vmapped Jacobian / batched jvp path that per-example jacrev may
    avoid (not out of memory)."""
    oom = isinstance(err, torch.OutOfMemoryError)
    return isinstance(err, (RuntimeError, NotImplementedError)) and not oom


def _fallback_note(strategy: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{strategy} failed ({type(err).__name__}: {first[:200]}); per-example jacrev used instead"


# --------------------------------------------------------------------------- public API
def _with_derivative_hint(tried: str) -> Callable[[F], F]:
    """Re-raise a missing-derivative error of the wrapped function once, naming the op and ``tried``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (RuntimeError, NotImplementedError) as e:
                hint = derivative_error(e, tried)
                if hint is None:
                    raise
                raise hint from e

        return run  # type: ignore[return-value]

    return wrap


F = TypeVar("F", bound=Callable[..., Any])


def _check_same_kind(x1: Any, x2: Any) -> None:
    """``x1`` and ``x2`` must agree in per-sample shape and dtype (input by input for dict inputs)."""
    t1, t2 = input_tensors(x1), input_tensors(x2)
    if {k: v.shape[1:] for k, v in t1.items()} != {k: v.shape[1:] for k, v in t2.items()}:
        raise ValueError(
            f"x1 and x2 must have the same per-sample shape; got "
            f"{[tuple(v.shape[1:]) for v in t1.values()]} and {[tuple(v.shape[1:]) for v in t2.values()]}"
        )
    if [v.dtype for v in t1.values()] != [v.dtype for v in t2.values()]:
        dt1, dt2 = [v.dtype for v in t1.values()], [v.dtype for v in t2.values()]
        raise TypeError(f"x1 and x2 must have the same dtype; got {dt1[0] if len(dt1) == 1 else dt1} and "
                        f"{dt2[0] if len(dt2) == 1 else dt2}")  # fmt: skip


def _checked_sites(fm: Any, x1: torch.Tensor, O: int, traced: bool, mode: str) -> list[Site]:
    """The ``nn.Linear`` / ``nn.Conv2d`` sites whose Jacobians are built from layer inputs and output
    gradients (:func:`find_sites`), kept only when they reproduce the plain Jacobian on the first sample
    (decided before planning, so the plan's memory bound fits what runs); none where ``vmap(jacrev)`` fails
    (the plain path then falls back too)."""
    with ModeGuard(fm.model, mode):
        sites = find_sites(fm.model, set(fm.names), x1, lambda xb: fm.batch(fm.params, xb), O, traced)
        try:
            if sites and not _structure_agrees(fm, slice_inputs(x1, slice(0, 1)), sites, O):
                return []
        except (RuntimeError, NotImplementedError) as err:
            if not _vmap_failure(err):
                raise
            return []
    return sites


@_with_derivative_hint("the NTK's Jacobian (jacrev/vmap) and ntk_vp (jvp) strategies")
def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    reduce_outputs: str | None = "trace",
    strategy: str = "auto",
    chunk_size: int | None = None,
    mode: str = "eval",
    params: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
    structured: bool = True,
    return_plan: bool = False,
    max_memory: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, NTKPlan]:
    """Empirical NTK ``Θ(x, x') = J(x) J(x')ᵀ`` between ``x1 [N1, ...]`` and ``x2 [N2, ...]`` (default x1).

    ``reduce_outputs="trace"`` gives ``[N1, N2]`` with ``Σ_o Θ_oo``; ``None`` the full sample-major
    ``[N1·O, N2·O]`` kernel. ``strategy``: ``"jacobian"``, ``"ntk_vp"`` or ``"auto"`` (module docstring);
    ``chunk_size``: samples per Jacobian chunk / unit columns per tangent block (default from
    ``memory_budget`` bytes, module docstring; ``max_memory``: its deprecated name). ``params`` restricts θ
    to a parameter block; ``mode="eval"`` (default) uses
    BatchNorm running statistics. ``structured`` (Jacobian contraction only): build the Jacobians of
    ``nn.Linear`` / ``nn.Conv2d`` weights from the layers' inputs and output gradients, factored where
    that is cheaper (module ``ntk.structure``);
    checked against plain Jacobians on the first sample, with a warning and plain Jacobians if they
    differ. Returns a tensor of the model's dtype on its device (or ``device``); with
    ``return_plan=True`` also the :class:`NTKPlan` used (``plan.structured`` names the sites).
    """
    if reduce_outputs not in REDUCTIONS:
        raise ValueError(f"reduce_outputs must be 'trace' or None; got {reduce_outputs!r}")
    budget = ntk_budget(memory_budget, max_memory, device)
    fm = _NTKModel(model, params=params, mode=mode, device=device)
    x1 = fm.prepare(x1, "x1")
    if x2 is not None:
        x2 = fm.prepare(x2, "x2")
        _check_same_kind(x1, x2)
    O = fm.output_dim(x1)
    flops, acts = fm.profile(x1)
    traced = reduce_outputs == "trace"
    use_sites = structured and strategy != "ntk_vp" and isinstance(x1, torch.Tensor)
    sites = _checked_sites(fm, x1, O, traced, mode) if use_sites else []
    in_sites = {n for s in sites for n in (s.weight, s.bias) if n}
    plain_size = sum(k for n, k in zip(fm.names, fm.numels) if n not in in_sites)
    plan = plan_ntk(
        input_count(x1),
        None if x2 is None else input_count(x2),
        O,
        fm.size,
        flops_per_sample=flops,
        activations_per_sample=acts,
        traced=traced,
        itemsize=torch.empty((), dtype=fm.dtype).element_size(),
        strategy=strategy,
        chunk_size=chunk_size,
        memory_budget=budget,
        jacobian_numbers=plain_size + sum(-(-s.numbers_per_sample(O) // O) for s in sites),
        pair_flops=2.0 * O ** (1 if traced else 2) * plain_size + sum(s.pair_flops(O, traced) for s in sites),
    )
    with ModeGuard(fm.model, mode):
        try:
            if plan.strategy == "ntk_vp":
                K = _ntk_vp(fm, x1, x2, O, traced, plan)
            elif not sites:
                K = _ntk_jacobian(fm, x1, x2, O, traced, plan)
            else:
                plan = dataclasses.replace(
                    plan,
                    structured=tuple(s.module for s in sites),
                    factored=tuple(s.module for s in sites if s.factored),
                )
                taps = Taps(fm.model, sites)
                with taps.installed():
                    K = _ntk_jacobian(fm, x1, x2, O, traced, plan, taps)
        except (RuntimeError, NotImplementedError) as err:
            if not _vmap_failure(err):
                raise
            note = _fallback_note(plan.strategy, err)
            K = _ntk_per_example(fm, x1, x2, O, traced, budget)  # raises the same way if it fails too
            warnings.warn(f"empirical_ntk: {note} (plan.fallback)", RuntimeWarning, stacklevel=3)
            plan = dataclasses.replace(plan, strategy="per_example_jacrev", structured=(), factored=(),
                                       fallback=note)  # fmt: skip
    K = K.detach()
    if "attention" in fm.kernel_meta():
        plan = dataclasses.replace(plan, attention=fm.kernel_meta()["attention"])
    return (K, plan) if return_plan else K


def _structure_agrees(fm: _NTKModel, x: torch.Tensor, sites: list[Site], n_outputs: int) -> bool:
    """Compare ``Σ_{o<2} Θ(x, x)_oo`` (one sample) from structured factors with plain Jacobians; warn if
    they differ (e.g. a Linear weight also used outside its module's forward)."""
    outs = (0, min(2, n_outputs))  # two outputs bound the plain Jacobian's memory by 2·P numbers
    taps = Taps(fm.model, sites)
    with taps.installed():
        structured = _contract(*[_jacobian_chunk(fm, x, outs, taps)] * 2, traced=True)
    plain = _contract(*[_jacobian_chunk(fm, x, outs)] * 2, traced=True)
    tol = 1e3 * torch.finfo(fm.dtype).eps * float(plain.abs().max())
    if float((structured - plain).abs().max()) <= tol:
        return True
    warnings.warn(
        "structured Linear/Conv2d NTK contributions disagree with plain Jacobians on the first sample "
        f"(sites {[s.module for s in sites]}; a weight used outside its module?): using plain Jacobians",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


class NTKOperator(LinearOperator):
    """The empirical NTK of a fixed data set ``x [N, ...]`` as a matrix-free symmetric operator.

    Full kernel (size ``N·O``, sample-major): ``Θ v = J (Jᵀ v)``, with ``Jᵀ v`` one vector-Jacobian
    product per batch (summed over batches) and ``J u`` one forward-mode ``jvp`` per batch.
    Traced kernel (size ``N``): ``Θ_tr v = Σ_o J_o (J_oᵀ v)``, the O output channels batched with ``vmap``.
    ``matmat`` with K columns costs about ``5·F·N·K`` (full) or ``5·F·N·K·O`` (traced) flops and
    ``K·P`` (full) or ``K·O·P`` (traced) numbers of memory per batch of ``batch_size`` samples.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        *,
        reduce_outputs: str | None = "trace",
        batch_size: int | None = None,
        mode: str = "eval",
        params: Sequence[str] | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if reduce_outputs not in REDUCTIONS:
            raise ValueError(f"reduce_outputs must be 'trace' or None; got {reduce_outputs!r}")
        check_int("batch_size", batch_size, min=1, optional=True)
        self.fm = _NTKModel(model, params=params, mode=mode, device=device)
        self.x = self.fm.prepare(x, "x")
        self.n_outputs = self.fm.output_dim(self.x)
        self.traced = reduce_outputs == "trace"
        self.mode = mode
        n = input_count(self.x)
        self.batch_size = batch_size or n
        self.fallback: str | None = None  # set when batched products failed (per-example jacrev kernel)
        self._dense: torch.Tensor | None = None
        super().__init__(n if self.traced else n * self.n_outputs, self.fm.dtype, self.fm.device)

    def _batches(self) -> list[tuple[int, int]]:
        n = input_count(self.x)
        return [(lo, min(lo + self.batch_size, n)) for lo in range(0, n, self.batch_size)]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            try:
                return self._products(V)
            except (RuntimeError, NotImplementedError) as err:
                if not _vmap_failure(err):
                    raise
                self.fallback = _fallback_note("batched vjp/jvp products", err)
                warnings.warn(
                    f"NTKOperator: {self.fallback} (meta['ntk_fallback'])", RuntimeWarning, stacklevel=3
                )
                with ModeGuard(self.fm.model, self.mode):
                    fm, n_out = self.fm, self.n_outputs
                    self._dense = _ntk_per_example(fm, self.x, None, n_out, self.traced, 1 << 62)
        return self._dense @ V

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        fm, O, K = self.fm, self.n_outputs, V.shape[1]
        n = input_count(self.x)
        # cotangents [C, N, O]: full -> C = K columns reshaped; traced -> C = K·O (column k on output o)
        if self.traced:
            eye = torch.eye(O, dtype=V.dtype, device=V.device)
            cot = (V.T[:, None, :, None] * eye[None, :, None, :]).reshape(K * O, n, O)
        else:
            cot = V.T.reshape(K, n, O)
        with ModeGuard(fm.model, self.mode):
            tang: dict[str, torch.Tensor] | None = None
            for lo, hi in self._batches():
                xb = slice_inputs(self.x, slice(lo, hi))
                _, pull = vjp(lambda p, xb=xb: fm.batch(p, xb), fm.params)
                u = vmap(lambda c, pull=pull: pull(c)[0])(cot[:, lo:hi])
                tang = u if tang is None else {k: tang[k] + u[k] for k in tang}
            assert tang is not None
            outs = []
            for lo, hi in self._batches():
                xb = slice_inputs(self.x, slice(lo, hi))
                outs.append(
                    vmap(lambda t, xb=xb: jvp(lambda p: fm.batch(p, xb), (fm.params,), (t,))[1])(tang)
                )
            out = torch.cat(outs, dim=1)  # [C, N, O]
        if self.traced:
            return out.reshape(K, O, n, O).diagonal(dim1=1, dim2=3).sum(-1).T.detach()
        return out.reshape(K, n * O).T.detach()

    def trace(
        self, chunk_size: int | None = None, memory_budget: int = DEFAULT_MAX_MEMORY, *,
        max_memory: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Exact ``tr Θ = Σ_i ‖J(x_i)‖_F²`` (same for the full and traced kernel), from per-sample
        Jacobians in chunks of ``c = memory_budget / (O·P·itemsize)`` samples (``max_memory``: deprecated
        name); a 0-d tensor on the operator's device."""
        memory_budget = _deprecated_alias(memory_budget, max_memory, DEFAULT_MAX_MEMORY)
        fm, O = self.fm, self.n_outputs
        if self._dense is not None:
            return self._dense.double().trace()
        c = chunk_size or max(1, memory_budget // (self.dtype.itemsize * O * fm.size))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with ModeGuard(fm.model, self.mode):
            try:
                for lo in range(0, input_count(self.x), c):
                    for J in _jacobian_chunk(fm, slice_inputs(self.x, slice(lo, lo + c)))[0]:
                        total = total + J.double().pow(2).sum()
            except (RuntimeError, NotImplementedError) as err:
                if not _vmap_failure(err):
                    raise
                self.fallback = self.fallback or _fallback_note("vmap(jacrev) for the trace", err)
                total = per_example_jacobians(fm, self.x).double().pow(2).sum()
        return total
