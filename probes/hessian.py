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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .curvature_setup import RecordingOperator, spectral_meta
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
    (operator dtype; float64 when refined) or ``None``. ``to_dict``/``save`` leave the vectors out.
    """

    values: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    vectors: torch.Tensor | None = None

    def to_dict(self, include_vectors: bool = False) -> dict[str, Any]:
        out = {
            f.name: to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "vectors"
        }
        if include_vectors:
            out["vectors"] = to_jsonable(self.vectors)
        return out

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


def hessian_eigenvalues(
    model: nn.Module,
    data: Any,
    *,
    k: int = 5,
    loss: str | Callable = "auto",
    tol: float = 1e-4,
    operator: str = "hessian",
    output: Any = None,
    which: str = "LA",
    v0: Any = None,
    max_iter: int | None = None,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    return_vectors: bool = True,
    reduce_fn: Callable | None = None,
    check_determinism: bool = True,
    refine: bool | str = "auto",
    block_size: int | None = None,
    max_basis: int | None = None,
    solver: str = "auto",
) -> HessianEigenResult:
    """Extremal eigenvalues of the Hessian (``operator="hessian"``), GGN or empirical Fisher.

    ``which``: ``"LA"`` largest (default), ``"SA"`` smallest, ``"LM"`` largest magnitude,
    ``"BE"`` ``k`` from both ends (``2k`` values). ``v0``: a warm start — a previous
    :class:`HessianEigenResult` (its eigenvectors, e.g. from the previous checkpoint) or a ``[P]`` /
    ``[P, j]`` tensor. ``dtype=torch.float64`` evaluates reference-grade products on a copy of the
    model; otherwise products run in the model's dtype. ``params`` restricts to a parameter block.

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
    spec = OperatorSpec(kind=operator, loss=loss, output=output, params=params, batch_size=batch_size,
                        mode=mode, dtype=dtype, device=device, reduce_fn=reduce_fn)  # fmt: skip
    start = _warm_start(v0)
    t0 = time.perf_counter()
    op = spec.build(model, data)
    if k > op.vspace.size:
        raise ValueError(f"k={k} exceeds the number of parameters in the block ({op.vspace.size})")
    if start is not None and start.shape[0] != op.size:
        raise ValueError(f"v0 has {start.shape[0]} rows but the parameter block has {op.size} entries")
    do_refine = _use_refine(refine, op.dtype, float(tol))
    rec = RecordingOperator(op)
    with peak_memory(op.device) as peak:
        out = eigsh(rec, k=k, which=which, tol=float(tol), max_iter=max_iter, v0=start, seed=seed,
                    return_vectors=return_vectors or do_refine, block_size=block_size,
                    max_basis=max_basis, method=solver)  # fmt: skip
    values, residuals, converged, vectors = out.values, out.residuals, out.converged, out.vectors
    n_refine, lanczos_residuals, n_conv_gemm = 0, None, 0
    if do_refine:
        assert vectors is not None
        op64 = op if op.dtype == torch.float64 else spec.replace(dtype=torch.float64).build(model, data)
        ref = rayleigh_ritz64(op64, vectors)
        n_refine, lanczos_residuals, n_conv_gemm = ref.n_matvecs, out.residuals.tolist(), ref.n_conv2d_gemm
        values, residuals = ref.values, ref.residuals
        scale = max(float(values.abs().max()), float(out.values.abs().max())) or 1.0
        converged = residuals <= float(tol) * torch.clamp(values.abs(), min=EIGENVALUE_FLOOR * scale)
        vectors = ref.vectors if return_vectors else None
    settings = {"k": k, "tol": tol, "which": which, "max_iter": max_iter, "params": params,
                "batch_size": batch_size, "warm_start": start is not None, "refine": refine,
                "block_size": block_size, "max_basis": max_basis, "solver": solver}  # fmt: skip
    meta = spectral_meta(
        "hessian_eigenvalues", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism, krylov_dim=out.n_iter, **out.meta(op.size, op.dtype),
        measured_peak_bytes=peak.bytes, measured_peak_how=peak.how,
        all_converged=bool(converged.all()), refined=do_refine, n_matvecs_refine=n_refine,
        lanczos_residuals=lanczos_residuals, refine_conv2d_gemm=n_conv_gemm,
    )  # fmt: skip
    meta["n_matvecs"] = out.n_matvecs + n_refine
    return HessianEigenResult(
        values=values,
        residuals=residuals,
        converged=converged,
        n_matvecs=out.n_matvecs + n_refine,
        vectors=vectors,
        meta=meta,
    )


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


