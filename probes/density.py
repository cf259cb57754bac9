"""Spectral density of curvature operators by stochastic Lanczos quadrature (SLQ).

For ``n_probes`` Gaussian start vectors ``v_l`` Lanczos builds ``T_l = S_l diag(θ_l) S_lᵀ``; the
Gauss quadrature nodes ``θ_lj`` with weights ``τ_lj = (e₁ᵀ s_lj)²`` (``Σ_j τ_lj = 1``) satisfy
``Σ_j τ_lj θ_lj^p = v_lᵀ A^p v_l / ‖v_l‖²`` exactly for ``p < 2·steps``. The spectral measure
``μ = (1/P) Σ_i δ_{λ_i}`` is estimated by the discrete measure

    μ̂ = (k/P) · (1/k) Σ_{i≤k} δ_{λ_i}  +  ((P − k)/P) · (1/n_probes) Σ_l Σ_j τ_lj δ_{θ_lj},

where the first part holds the ``k = deflate`` largest-magnitude eigenvalues computed exactly by
Lanczos (``deflate=0``: plain SLQ), and the probes of the second part are projected onto their
orthogonal complement (the operator becomes ``(I−UUᵀ)A(I−UUᵀ)``). **Convention:** the weights sum
to 1, so the density integrates to 1 (multiply by ``P`` for eigenvalues per unit of λ).
Deflation removes the outliers that dominate the higher moments of deep-network spectra and whose
random-probe estimates otherwise have ~100 % relative variance.

The smoothed density is ``ρ(t) = Σ_j w_j N(t; θ_j, σ²)`` (Gaussian broadening, width ``σ``;
:func:`hessian_density`'s default is the probes' Ritz span over the Lanczos steps, :func:`slq_sigma`;
:func:`smooth_density` alone defaults to ``σ = 0.01 · (max θ − min θ)``). With ``log_scale=True`` it is
the density of ``u = log10|λ|`` instead (eigenvalues of both signs pooled, ``|λ| < log_floor · max|λ|``
dropped and reported as ``meta['mass_below_floor']``; the mass at negative λ is ``meta['negative_mass']``),
with ``σ`` in decades (default ``0.02 ·`` the span of ``u``) — the usual view of heavy-tailed spectra.

Memory (``memory_budget``, :mod:`~dynascope.probes.budget`; :func:`plan_slq`): Lanczos holds, per probe,
a ring of its ``w`` most recent vectors, so a block of ``b`` probes run together holds

    (n_held + deflate)·P·itemsize + b·(w + c)·P·itemsize + b·P·8 + float64 dot chunks,

``n_held = n_probes`` when the start vectors are held (the values of ``random_vectors``), else 0 (drawn
``b`` at a time from the seeded generator: other values, the same distribution); ``c`` =
:data:`SLQ_WORK_VECTORS` (``q``, the product block and its temporaries; +1 for ``q₁`` when ``w <
steps``, +2 with deflation); ``b·P·8`` the float64 norm of the product block. Where the budget binds,
:func:`plan_slq` first runs the probes in smaller blocks (``b < n_probes``, full reorthogonalisation:
the same recurrences), then draws the start vectors per block, then keeps only ``w < steps`` vectors
per probe (reorthogonalisation against the most recent ``w``, one probe at a time). Below full
reorthogonalisation the basis may lose orthogonality: ``meta['orthogonality_loss']`` is the measured
``max |q₁ᵀ q_j|`` over every probe (a lower bound on ``max_{i<j} |q_iᵀ q_j|``; ~1e-16·√P with full
reorthogonalisation), and ghost copies of converged Ritz values may appear.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .budget import chunk_bytes, largest, names_the_knob, resolve_budget, too_small
from .curvature_setup import RecordingOperator, spec_settings, spectral_meta, takes_operator_spec
from .lanczos import eigsh, lanczos_tridiagonal
from .memory import peak_memory
from .operators import LinearOperator, OperatorSpec, random_vectors
from .results import Result
from .seeds import DEFLATION_OFFSET
from .validation import check_float, check_int


class DeflatedOperator(LinearOperator):
    """``(I − UUᵀ) A (I − UUᵀ)`` for orthonormal columns ``U`` (products counted by ``op``)."""

    def __init__(self, op: LinearOperator, U: torch.Tensor) -> None:
        super().__init__(op.size, op.dtype, op.device)
        self.vspace = op.vspace
        self.op = op
        self.U = U.to(device=op.device, dtype=op.dtype)

    def _project(self, V: torch.Tensor) -> torch.Tensor:
        return V - self.U @ self.vspace.reduce(self.U.T @ V)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._project(self.op.matmat(self._project(V)))


#: Vectors per probe that one Lanczos step holds besides its ring of ``w`` (``q``, the product block, the
#: three-term and Gram–Schmidt temporaries; measured: tests/test_memory_budget.py).
SLQ_WORK_VECTORS = 8

SLQ_FORMULA = (
    "(n_held + deflate)·P·itemsize (start vectors if held, deflation basis) + b·(w + c)·P·itemsize "
    "(ring of the w latest Lanczos vectors of b probes, q₁ when w < steps, product block and temporaries) "
    "+ b·P·8 (float64 norms) + float64 dot chunks"
)


@dataclass(frozen=True)
class SLQPlan:
    """How SLQ fits ``memory_budget`` (:func:`plan_slq`): ``block`` probes per Lanczos run, ``window``
    Lanczos vectors kept per probe (``= steps``: full reorthogonalisation), whether the start vectors are
    held (the values of ``random_vectors``) or drawn per block, and the bytes by :data:`SLQ_FORMULA`."""

    block: int
    window: int
    hold_probes: bool
    vector_bytes: int
    budget: int
    binds: bool

    def meta(self) -> dict[str, Any]:
        return {"memory_budget": self.budget, "memory_formula": SLQ_FORMULA,
                "vector_bytes": self.vector_bytes, "block_used": self.block, "reorth_window": self.window,
                "probes_held": self.hold_probes, "budget_binds": self.binds}  # fmt: skip


def plan_slq(
    size: int, n_probes: int, steps: int, itemsize: int, *, budget: int, deflate: int = 0,
    rows: int | None = None,
) -> SLQPlan:  # fmt: skip
    """The largest SLQ that fits ``budget`` bytes (module docstring): all probes at once with full
    reorthogonalisation, else fewer probes per block, else start vectors drawn per block, else one probe
    with the ``w`` most recent vectors (``2 ≤ w < steps``). Raises :class:`MemoryBudgetError` when not even
    ``w = 2`` fits. ``rows``: rows of each vector in this process (default ``size``)."""
    steps = min(steps, size - deflate)
    rows = size if rows is None else rows

    def need(b: int, w: int, hold: bool) -> int:
        work = SLQ_WORK_VECTORS + (w < steps) + (2 if deflate else 0)
        held = (n_probes if hold else 0) + deflate
        draw = (n_probes if hold else b) * 8  # random_vectors' float64 draw before the cast
        return rows * (itemsize * (held + b * (w + work)) + 8 * b + draw) + chunk_bytes(rows, b)

    def done(b: int, w: int, hold: bool) -> SLQPlan:
        return SLQPlan(block=b, window=w, hold_probes=hold, vector_bytes=need(b, w, hold), budget=budget,
                       binds=(b, w, hold) != (n_probes, steps, True))  # fmt: skip

    for hold in (True, False):
        b = largest(lambda b, hold=hold: need(b, steps, hold) <= budget, 1, n_probes)
        if b is not None:
            return done(b, steps, hold)
    w = largest(lambda w: need(1, w, False) <= budget, 2, steps - 1)
    if w is None:
        raise too_small("hessian_density", budget, need(1, min(2, steps), False),
                        "one probe with its two latest Lanczos vectors")  # fmt: skip
    return done(1, w, False)


@dataclass(frozen=True)
class SLQOutput:
    """Nodes/weights of the estimated spectral measure (weights sum to 1) and its ingredients;
    ``plan`` how it fit the memory budget and ``orthogonality_loss`` the measured ``max |q₁ᵀ q_j|``."""

    nodes: torch.Tensor
    weights: torch.Tensor
    probe: torch.Tensor  # probe index of each node; -1 for the exactly computed (deflated) eigenvalues
    deflated: torch.Tensor
    n_matvecs: int
    plan: SLQPlan | None = None
    orthogonality_loss: float = 0.0


def _itemsize(op: LinearOperator) -> int:
    return torch.empty((), dtype=op.dtype).element_size()


def slq(
    op: LinearOperator,
    *,
    n_probes: int = 10,
    steps: int = 80,
    seed: int = 0,
    deflate: int = 0,
    deflate_tol: float = 1e-5,
    memory_budget: int | None = None,
) -> SLQOutput:
    """Stochastic Lanczos quadrature on any symmetric operator within ``memory_budget`` bytes of vectors
    (see the module docstring)."""
    for name, val, low in (("n_probes", n_probes, 1), ("lanczos_steps", steps, 1), ("deflate", deflate, 0)):
        check_int(name, val, min=low)
    P, sp = op.vspace.size, op.vspace  # the dimension; this process holds op.size rows of each vector
    if deflate >= P:
        raise ValueError(f"deflate={deflate} must be smaller than the operator size {P}")
    budget = resolve_budget(memory_budget, op.device)
    plan = plan_slq(P, n_probes, steps, _itemsize(op), budget=budget, deflate=deflate, rows=op.size)
    start = op.n_matvecs
    exact = torch.zeros(0, dtype=torch.float64)
    target: LinearOperator = op
    if deflate:
        eig = eigsh(op, k=deflate, which="LM", tol=deflate_tol, seed=seed + DEFLATION_OFFSET,
                    memory_budget=budget)  # fmt: skip
        assert eig.vectors is not None
        U, _ = sp.qr(eig.vectors.double())
        exact = eig.values.double().cpu()
        target = DeflatedOperator(op, U.to(op.dtype))
        del eig, U
    held = sp.rows(random_vectors(P, n_probes, seed=seed, dtype=op.dtype, device=op.device)) \
        if plan.hold_probes else None  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    nodes, weights, probe = [exact], [torch.full_like(exact, 1.0 / P)], [torch.full((exact.numel(),), -1)]
    bulk_mass = (P - deflate) / P
    lost = 0.0
    for lo in range(0, n_probes, plan.block):
        hi = min(lo + plan.block, n_probes)
        if held is not None:
            V0 = held[:, lo:hi]
        else:
            V0 = sp.rows(torch.randn(P, hi - lo, generator=gen, dtype=torch.float64)).to(op.device, op.dtype)
        if deflate:
            V0 = target._project(V0)  # type: ignore[attr-defined]
        tri = lanczos_tridiagonal(target, V0, min(steps, P - deflate), window=plan.window)
        del V0
        assert tri.orthogonality is not None
        lost = max(lost, float(tri.orthogonality.max()))
        for i in range(hi - lo):
            theta, tau = tri.ritz(i)
            nodes.append(theta)
            weights.append(tau * bulk_mass / n_probes)
            probe.append(torch.full((theta.numel(),), lo + i))
    return SLQOutput(
        nodes=torch.cat(nodes),
        weights=torch.cat(weights),
        probe=torch.cat(probe),
        deflated=exact,
        n_matvecs=op.n_matvecs - start,
        plan=plan,
        orthogonality_loss=lost,
    )


def slq_sigma(out: SLQOutput, lanczos_steps: int, *, spacings: float = 3.0) -> float | None:
    """The default broadening of an SLQ measure: ``spacings`` × the mean spacing of one probe's Gauss
    nodes (the span of the probes' Ritz values over the Lanczos steps), so that the Gaussians of
    neighbouring nodes overlap and the density has no scallops between them. On a known Hessian-like
    spectrum (tests/test_slq_defaults.py) 3 spacings leave at most one dip the exact density lacks, one
    spacing four to six; 1 % of the span (the old default) left 16 dips on a tanh MLP's spectrum with
    3 probes × 30 steps. Deflated outliers do not widen it. ``None`` (the 1 % rule of
    :func:`smooth_density`) when the probes' nodes have no span."""
    bulk = out.nodes[out.probe >= 0]
    span = float(bulk.max() - bulk.min()) if bulk.numel() else 0.0
    return spacings * span / lanczos_steps if span > 0 else None


def smooth_density(
    ritz_values: torch.Tensor,
    ritz_weights: torch.Tensor,
    *,
    grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
    log_scale: bool = False,
    log_floor: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, float]]:
    """Gaussian-broadened density of a discrete measure: ``(grid, density, sigma, info)``.

    ``grid``: a 1-D tensor of points, a number of points (default 1000) spanning the nodes ± 4σ.
    ``log_scale``: density of ``log10|λ|`` (see the module docstring); ``sigma`` then in decades.
    """
    vals = torch.as_tensor(ritz_values, dtype=torch.float64).reshape(-1)
    w = torch.as_tensor(ritz_weights, dtype=torch.float64).reshape(-1)
    if vals.shape != w.shape or vals.numel() == 0:
        raise ValueError(
            f"ritz_values and ritz_weights must be non-empty and equally long; got {vals.shape}, {w.shape}"
        )
    info: dict[str, float] = {"negative_mass": float(w[vals < 0].sum())}
    if log_scale:
        top = float(vals.abs().max())
        keep = vals.abs() >= log_floor * top if top > 0 else torch.zeros_like(vals, dtype=torch.bool)
        info["mass_below_floor"] = float(w[~keep].sum())
        info["log_floor"] = log_floor
        if not bool(keep.any()):
            raise ValueError("log_scale: no eigenvalue above the floor (the operator is zero?)")
        vals, w = torch.log10(vals[keep].abs()), w[keep]
    span = float(vals.max() - vals.min())
    if sigma is None:
        sigma = (0.02 if log_scale else 0.01) * span
        if sigma <= 0:
            sigma = 1e-3 * max(float(vals.abs().max()), 1.0)
    check_float("sigma", sigma, min=0, min_open=True)
    if grid is None or isinstance(grid, int):
        n = 1000 if grid is None else grid
        if n < 2:
            raise ValueError(f"the grid needs at least 2 points; got {n}")
        grid = torch.linspace(
            float(vals.min()) - 4 * sigma, float(vals.max()) + 4 * sigma, n, dtype=torch.float64
        )
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    z = (grid[:, None] - vals[None, :]) / sigma
    dens = (torch.exp(-0.5 * z**2) * w[None, :]).sum(dim=1) / (sigma * (2 * torch.pi) ** 0.5)
    return grid, dens, float(sigma), info


