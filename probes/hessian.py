"""Top eigenvalues of the Hessian / GGN / Fisher, and per-layer (block) spectra.

:func:`hessian_eigenvalues` runs Lanczos with full reorthogonalisation
(:func:`~dynascope.probes.lanczos.eigsh`) on the curvature operator of the dataset-mean loss
``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)``. A Ritz pair ``(θ, u)`` is *converged* when its residual
``‖A u − θ u‖ ≤ tol · max(|θ|, 10⁻³ ‖T‖)``; the eigenvalue error is then at most of the order of
``residual² / gap`` (far below ``tol``).

With ``refine`` the float Ritz vectors ``Y`` (``[P, k]``) of a low-precision run get one
Rayleigh–Ritz step in float64: ``Y`` is orthonormalised in float64 (``Q``), ``Z = H₆₄ Q`` is one
``matmat`` (``k`` products) with a float64 copy of the operator, and the eigenpairs ``(θ, w)`` of
``Qᵀ Z`` give the values ``θ`` (error quadratic in the angle between ``span Y`` and the eigenvectors),
vectors ``u = Q w`` and true float64 residuals ``‖Z w − θ u‖``. On CPU those float64 products run
their ``conv2d`` calls as a gather and one matrix product
(:class:`~dynascope.probes.gemm_conv.Float64GemmConv`, same values to float64 rounding): PyTorch's
native float64 CPU convolution loops over samples and made the step ~1.5x slower on a small CNN.
The ``k`` products are the minimum: a symmetric ``Qᵀ H Q`` is determined by ``H`` on all of
``span Q``. The float32 Lanczos keeps its residual stopping rule: the refined values' error is
``~ residual² / gap`` of the float32 Ritz vectors, but Lanczos converges superlinearly, so a looser
rule saves few products (measured: 13 instead of 14 on the benchmark CNN, at 2.5e-6 instead of
2.1e-9 refined error).

:func:`layerwise_hessian` applies the same probes to the diagonal blocks ``H_ℓℓ`` of each
parameter group (the principal submatrix for that layer's parameters, the other layers held fixed).
The block traces sum to the full trace; block eigenvalues are *not* eigenvalues of ``H``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .curvature_setup import RecordingOperator, spec_settings, spectral_meta, takes_operator_spec
from .functional import parameter_groups, select_parameters
from .gemm_conv import Float64GemmConv
from .lanczos import EIGENVALUE_FLOOR, WHICH, eigsh
from .memory import peak_memory
from .operators import OperatorSpec
from .results import Result, make_meta, to_jsonable
from .validation import check_choice, check_float, check_int


@dataclass(frozen=True, kw_only=True)
class HessianEigenResult(Result):
    """Extremal eigenpairs of a curvature operator.

    ``values`` float64, descending; ``residuals`` ``‖A u − θ u‖``; ``converged`` bool per value;
    ``n_matvecs`` operator-vector products (Lanczos plus, when refined, the float64 refinement
    products, also in ``meta["n_matvecs_refine"]``); ``vectors`` ``[P, k]`` unit eigenvectors
    (operator dtype; float64 when refined) or ``None``. ``to_dict``/``save`` leave the vectors out
    (``to_dict(include=["vectors"])`` keeps them).
    """

    omitted: ClassVar[tuple[str, ...]] = ("vectors",)
    values: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    vectors: torch.Tensor | None = None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "index": list(range(1, self.values.numel() + 1)),
                "eigenvalue": self.values.tolist(),
                "residual": self.residuals.tolist(),
                "converged": self.converged.tolist(),
            }
        )


def _warm_start(v0: Any) -> torch.Tensor | None:
    if v0 is None:
        return None
    if isinstance(v0, HessianEigenResult):
        if v0.vectors is None:
            raise ValueError(
                "v0: the previous result has no vectors (it was computed with return_vectors=False)"
            )
        return v0.vectors
    if isinstance(v0, torch.Tensor):
        return v0
    raise TypeError(
        f"v0 must be a HessianEigenResult, a [P] or [P, j] tensor, or None; got {type(v0).__name__}"
    )


LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
REFINE_AUTO_TOL = 1e-5


def _use_refine(refine: bool | str, op_dtype: torch.dtype, tol: float) -> bool:
    """``"auto"``: refine a low-precision operator (float32/bfloat16/float16) when ``tol ≤ 1e-5``."""
    if isinstance(refine, bool):
        return refine
    if refine == "auto":
        return op_dtype in LOW_PRECISION and tol <= REFINE_AUTO_TOL
    raise ValueError(f"refine must be True, False or 'auto'; got {refine!r}")


@dataclass(frozen=True)
class RitzRefinement:
    """Output of :func:`rayleigh_ritz64`: ``values`` (float64, descending, CPU), ``vectors`` ``[P, j]``
    float64 orthonormal, ``residuals`` ``‖A u − θ u‖`` (float64, CPU), ``n_matvecs`` products used,
    ``n_conv2d_gemm`` float64 ``conv2d`` calls served by :func:`~dynascope.probes.gemm_conv.conv2d_gemm`."""

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    n_conv2d_gemm: int = 0


def rayleigh_ritz64(op64: Any, Y: torch.Tensor) -> RitzRefinement:
    """One float64 Rayleigh–Ritz step of ``op64`` on ``span Y`` (``Y`` ``[P, j]``, any dtype).

    ``Q = qr(Y₆₄)``, ``Z = A Q`` (``j`` products), ``Qᵀ Z = W diag(θ) Wᵀ``; returns ``θ`` (descending),
    ``U = Q W`` and residuals ``‖Z W − U diag(θ)‖`` per column (exact for ``U``, no further products).
    Float64 CPU ``conv2d`` calls inside the products go through :class:`Float64GemmConv`.
    """
    sp = op64.vspace  # inner products summed over ranks on a sharded operator (:mod:`.space`)
    Q, _ = sp.qr(Y.to(device=op64.device, dtype=torch.float64))
    before = op64.n_matvecs
    with Float64GemmConv() as conv:  # the native float64 CPU conv2d loops over samples
        Z = op64.matmat(Q).to(torch.float64)
    M = sp.reduce(Q.T @ Z)
    theta, W = torch.linalg.eigh(0.5 * (M + M.T))
    order = torch.argsort(theta, descending=True)
    theta, W = theta[order], W[:, order]
    U = Q @ W
    residuals = sp.norms(Z @ W - U * theta)
    return RitzRefinement(theta.cpu(), U, residuals.cpu(), op64.n_matvecs - before, conv.n_redirected)


@dataclass(frozen=True)
class Eigenpairs:
    """What :func:`solve_eigenpairs` found: the result's fields (``values``, ``residuals``, ``converged``,
    ``vectors``, ``n_matvecs``) and the Lanczos run's ``out`` (its own residuals and counts, for ``meta``)."""

    values: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    vectors: torch.Tensor | None
    n_matvecs: int
    out: Any
    refinement: RitzRefinement | None = None

    def meta(self, op: Any) -> dict[str, Any]:
        """The solver's and the refinement's keys of ``.meta``."""
        ref = self.refinement
        return {
            "krylov_dim": self.out.n_iter, **self.out.meta(op.size, op.dtype),
            "all_converged": bool(self.converged.all()), "refined": ref is not None,
            "n_matvecs_refine": ref.n_matvecs if ref else 0,
            "lanczos_residuals": self.out.residuals.tolist() if ref else None,
            "refine_conv2d_gemm": ref.n_conv2d_gemm if ref else 0,
        }  # fmt: skip