def layerwise_hessian(
    model: nn.Module,
    data: Any,
    *,
    k: int = 1,
    trace: bool = True,
    density: bool = False,
    loss: str | Callable = "auto",
    operator: str = "hessian",
    tol: float = 1e-4,
    trace_matvecs: int = 30,
    trace_method: str = "hutch++",
    n_probes: int = 5,
    lanczos_steps: int = 40,
    groups: Mapping[str, Sequence[str]] | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    reduce_fn: Callable | None = None,
    memory_budget: int | None = None,
) -> LayerwiseHessianResult:
    """Top-``k`` eigenvalues, trace (± stderr) and optionally the SLQ density of each diagonal block.

    ``groups``: {layer name: parameter names or module prefixes}; default
    :func:`~dynascope.probes.operators.parameter_groups` (parameters grouped by owning module).
    ``memory_budget``: bytes the per-block trace estimator may hold (:mod:`~dynascope.probes.budget`).
    Each block ``H_ℓℓ = ∂²L/∂θ_ℓ²`` is the principal submatrix of the full operator for that layer.
    """
    from .density import hessian_density
    from .trace import hessian_trace

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_int("k", k, min=1)
    blocks = dict(groups) if groups is not None else parameter_groups(model)
    if not blocks:
        raise ValueError("no parameter groups to analyse")
    t0 = time.perf_counter()
    common = {"loss": loss, "operator": operator, "batch_size": batch_size, "mode": mode, "dtype": dtype,
              "device": device, "reduce_fn": reduce_fn}  # fmt: skip
    layers, sizes, matvecs = [], [], []
    eig_rows, conv_rows, traces, stderrs = [], [], [], []
    dens: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for i, (name, names) in enumerate(blocks.items()):
        n_block = sum(p.numel() for _, p in select_parameters(model, list(names)))
        res = hessian_eigenvalues(
            model, data, k=min(k, n_block), tol=tol, params=list(names), seed=seed + i,
            return_vectors=False, check_determinism=False, **common,
        )  # fmt: skip
        if not layers:
            shared = {
                key: res.meta[key] for key in ("loss", "reduction", "n_samples", "dtype", "device", "backend")
            }
            shared["product_fallbacks"] = []
        shared["product_fallbacks"] += [f"{name}: {f}" for f in res.meta.get("product_fallbacks", [])]
        row = torch.full((k,), float("nan"), dtype=torch.float64)
        crow = torch.zeros(k, dtype=torch.bool)
        row[: res.values.numel()] = res.values
        crow[: res.values.numel()] = res.converged
        used = res.n_matvecs
        tr, se = float("nan"), float("nan")
        if trace:
            t = hessian_trace(
                model, data, n_matvecs=trace_matvecs, method=trace_method, params=list(names),
                seed=seed + i, check_determinism=False, memory_budget=memory_budget, **common,
            )  # fmt: skip
            tr, se, used = t.estimate, t.stderr, used + t.n_matvecs
        if density:
            d = hessian_density(
                model, data, n_probes=n_probes, lanczos_steps=lanczos_steps, params=list(names),
                seed=seed + i, check_determinism=False, **common,
            )  # fmt: skip
            dens[name] = d
            used += d.n_matvecs
        layers.append(name)
        sizes.append(int(n_block))
        matvecs.append(int(used))
        eig_rows.append(row)
        conv_rows.append(crow)
        traces.append(tr)
        stderrs.append(se)
    settings = {"k": k, "trace": trace, "density": density, "tol": tol, "trace_matvecs": trace_matvecs,
                "trace_method": trace_method, "n_probes": n_probes, "lanczos_steps": lanczos_steps,
                "groups": {n: list(v) for n, v in blocks.items()}}  # fmt: skip
    meta = make_meta(
        "layerwise_hessian", model=model, params=settings, started=t0, operator=operator,
        n_matvecs=sum(matvecs), seed=seed, mode=mode, n_params=sum(sizes), **shared,
        note="blocks are diagonal blocks H_ll (other layers fixed); block traces sum to tr(H)",
    )  # fmt: skip
    return LayerwiseHessianResult(
        layers=layers,
        n_params=sizes,
        eigenvalues=torch.stack(eig_rows),
        converged=torch.stack(conv_rows),
        trace=torch.tensor(traces, dtype=torch.float64),
        trace_stderr=torch.tensor(stderrs, dtype=torch.float64),
        n_matvecs=matvecs,
        densities=dens or None,
        meta=meta,
    )


__all__ = ["HessianEigenResult", "LayerwiseHessianResult", "hessian_eigenvalues", "layerwise_hessian"]