def spectral_moments(
    values: torch.Tensor, weights: torch.Tensor | None = None, p_max: int = 4
) -> torch.Tensor:
    """``[m_1 … m_p_max]`` with ``m_p = Σ_j w_j λ_j^p`` (uniform weights ``1/n`` when ``weights`` is None)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    w = (
        torch.full_like(v, 1.0 / v.numel())
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64)
    )
    return torch.stack([(w * v**p).sum() for p in range(1, p_max + 1)])


def wasserstein1(
    a: torch.Tensor, wa: torch.Tensor | None, b: torch.Tensor, wb: torch.Tensor | None = None
) -> float:
    """1-Wasserstein distance ``∫ |F_a(t) − F_b(t)| dt`` between two discrete measures on ℝ
    (weights normalised to sum 1; ``None`` means uniform)."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    wa = torch.full_like(a, 1.0) if wa is None else torch.as_tensor(wa, dtype=torch.float64).reshape(-1)
    wb = torch.full_like(b, 1.0) if wb is None else torch.as_tensor(wb, dtype=torch.float64).reshape(-1)
    pts = torch.cat([a, b])
    mass = torch.cat([wa / wa.sum(), -wb / wb.sum()])
    order = torch.argsort(pts)
    pts, mass = pts[order], mass[order]
    cdf_diff = torch.cumsum(mass, 0)[:-1]
    return float((cdf_diff.abs() * (pts[1:] - pts[:-1])).sum())