def solve_eigenpairs(
    op: Any, spec: OperatorSpec, model: nn.Module, data: Any, *, k: int, tol: float,
    refine: bool | str = "auto", return_vectors: bool = True, **solver: Any,
) -> Eigenpairs:  # fmt: skip
    """Block Lanczos (:func:`~dynascope.probes.lanczos.eigsh`, keywords ``solver``) on ``op`` (the operator of
    ``spec`` on ``model`` and ``data``, possibly wrapped), then, when :func:`_use_refine` says so, one float64
    Rayleigh–Ritz step (:func:`rayleigh_ritz64`) with the spec's float64 operator; a refined pair ``(θ, u)``
    is converged when ``‖A u − θ u‖ ≤ tol · max(|θ|, floor · scale)`` (the solver's rule, on the float64
    residuals). The arguments are the caller's, already checked (``eigsh`` checks its own)."""
    do_refine = _use_refine(refine, op.dtype, tol)
    out = eigsh(op, k=k, tol=tol, return_vectors=return_vectors or do_refine, **solver)
    if not do_refine:
        return Eigenpairs(out.values, out.residuals, out.converged, out.vectors, out.n_matvecs, out)
    assert out.vectors is not None
    op64 = op if op.dtype == torch.float64 else spec.replace(dtype=torch.float64).build(model, data)
    ref = rayleigh_ritz64(op64, out.vectors)
    scale = max(float(ref.values.abs().max()), float(out.values.abs().max())) or 1.0
    converged = ref.residuals <= tol * torch.clamp(ref.values.abs(), min=EIGENVALUE_FLOOR * scale)
    vectors = ref.vectors if return_vectors else None
    return Eigenpairs(ref.values, ref.residuals, converged, vectors, out.n_matvecs + ref.n_matvecs, out, ref)


@takes_operator_spec()
def hessian_eigenvalues(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    k: int = 5,
    tol: float = 1e-4,
    which: str = "LA",
    v0: Any = None,
    max_iter: int | None = None,
    seed: int = 0,
    return_vectors: bool = True,
    check_determinism: bool = True,
    refine: bool | str = "auto",
    block_size: int | None = None,
    max_basis: int | None = None,
    solver: str = "auto",
    memory_budget: int | None = None,
) -> HessianEigenResult:
    """Extremal eigenvalues of the Hessian (``operator="hessian"``), GGN or empirical Fisher.

    ``spec``: the operator (:class:`~dynascope.probes.operators.OperatorSpec`), or its fields as keywords
    (``loss``, ``operator``, ``output``, ``params``, ``batch_size``, ``mode``, ``dtype``, ``device``,
    ``reduce_fn``). ``which``: ``"LA"`` largest (default), ``"SA"`` smallest, ``"LM"`` largest magnitude,
    ``"BE"`` ``k`` from both ends (``2k`` values). ``v0``: a warm start — a previous
    :class:`HessianEigenResult` (its eigenvectors, e.g. from the previous checkpoint) or a ``[P]`` /
    ``[P, j]`` tensor. ``dtype=torch.float64`` evaluates reference-grade products on a copy of the
    model; otherwise products run in the model's dtype. ``params`` restricts to a parameter block.
    ``max_iter``: the most operator-vector products Lanczos may use (a budget of products, not of
    iterations; default ``max(300, 60 k)``; the float64 refinement's ``k`` products come on top).

    ``refine``: after Lanczos, one float64 Rayleigh–Ritz step on the Ritz vectors (``k`` float64
    products on a float64 copy of the model, see the module docstring); values, vectors and
    residuals are then the refined float64 ones and ``converged`` is judged on the float64
    residuals. ``"auto"`` (default) refines when the products run in float32/bfloat16/float16 and
    ``tol ≤ 1e-5`` — residuals that small are at the level of float32 product rounding, so only a
    float64 check can certify them — and leaves the default ``tol=1e-4`` run unchanged.

    ``block_size`` / ``max_basis``: the block Lanczos's block width and most vectors held (see
    :func:`~dynascope.probes.lanczos.eigsh`; every copy of a repeated eigenvalue is found). Peak
    solver memory at most ``max_basis·P`` numbers; ``meta`` records the vectors held
    (``peak_basis_vectors``, ``solver_memory_bytes``) and the measured peak over the call
    (``measured_peak_bytes``, where the platform reports it: CUDA, Linux).
    ``memory_budget``: bytes of vectors the solver may hold (:mod:`~dynascope.probes.budget`): ``max_basis``
    is then at most ``memory_budget / (P · itemsize) − 2b`` and a budget below ``(k' + 4b)·P·itemsize`` raises
    :class:`~dynascope.probes.budget.MemoryBudgetError`; default: the solver's cap of 768 MiB (or half the
    available memory, if less). ``meta`` records ``memory_budget``, ``memory_formula``, ``budget_binds``.

    ``solver``: ``"auto"`` (default: a dense float64 ``eigh`` of the ``P×P`` matrix built from ``P``
    products when ``k ≥ P/10`` or ``P ≤ 64`` — exact, every copy of a repeated eigenvalue — else block
    Lanczos), ``"lanczos"`` or ``"dense"`` (:func:`~dynascope.probes.lanczos.eigsh`'s ``method``);
    ``meta["eigensolver"]`` says which ran.
    """
    check_int("k", k, min=1)
    check_choice("which", which, WHICH)
    check_float("tol", tol, min=0, min_open=True)
    check_choice("refine", refine, (True, False, "auto"))
    check_int("seed", seed)
    start = _warm_start(v0)
    t0 = time.perf_counter()
    op = spec.build(model, data)
    if start is not None and start.shape[0] != op.size:
        raise ValueError(f"v0 has {start.shape[0]} rows but the parameter block has {op.size} entries")
    rec = RecordingOperator(op)
    with peak_memory(op.device) as peak:
        pairs = solve_eigenpairs(
            rec, spec, model, data, k=k, tol=float(tol), refine=refine, return_vectors=return_vectors,
            which=which, max_iter=max_iter, v0=start, seed=seed, block_size=block_size, max_basis=max_basis,
            method=solver, memory_budget=memory_budget,
        )  # fmt: skip
    settings = {"k": k, "tol": tol, "which": which, "max_iter": max_iter,
                **spec_settings(spec),
                "warm_start": start is not None, "refine": refine, "block_size": block_size,
                "max_basis": max_basis, "solver": solver, "memory_budget": memory_budget}  # fmt: skip
    meta = spectral_meta(
        "hessian_eigenvalues", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism, **pairs.meta(op), measured_peak_bytes=peak.bytes,
        measured_peak_how=peak.how,
    )  # fmt: skip
    meta["n_matvecs"] = pairs.n_matvecs
    return HessianEigenResult(
        values=pairs.values, residuals=pairs.residuals, converged=pairs.converged, n_matvecs=pairs.n_matvecs,
        vectors=pairs.vectors, meta=meta,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ per layer
@dataclass(frozen=True, kw_only=True)
class LayerwiseHessianResult(Result):
    """Per-block spectra: one entry per parameter group (layer).

    ``layers`` names; ``n_params`` block sizes; ``eigenvalues`` ``[L, k]`` top eigenvalues of each
    diagonal block (descending; NaN-padded if a block has fewer than ``k`` parameters);
    ``converged`` ``[L, k]``; ``trace`` / ``trace_stderr`` ``[L]`` (NaN when not computed);
    ``densities`` {layer: DensityResult} when requested; ``n_matvecs`` per block.
    """

    layers: list[str]
    n_params: list[int]
    eigenvalues: torch.Tensor
    converged: torch.Tensor
    trace: torch.Tensor
    trace_stderr: torch.Tensor
    n_matvecs: list[int]
    densities: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            f.name: to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "densities"
        }
        out["densities"] = (
            None if self.densities is None else {k: v.to_dict() for k, v in self.densities.items()}
        )
        return out

    def to_frame(self):
        """One row per layer: ``layer, n_params, lambda_1..lambda_k, converged, trace, trace_stderr,
        trace_per_param, n_matvecs``."""
        import pandas as pd

        rows = []
        for i, name in enumerate(self.layers):
            row: dict[str, Any] = {"layer": name, "n_params": self.n_params[i]}
            for j in range(self.eigenvalues.shape[1]):
                row[f"lambda_{j + 1}"] = float(self.eigenvalues[i, j])
            row["converged"] = bool(self.converged[i].all())
            row["trace"] = float(self.trace[i])
            row["trace_stderr"] = float(self.trace_stderr[i])
            row["trace_per_param"] = float(self.trace[i]) / self.n_params[i]
            row["n_matvecs"] = self.n_matvecs[i]
            rows.append(row)
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class _Block:
    """One diagonal block's row of :class:`LayerwiseHessianResult` and its operator's ``.meta`` keys."""

    eigenvalues: torch.Tensor
    converged: torch.Tensor
    trace: float
    trace_stderr: float
    n_matvecs: int
    density: Any
    op_meta: dict[str, Any]