@dataclass(frozen=True, kw_only=True)
class DensityResult(Result):
    """SLQ spectral density.

    ``grid`` / ``density`` the broadened density (integrates to 1; over ``log10|λ|`` when
    ``log_scale``); ``ritz_values`` / ``ritz_weights`` the raw quadrature measure (weights sum to 1,
    deflated exact eigenvalues included with weight 1/P each); ``sigma`` the broadening width
    (in λ units, or decades when ``log_scale``); ``deflated`` the exactly computed outliers.
    """

    grid: torch.Tensor
    density: torch.Tensor
    ritz_values: torch.Tensor
    ritz_weights: torch.Tensor
    sigma: float
    log_scale: bool
    n_matvecs: int
    deflated: torch.Tensor

    def moments(self, p_max: int = 4) -> torch.Tensor:
        """Raw spectral moments ``(1/P) tr(A^p)`` estimated from the quadrature measure (no broadening)."""
        return spectral_moments(self.ritz_values, self.ritz_weights, p_max)

    def resmooth(
        self,
        *,
        sigma: float | None = None,
        grid: torch.Tensor | int | None = None,
        log_scale: bool | None = None,
    ) -> DensityResult:
        """The same Ritz measure broadened with another ``sigma`` / ``grid`` / scale (no new products)."""
        log_scale = self.log_scale if log_scale is None else log_scale
        g, d, s, info = smooth_density(
            self.ritz_values, self.ritz_weights, grid=grid, sigma=sigma, log_scale=log_scale
        )
        meta = {**self.meta, **info, "sigma": s, "log_scale": log_scale}
        return dataclasses.replace(self, grid=g, density=d, sigma=s, log_scale=log_scale, meta=meta)

    def to_frame(self):
        """The smoothed density: columns ``grid`` (``log10_abs_eigenvalue`` if log-scale) and ``density``."""
        import pandas as pd

        return pd.DataFrame(
            {"log10_abs_eigenvalue" if self.log_scale else "eigenvalue": self.grid.tolist(),
             "density": self.density.tolist()}
        )  # fmt: skip

    def ritz_frame(self):
        """The raw quadrature measure: ``ritz_value, ritz_weight``."""
        import pandas as pd

        return pd.DataFrame(
            {"ritz_value": self.ritz_values.tolist(), "ritz_weight": self.ritz_weights.tolist()}
        )