def _block_spectrum(
    model: nn.Module, data: Any, spec: OperatorSpec, *, k: int, tol: float, seed: int, trace: dict | None,
    density: dict | None, memory_budget: int | None = None,
) -> _Block:  # fmt: skip
    """Top-``k`` eigenvalues of the block ``H_ℓℓ`` of ``spec.params`` (NaN-padded to ``k`` when the block is
    smaller), and, when asked (keywords of :func:`~dynascope.probes.trace.hessian_trace` /
    :func:`~dynascope.probes.density.hessian_density`), its trace and SLQ density."""
    from .density import hessian_density
    from .trace import hessian_trace

    op = spec.build(model, data)
    pairs = solve_eigenpairs(op, spec, model, data, k=min(k, op.size), tol=tol, return_vectors=False,
                             seed=seed, memory_budget=memory_budget)  # fmt: skip
    row = torch.full((k,), float("nan"), dtype=torch.float64)
    crow = torch.zeros(k, dtype=torch.bool)
    row[: pairs.values.numel()] = pairs.values
    crow[: pairs.values.numel()] = pairs.converged
    used, tr, se, dens = pairs.n_matvecs, float("nan"), float("nan"), None
    if trace is not None:
        t = hessian_trace(model, data, spec=spec, seed=seed, check_determinism=False, **trace)
        tr, se, used = t.estimate, t.stderr, used + t.n_matvecs
    if density is not None:
        dens = hessian_density(model, data, spec=spec, seed=seed, check_determinism=False, **density)
        used += dens.n_matvecs
    return _Block(row, crow, tr, se, int(used), dens, op.meta())