@takes_operator_spec()
def hessian_density(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    n_probes: int = 10,
    lanczos_steps: int = 80,
    sigma: float | None = None,
    grid: torch.Tensor | int | None = None,
    log_scale: bool = False,
    deflate: int = 0,
    seed: int = 0,
    check_determinism: bool = True,
    memory_budget: int | None = None,
) -> DensityResult:
    """Eigenvalue density of the Hessian / GGN / Fisher by SLQ with ``n_probes`` probes run together.

    ``spec``: the operator (:class:`~dynascope.probes.operators.OperatorSpec`), or its fields as keywords
    (``loss``, ``operator``, ``output``, ``params``, ``batch_size``, ``mode``, ``dtype``, ``device``,
    ``reduce_fn``).

    One ``matmat`` per Lanczos step serves all probes; cost ``n_probes · lanczos_steps`` products
    (plus the deflation's Lanczos when ``deflate > 0``). See the module docstring for the
    estimator, the weight convention (integrates to 1), the default ``sigma`` and ``log_scale``.

    ``memory_budget``: bytes of length-``P`` vectors held at once (default: half the available RAM / free
    GPU memory, :mod:`~dynascope.probes.budget`); where it binds, the probes run in smaller blocks and then
    with bounded reorthogonalisation (:func:`plan_slq`, formula in the module docstring). ``meta`` records
    the budget, formula and plan (``memory_budget``, ``memory_formula``, ``vector_bytes``, ``block_used``,
    ``reorth_window``, ``probes_held``, ``budget_binds``), ``orthogonality_loss`` and the measured peak
    (``measured_peak_bytes``).
    """
    check_int("seed", seed)
    t0 = time.perf_counter()
    op = spec.build(model, data)
    rec = RecordingOperator(op)
    budget = resolve_budget(memory_budget, op.device)
    with names_the_knob("hessian_density", budget, SLQ_FORMULA), peak_memory(op.device) as peak:
        out = slq(
            rec, n_probes=n_probes, steps=lanczos_steps, seed=seed, deflate=deflate, memory_budget=budget
        )
    assert out.plan is not None
    if sigma is None and not log_scale:
        sigma = slq_sigma(out, lanczos_steps)
    g, d, s, info = smooth_density(out.nodes, out.weights, grid=grid, sigma=sigma, log_scale=log_scale)
    settings = {"n_probes": n_probes, "lanczos_steps": lanczos_steps, "deflate": deflate,
                **spec_settings(spec), "log_scale": log_scale, "memory_budget": memory_budget}  # fmt: skip
    meta = spectral_meta(
        "hessian_density", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism, sigma=s, probes="gaussian",
        weights_convention="weights sum to 1 (density integrates to 1); times P = eigenvalue count",
        **info, **out.plan.meta(), orthogonality_loss=out.orthogonality_loss,
        orthogonality_loss_definition="max |q1^T q_j| over every probe's Lanczos vectors (measured; a lower "
        "bound on the basis' loss of orthogonality)", measured_peak_bytes=peak.bytes,
        measured_peak_how=peak.how,
    )  # fmt: skip
    return DensityResult(
        grid=g, density=d, ritz_values=out.nodes, ritz_weights=out.weights, sigma=s, log_scale=log_scale,
        n_matvecs=out.n_matvecs, deflated=out.deflated, meta=meta,
    )  # fmt: skip


__all__ = [
    "DeflatedOperator",
    "DensityResult",
    "SLQ_FORMULA",
    "SLQOutput",
    "SLQPlan",
    "hessian_density",
    "plan_slq",
    "slq",
    "slq_sigma",
    "smooth_density",
    "spectral_moments",
    "wasserstein1",
]