@takes_operator_spec("loss", "operator", "batch_size", "mode", "dtype", "device", "reduce_fn")
def layerwise_hessian(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    k: int = 1,
    trace: bool = True,
    density: bool = False,
    tol: float = 1e-4,
    trace_matvecs: int = 30,
    trace_method: str = "hutch++",
    n_probes: int = 5,
    lanczos_steps: int = 40,
    groups: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
) -> LayerwiseHessianResult:
    """Top-``k`` eigenvalues, trace (± stderr) and optionally the SLQ density of each diagonal block.

    ``spec``: the operator, or its fields as keywords (its ``params`` must be unset: the blocks set them).
    ``groups``: {layer name: parameter names or module prefixes}; default
    :func:`~dynascope.probes.operators.parameter_groups` (parameters grouped by owning module).
    ``memory_budget``: bytes of vectors each block's eigensolver, trace estimator and SLQ may hold
    (:mod:`~dynascope.probes.budget`; the formulas of :func:`~dynascope.probes.lanczos.eigsh`,
    :func:`~dynascope.probes.trace.plan_trace` and :data:`~dynascope.probes.density.SLQ_FORMULA`).
    Each block ``H_ℓℓ = ∂²L/∂θ_ℓ²`` is the principal submatrix of the full operator for that layer;
    block ``i`` uses seed ``seed + i``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_int("k", k, min=1)
    check_float("tol", tol, min=0, min_open=True)
    check_int("seed", seed)
    if spec.params is not None:
        raise ValueError(f"layerwise_hessian: spec.params={list(spec.params)} is set; pass groups= instead")
    blocks = dict(groups) if groups is not None else parameter_groups(model)
    if not blocks:
        raise ValueError("no parameter groups to analyse")
    t0 = time.perf_counter()
    tr_kw = {"n_matvecs": trace_matvecs, "method": trace_method, "memory_budget": memory_budget}
    tr_kw = tr_kw if trace else None
    dens_kw = {"n_probes": n_probes, "lanczos_steps": lanczos_steps, "memory_budget": memory_budget}
    dens_kw = dens_kw if density else None
    rows = {
        name: _block_spectrum(model, data, spec.replace(params=list(names)), k=k, tol=float(tol),
                              seed=seed + i, trace=tr_kw, density=dens_kw, memory_budget=memory_budget)
        for i, (name, names) in enumerate(blocks.items())
    }  # fmt: skip
    first = next(iter(rows.values())).op_meta
    shared = {key: first[key] for key in ("loss", "reduction", "n_samples", "dtype", "device", "backend")}
    shared["product_fallbacks"] = [
        f"{n}: {f}" for n, b in rows.items() for f in b.op_meta["product_fallbacks"]
    ]
    sizes = [sum(p.numel() for _, p in select_parameters(model, list(names))) for names in blocks.values()]
    settings = {"k": k, "trace": trace, "density": density, "tol": tol, "trace_matvecs": trace_matvecs,
                "trace_method": trace_method, "n_probes": n_probes, "lanczos_steps": lanczos_steps,
                "groups": {n: list(v) for n, v in blocks.items()},
                "memory_budget": memory_budget}  # fmt: skip
    meta = make_meta(
        "layerwise_hessian", model=model, params=settings, started=t0, operator=spec.kind,
        n_matvecs=sum(b.n_matvecs for b in rows.values()), seed=seed, mode=spec.mode, n_params=sum(sizes),
        **shared, note="blocks are diagonal blocks H_ll (other layers fixed); block traces sum to tr(H)",
    )  # fmt: skip
    return LayerwiseHessianResult(
        layers=list(rows), n_params=[int(n) for n in sizes],
        eigenvalues=torch.stack([b.eigenvalues for b in rows.values()]),
        converged=torch.stack([b.converged for b in rows.values()]),
        trace=torch.tensor([b.trace for b in rows.values()], dtype=torch.float64),
        trace_stderr=torch.tensor([b.trace_stderr for b in rows.values()], dtype=torch.float64),
        n_matvecs=[b.n_matvecs for b in rows.values()],
        densities={n: b.density for n, b in rows.items()} if density else None, meta=meta,
    )  # fmt: skip


__all__ = ["HessianEigenResult", "LayerwiseHessianResult", "hessian_eigenvalues", "layerwise_hessian"]
