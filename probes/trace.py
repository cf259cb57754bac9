"""Stochastic trace estimation of curvature operators at a fixed budget of products.

* Hutchinson: ``tr(A) ≈ (1/m) Σ_i z_iᵀ A z_i`` with Rademacher ``z_i``; standard error
  ``std(z_iᵀ A z_i) / √m`` (sample std, ``ddof=1``).
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): with ``m = 2r + s`` products, draw Rademacher
  ``S [P, r]``, take an orthonormal basis ``Q`` of ``A S`` (``r`` products), compute ``tr(Qᵀ A Q)``
  exactly (``r`` products) and estimate the rest by Hutchinson on the deflated residual
  ``(I − QQᵀ) A (I − QQᵀ)`` with ``s`` Rademacher probes. Conditional on ``S`` the low-rank part is
  exact, so the estimator is unbiased with variance coming only from the residual samples:
  ``Var(gᵀRg) = 2(‖R‖_F² − Σ_i R_ii²) ≤ 2‖R‖_F²`` for Rademacher ``g``. The reported standard error
  is ``√(2 ‖R‖_F² / s)`` with ``‖R‖_F²`` estimated without bias by ``mean_i ‖R g_i‖²`` (the products
  are at hand): a slightly conservative bound that, unlike the sample std of ``s ≈ m/3`` skewed
  samples, does not collapse when a few residual eigenvalues dominate (coverage of ±2 stderr measured
  on tiny-MLP Hessian/GGN/Fisher, 300 seeds: sample std 84–90 %, this bound 94–96 %). Hutch++ is more accurate
  than Hutchinson when a few large eigenvalues dominate (as in deep-network Hessians), at equal cost.
* Krylov++ (``method="krylov++"``): Hutch++ whose deflation basis is a Krylov space instead of a
  one-shot sketch. With ``m = k + s`` products, run ``k = m // 3`` Lanczos steps (full
  reorthogonalisation) from one Gaussian start vector: orthonormal ``Q [P, k]`` and
  ``tr(QᵀAQ) = Σ_j q_jᵀ A q_j`` exactly from the same ``k`` products (Hutch++ pays ``2r`` products for
  an ``r``-dimensional basis, and a Krylov space captures the top eigenvectors far better than
  ``range(AS)``). The rest is Hutchinson on ``(I − QQᵀ) A (I − QQᵀ)`` with ``s`` Rademacher probes
  drawn independently of ``Q``, so the estimator is unbiased; same standard error as Hutch++.
  The Lanczos products are single vectors by default (``k`` data passes; :func:`krylov_plus_plus`
  takes ``krylov_block`` for block Lanczos); the ``s`` probes go in blocks. Measured (bench/bench_trace.py):
  more accurate than Hutch++ at 50–100 products (CNN, 100 products: max error 0.21 % vs 0.46 %; MLP
  0.77 % vs 1.58 %), not at ~20 (CNN: its 7-step Krylov space misses part of the ~10 outliers that
  Hutch++'s 7-column sketch catches), so Hutch++ stays the default.

What limits all of them (measured, see ``BENCHMARKS.md``): after deflating any ``k`` directions, the
residual variance per probe is ``2‖R‖_F²`` (Rademacher: minus ``2Σ R_ii²``). Trained-network Hessians
keep most of ``‖A‖_F²`` in a wide bulk of both signs (tiny 10.9k-parameter MLP: the top 10 eigenvalues
hold 57 % of ``‖H‖_F²`` and 14 % of the trace), so even deflating the *exact* top eigenvectors leaves a
relative standard deviation of 2.7 % / 1.4 % / 0.9 % of the trace at 10 / 26 / 50 products there.

Products are taken in blocks (``matmat``): one data pass serves a whole block of probes.

Memory (``memory_budget``, :mod:`~dynascope.probes.budget`): no estimator holds ``[P, n_matvecs]``. Probes
are streamed ``b`` at a time; their signs are kept as ``int8`` (``m·P`` bytes, the values of
``random_vectors``, so estimates equal those before the budget) when that fits, else drawn per block.
Hutchinson holds ``2b`` vectors of ``P``; Hutch++ and auto ``max(2r, r + 2b)`` (the sketch ``A S``, then
its QR in the operator's dtype; the residual probes are projected block by block); Krylov++
``max(k + 4c, k + 2b)``.
Where the budget binds, :func:`plan_trace` draws the signs per block, then lowers ``b``, then the sketch
``r`` / ``k`` (the freed products go to the residual probes), and says so in ``meta``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .budget import (
    RademacherProbes,
    chunk_bytes,
    column_dots,
    largest,
    names_the_knob,
    resolve_budget,
    too_small,
)
from .curvature_setup import RecordingOperator, spec_settings, spectral_meta, takes_operator_spec
from .lanczos import breakdown_rtol
from .memory import peak_memory
from .operators import LinearOperator, OperatorSpec
from .results import Result
from .validation import check_choice, check_int

TRACE_METHODS = ("auto", "hutch++", "hutchinson", "krylov++")


@dataclass(frozen=True, kw_only=True)
class TraceResult(Result):
    """A trace estimate ``estimate ± stderr`` from ``n_matvecs`` products.

    ``samples``: the Hutchinson samples ``zᵀ A z`` (of the deflated residual for Hutch++ / Krylov++);
    ``lowrank_trace``: ``tr(Qᵀ A Q)`` of the deflation basis (0 for Hutchinson).
    """

    estimate: float
    stderr: float
    n_matvecs: int
    method: str
    samples: torch.Tensor
    lowrank_trace: float = 0.0

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            [{"method": self.method, "estimate": self.estimate, "stderr": self.stderr,
              "n_matvecs": self.n_matvecs, "lowrank_trace": self.lowrank_trace}]
        )  # fmt: skip

    def interval(self, z: float = 2.0) -> tuple[float, float]:
        """``estimate ± z · stderr``."""
        return self.estimate - z * self.stderr, self.estimate + z * self.stderr


def _blocks(total: int, block: int) -> list[int]:
    return [min(block, total - lo) for lo in range(0, total, block)]


@dataclass(frozen=True)
class TracePlan:
    """How an estimator fits ``memory_budget`` (see :func:`plan_trace`): ``block`` probes per product,
    ``sketch`` deflation vectors (Hutch++'s ``r``, Krylov++'s ``k``; 0 for Hutchinson), whether the probe
    signs are held (``int8``, the values of ``random_vectors``) or drawn per block, and the bytes of
    vectors it holds at most (``vector_bytes``, by ``formula``)."""

    method: str
    block: int
    sketch: int
    hold_probes: bool
    vector_bytes: int
    budget: int
    formula: str
    binds: bool

    def meta(self) -> dict[str, Any]:
        return {"memory_budget": self.budget, "memory_formula": self.formula,
                "vector_bytes": self.vector_bytes, "block_used": self.block, "sketch_vectors": self.sketch,
                "probes_held": self.hold_probes, "budget_binds": self.binds}  # fmt: skip


_FORMULAS = {
    "hutchinson": "2b·P·itemsize (probe block, product block) + probe signs (m·P int8 held, else b·P) "
    "+ float64 dot chunks",
    "hutch++": "max(2r, r + 2b)·P·itemsize (sketch A S then its QR; or Q, probe block, product block) "
    "+ probe signs ((m − r)·P int8 held, else b·P) + float64 dot chunks",
    "krylov++": "max(k + 4c, k + 2b)·P·itemsize (Krylov basis Q, Lanczos block c, QR and "
    "orthogonalisation; or Q, probe block, product block) + probe signs ((m − k)·P int8 held, else b·P) "
    "+ float64 dot chunks",
}


def _plan_bytes(method: str, size: int, m: int, itemsize: int, r: int, b: int, hold: bool, kb: int) -> int:
    """Bytes of vectors held for a problem whose vectors have ``size`` rows in this process."""
    V = size * itemsize
    if method == "hutchinson":
        vectors, held = 2 * b, m
    elif method == "krylov++":
        vectors, held = max(r + 4 * kb, r + 2 * b), m - r
    else:  # hutch++ and auto (auto's half-sketch QRs hold at most r + r/2)
        vectors, held = max(2 * r, r + 2 * b), m - r
    return vectors * V + (held if hold else b) * size + chunk_bytes(size, b)


def plan_trace(
    method: str, size: int, n_matvecs: int, itemsize: int, *, block: int, budget: int,
    krylov_dim: int | None = None, krylov_block: int = 1, rows: int | None = None,
) -> TracePlan:  # fmt: skip
    """The largest work that fits ``budget`` bytes: first as asked (``block`` probes per product, sketch
    ``r = m // 3`` — ``krylov_dim`` for Krylov++ — and the probe signs held), then with the signs drawn per
    block, then fewer probes per block, then a smaller sketch (the residual gets the products it frees:
    ``s = m − 2r``, ``m − k``). Raises :class:`MemoryBudgetError` when not even one vector fits. ``size``: the
    dimension; ``rows``: how many rows of each vector this process holds (default ``size``; fewer on a
    sharded operator, :mod:`.space`)."""
    kind = "hutch++" if method == "auto" else method
    if kind == "hutchinson":
        r0 = 0
    elif kind == "krylov++":
        r0 = min(n_matvecs // 3 if krylov_dim is None else krylov_dim, size)
    else:
        r0 = min(n_matvecs // 3, size)
    block = min(block, n_matvecs)

    def need(r: int, b: int, hold: bool) -> int:
        held_rows = size if rows is None else rows
        return _plan_bytes(kind, held_rows, n_matvecs, itemsize, r, b, hold, krylov_block)

    def done(r: int, b: int, hold: bool) -> TracePlan:
        return TracePlan(method=method, block=b, sketch=r, hold_probes=hold, vector_bytes=need(r, b, hold),
                         budget=budget, formula=_FORMULAS[kind],
                         binds=(r, b, hold) != (r0, block, True))  # fmt: skip

    for hold in (True, False):
        if need(r0, block, hold) <= budget:
            return done(r0, block, hold)
    b = largest(lambda b: need(r0, b, False) <= budget, 1, block)
    if b is not None:
        return done(r0, b, False)
    r = largest(lambda r: need(r, 1, False) <= budget, 1, r0) if r0 > 0 else None
    if r is None:
        least = need(min(r0, 1), 1, False)
        raise too_small(f"trace ({method})", budget, least, "one probe, one product and one sketch vector")
    b = largest(lambda b: need(r, b, False) <= budget, 1, block)
    assert b is not None
    return done(r, b, False)


def _budget(op: LinearOperator, memory_budget: int | None) -> int:
    return resolve_budget(memory_budget, op.device)


def _itemsize(op: LinearOperator) -> int:
    return torch.empty((), dtype=op.dtype).element_size()


def _probes(op: LinearOperator, m: int, gen: torch.Generator, plan: TracePlan) -> RademacherProbes:
    return RademacherProbes(op.vspace.size, m, gen, hold=plan.hold_probes, dtype=op.dtype, device=op.device,
                            rows=op.vspace.rows)  # fmt: skip


def _dots(op: LinearOperator, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``x_jᵀ y_j`` per column in float64 (summed over ranks on a sharded operator)."""
    return op.vspace.reduce(column_dots(X, Y))


def _quadratic_forms(op: LinearOperator, probes: RademacherProbes, n: int, block: int) -> torch.Tensor:
    """``z_iᵀ A z_i`` (float64) for the next ``n`` probes, one ``matmat`` per block of them."""
    out = []
    for nb in _blocks(n, block):
        Zb = probes.take(nb)
        out.append(_dots(op, Zb, op.matmat(Zb)))
    return torch.cat(out).cpu()


def hutchinson(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32, memory_budget: int | None = None
) -> tuple[float, float, torch.Tensor]:
    """Hutchinson with Rademacher probes: ``(estimate, stderr, samples)``; probes streamed in blocks within
    ``memory_budget`` (:func:`plan_trace`)."""
    if n_matvecs < 2:
        raise ValueError(f"hutchinson needs n_matvecs >= 2 for a standard error; got {n_matvecs}")
    plan = plan_trace("hutchinson", op.vspace.size, n_matvecs, _itemsize(op), block=block,
                      budget=_budget(op, memory_budget), rows=op.size)  # fmt: skip
    probes = _probes(op, n_matvecs, torch.Generator().manual_seed(seed), plan)
    s = _quadratic_forms(op, probes, n_matvecs, plan.block)
    return float(s.mean()), float(s.std() / math.sqrt(s.numel())), s


def _sketch(
    op: LinearOperator, probes: RademacherProbes, r: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A S, s_iᵀ A s_i)`` for the next ``r`` probes ``S``, in blocks of columns."""
    AS = torch.empty(op.size, r, dtype=op.dtype, device=op.device)
    forms = []
    for lo, nb in zip(range(0, r, block), _blocks(r, block)):
        Sb = probes.take(nb)
        AS[:, lo : lo + nb] = op.matmat(Sb)
        forms.append(_dots(op, Sb, AS[:, lo : lo + nb]))
    return AS, torch.cat(forms).cpu()


def _orth(op: LinearOperator, Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``Y`` (Householder QR in ``Y``'s dtype, float32 for 16-bit;
    all-reduced Gram–Schmidt on a sharded operator)."""
    work = Y if Y.element_size() >= 4 else Y.float()
    return op.vspace.qr(work)[0].to(Y.dtype)


def _project_out(op: LinearOperator, Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``X ← (I − QQᵀ) X`` in place."""
    return X.addmm_(Q, op.vspace.reduce(Q.T @ X), alpha=-1)


def _lowrank_trace(op: LinearOperator, Q: torch.Tensor, block: int) -> float:
    """``tr(QᵀAQ) = Σ_j q_jᵀ A q_j``: ``r`` products in blocks of columns."""
    low = 0.0
    for lo, nb in zip(range(0, Q.shape[1], block), _blocks(Q.shape[1], block)):
        Qb = Q[:, lo : lo + nb]
        low += float(_dots(op, Qb, op.matmat(Qb)).sum())
    return low


def _residual_hutchinson(
    op: LinearOperator, Q: torch.Tensor, probes: RademacherProbes, s: int, block: int, *, sweeps: int
) -> tuple[torch.Tensor, float]:
    """Hutchinson on ``R = (I − QQᵀ) A (I − QQᵀ)`` with the next ``s`` probes ``g`` (``Q`` orthonormal):
    samples ``(Pg)ᵀ A (Pg)`` and the unbiased estimate ``mean ‖R g‖²`` of ``‖R‖_F²``. ``sweeps``
    projections of each probe off ``Q`` (two: ``P g`` orthogonal to ``Q`` to working precision)."""
    samples, sq_norms = [], []
    for nb in _blocks(s, block):
        Gb = probes.take(nb)
        for _ in range(sweeps):
            _project_out(op, Q, Gb)  # P g
        RGb = _project_out(op, Q, op.matmat(Gb))  # R g
        samples.append(_dots(op, Gb, RGb))
        sq_norms.append(_dots(op, RGb, RGb))
    return torch.cat(samples).cpu(), float(torch.cat(sq_norms).mean())


def _deflated(
    op: LinearOperator, Q: torch.Tensor, probes: RademacherProbes, s: int, block: int
) -> tuple[float, float, torch.Tensor, float]:
    """Hutch++ given the orthonormal basis ``Q`` of its sketch: ``(estimate, stderr, samples, tr(QᵀAQ))``,
    stderr ``√(2 mean‖R g‖² / s)`` (module docstring)."""
    low = _lowrank_trace(op, Q, block)
    res, frob2 = _residual_hutchinson(op, Q, probes, s, block, sweeps=1)
    return low + float(res.mean()), math.sqrt(2.0 * frob2 / s), res, low


def hutch_plus_plus(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32, memory_budget: int | None = None
) -> tuple[float, float, torch.Tensor, float]:
    """Hutch++: ``(estimate, stderr, residual samples, tr(QᵀAQ))`` using exactly ``n_matvecs`` products.

    Split ``n_matvecs = 2r + s`` with ``r = n_matvecs // 3`` (``s ≥ r``, ``s ≥ 2``), or a smaller ``r``
    where ``memory_budget`` cannot hold ``2r`` vectors (:func:`plan_trace`).
    """
    if n_matvecs < 4:
        raise ValueError(
            f"hutch++ needs n_matvecs >= 4 (sketch, projection, >= 2 residual probes); got {n_matvecs}"
        )
    plan = plan_trace("hutch++", op.vspace.size, n_matvecs, _itemsize(op), block=block,
                      budget=_budget(op, memory_budget), rows=op.size)  # fmt: skip
    r = plan.sketch
    s = n_matvecs - 2 * r
    probes = _probes(op, r + s, torch.Generator().manual_seed(seed), plan)
    AS, _ = _sketch(op, probes, r, plan.block)
    Q = _orth(op, AS)
    del AS
    return _deflated(op, Q, probes, s, plan.block)


@dataclass(frozen=True)
class AutoChoice:
    """What :func:`auto_trace` saw in its sketch: ``‖A‖_F²`` (estimated), the share of it that half the
    sketch captures, the predicted variance ratio Hutch++/Hutchinson and the method chosen."""

    frobenius2: float
    captured_share: float
    variance_ratio: float
    method: str


def auto_trace(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32, memory_budget: int | None = None
) -> tuple[float, float, torch.Tensor, float, AutoChoice]:
    """Hutch++ or Hutchinson, chosen from the first sketch, never paying for the other's products.

    The first ``r = m // 3`` products ``Y = A S`` (Rademacher ``S``) serve both estimators: they are the
    Hutch++ sketch, and ``s_iᵀ A s_i`` are Hutchinson samples. From them, with no extra product, the
    share of ``‖A‖_F²`` that a rank-``r/2`` basis captures is estimated by cross-fitting the two halves
    of the sketch: ``Q₁ = orth(Y₁)``, ``Q₂ = orth(Y₂)`` and

        c = (Σ_{j∈2} ‖Q₁ᵀ y_j‖² + Σ_{i∈1} ‖Q₂ᵀ y_i‖²) / Σ_i ‖y_i‖²

    (each basis is judged on the other half's samples, independent of it; ``E‖y‖² = ‖A‖_F²``, and the
    ratio on the same samples cancels most of the heavy-tailed noise of ``‖y‖²``). Per probe,
    Hutchinson's variance is ``≤ 2‖A‖_F²`` and Hutch++'s residual variance ``≤ 2(1 − c)‖A‖_F²``
    (deflating the full rank-``r`` sketch captures at least what half of it does), so the rule is

        Hutch++ when  (1 − c) / (m − 2r)  <  1 / m,   else Hutchinson,

    i.e. when half the sketch holds more than ``2r/m ≈ 2/3`` of ``‖A‖_F²`` (outlier-dominated spectra).
    Either way the result is exactly that estimator at ``m`` products: the probes are those of
    ``hutchinson(op, m, seed)``, so choosing Hutchinson returns exactly its estimate (the sketch's ``r``
    samples are its first ``r``), and Hutch++ deflates the sketch and probes the residual with the next
    ``m − 2r`` columns. Where ``memory_budget`` binds, ``r`` is smaller (:func:`plan_trace`, as Hutch++).
    """
    if n_matvecs < 4:
        raise ValueError(f"auto needs n_matvecs >= 4 (as hutch++); got {n_matvecs}")
    plan = plan_trace(
        "auto", op.vspace.size, n_matvecs, _itemsize(op), block=block, budget=_budget(op, memory_budget),
        rows=op.size,
    )
    r = plan.sketch
    s = n_matvecs - 2 * r
    # the same probes as hutchinson(op, m, seed): when Hutchinson is chosen the result is exactly its own
    probes = _probes(op, n_matvecs, torch.Generator().manual_seed(seed), plan)
    AS, forms = _sketch(op, probes, r, plan.block)
    norms2 = _dots(op, AS, AS).cpu()
    total = float(norms2.sum())
    frob2 = total / r
    half = r // 2
    captured = 0.0
    if half >= 1 and r - half >= 1 and total > 0:
        Y1, Y2 = AS[:, :half], AS[:, half:]
        captured = (_cross_energy(op, Y1, Y2) + _cross_energy(op, Y2, Y1)) / total
    captured = min(max(captured, 0.0), 1.0)
    ratio = ((1.0 - captured) / max(s, 1)) / (1.0 / n_matvecs) if total > 0 else 1.0
    if ratio < 1.0:
        Q = _orth(op, AS)
        del AS
        est, se, res, low = _deflated(op, Q, probes, s, plan.block)
        method = "hutch++"
    else:
        del AS
        res = torch.cat([forms, _quadratic_forms(op, probes, n_matvecs - r, plan.block)])
        est, se, low = float(res.mean()), float(res.std() / math.sqrt(res.numel())), 0.0
        method = "hutchinson"
    return est, se, res, low, AutoChoice(frob2, captured, ratio, method)


def _cross_energy(op: LinearOperator, Y1: torch.Tensor, Y2: torch.Tensor) -> float:
    """``‖orth(Y1)ᵀ Y2‖_F²`` (the small product squared and summed in float64)."""
    return float(op.vspace.reduce(_orth(op, Y1).T @ Y2).double().pow(2).sum())


def krylov_plus_plus(
    op: LinearOperator,
    n_matvecs: int,
    *,
    seed: int = 0,
    block: int = 32,
    krylov_dim: int | None = None,
    krylov_block: int = 1,
    memory_budget: int | None = None,
) -> tuple[float, float, torch.Tensor, float]:
    """Krylov-deflated Hutchinson: ``(estimate, stderr, residual samples, tr(QᵀAQ))``, exactly ``n_matvecs``
    products.

    ``k = krylov_dim`` (default ``n_matvecs // 3``, at most ``P``; fewer where ``memory_budget`` cannot
    hold them, :func:`plan_trace`) steps of block Lanczos (block size ``krylov_block``, full
    reorthogonalisation) from Gaussian start vectors give ``Q [P, k]`` and
    ``tr(QᵀAQ) = Σ_j q_jᵀAq_j``; directions lost to an invariant subspace are replaced by fresh random
    ones orthogonal to ``Q``, so with ``k = P`` the low-rank part is the exact trace. The other
    ``s = n_matvecs − k ≥ 2`` products are Rademacher probes of the deflated residual (see
    :func:`hutch_plus_plus` for the standard error).
    """
    if n_matvecs < 4:  # the same floor as Hutch++ (k = m // 3 >= 1 Lanczos step, s >= 2 residual probes)
        raise ValueError(
            f"krylov++ needs n_matvecs >= 4 (>= 1 Lanczos step, >= 2 residual probes); got {n_matvecs}"
        )
    k = n_matvecs // 3 if krylov_dim is None else krylov_dim
    check_int("krylov_dim", k, min=1, max=n_matvecs - 2)
    check_int("krylov_block", krylov_block, min=1)
    plan = plan_trace("krylov++", op.vspace.size, n_matvecs, _itemsize(op), block=block, krylov_dim=k,
                      krylov_block=krylov_block, budget=_budget(op, memory_budget), rows=op.size)  # fmt: skip
    k = plan.sketch
    s = n_matvecs - k
    gen = torch.Generator().manual_seed(seed)  # one stream: start block, replacements, residual probes
    sp = op.vspace

    def fresh(n: int) -> torch.Tensor:
        return sp.rows(torch.randn(sp.size, n, generator=gen, dtype=torch.float64)).to(
            device=op.device, dtype=op.dtype
        )

    def orth_against(W: torch.Tensor, Qj: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # two Gram-Schmidt sweeps
            W = W - Qj @ sp.reduce(Qj.T @ W)
        return W

    Q = torch.zeros(op.size, k, dtype=op.dtype, device=op.device)
    W = fresh(min(krylov_block, k))
    low, scale, j = 0.0, 0.0, 0
    while True:
        Qb, Rb = sp.qr(W)
        lost = Rb.diagonal().abs() <= breakdown_rtol(op.dtype) * max(scale, float(Rb.diagonal().abs().max()))
        if bool(lost.any()):  # invariant subspace: continue from fresh directions orthogonal to Q
            W = W.clone()
            W[:, lost] = orth_against(fresh(int(lost.sum())), Q[:, :j])
            Qb, _ = sp.qr(W)
            Qb, _ = sp.qr(orth_against(Qb, Q[:, :j]))
        nb = min(Qb.shape[1], k - j)
        Qb = Qb[:, :nb]
        Q[:, j : j + nb] = Qb
        AQb = op.matmat(Qb)
        low += float(_dots(op, Qb, AQb).sum())
        scale = max(scale, float(sp.norms(AQb).max()))
        j += nb
        if j == k:
            break
        W = orth_against(AQb, Q[:, :j])
    del W, Qb, AQb
    res, frob2 = _residual_hutchinson(op, Q, _probes(op, s, gen, plan), s, plan.block, sweeps=2)
    return low + float(res.mean()), math.sqrt(2.0 * frob2 / s), res, low


def estimate_trace(
    op: LinearOperator, n_matvecs: int, *, method: str = "auto", seed: int = 0, block: int = 32,
    memory_budget: int | None = None,
) -> tuple[float, float, torch.Tensor, float]:  # fmt: skip
    """Trace of any symmetric :class:`LinearOperator`: ``(estimate, stderr, samples, lowrank_trace)``, its
    vectors within ``memory_budget`` bytes (default: half the available memory, :mod:`.budget`)."""
    check_choice("method", method, TRACE_METHODS)
    check_int("n_matvecs", n_matvecs)
    kw = {"seed": seed, "block": block, "memory_budget": memory_budget}
    if method == "auto":
        return auto_trace(op, n_matvecs, **kw)[:4]
    if method == "hutchinson":
        est, se, s = hutchinson(op, n_matvecs, **kw)
        return est, se, s, 0.0
    if method == "krylov++":
        return krylov_plus_plus(op, n_matvecs, **kw)
    return hutch_plus_plus(op, n_matvecs, **kw)


@takes_operator_spec()
def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    n_matvecs: int = 100,
    method: str = "auto",
    seed: int = 0,
    block: int = 32,
    check_determinism: bool = True,
    memory_budget: int | None = None,
) -> TraceResult:
    """``tr(A)`` of the Hessian / GGN / Fisher of the dataset-mean loss with exactly ``n_matvecs`` products.

    ``spec``: the operator (:class:`~dynascope.probes.operators.OperatorSpec`), or its fields as keywords
    (``loss``, ``operator``, ``output``, ``params``, ``batch_size``, ``mode``, ``dtype``, ``device``,
    ``reduce_fn``).

    ``method="auto"`` (default: Hutch++ or Hutchinson chosen from the first sketch, see :func:`auto_trace`;
    ``.method`` and ``meta["auto"]`` say which and why), ``"hutch++"``, ``"hutchinson"`` or ``"krylov++"``
    (see the module docstring for the estimators and their standard errors). ``block`` probes share one
    ``matmat`` (one data pass).

    ``memory_budget``: bytes of length-``P`` vectors held at once (default: half the available RAM / free
    GPU memory, :mod:`~dynascope.probes.budget`). Probes are streamed ``block`` at a time, never all
    ``[P, n_matvecs]``; where the budget binds, the signs are drawn per block, fewer go per product and the
    sketch shrinks (:func:`plan_trace`). ``meta`` records the budget, the plan and its formula
    (``memory_budget``, ``memory_formula``, ``vector_bytes``, ``block_used``, ``sketch_vectors``,
    ``probes_held``, ``budget_binds``) and the measured peak (``measured_peak_bytes``).
    """
    check_choice("method", method, TRACE_METHODS)
    check_int("n_matvecs", n_matvecs)
    check_int("seed", seed)
    t0 = time.perf_counter()
    op = spec.build(model, data)
    rec = RecordingOperator(op)
    budget = resolve_budget(memory_budget, op.device)
    plan = plan_trace(method, op.vspace.size, n_matvecs, _itemsize(op), block=block, budget=budget,
                      rows=op.size)  # fmt: skip
    auto = None
    with names_the_knob("hessian_trace", budget, plan.formula), peak_memory(op.device) as peak:
        if method == "auto":
            est, se, samples, low, auto = auto_trace(
                rec, n_matvecs, seed=seed, block=block, memory_budget=budget
            )
            used = auto.method
        else:
            est, se, samples, low = estimate_trace(
                rec, n_matvecs, method=method, seed=seed, block=block, memory_budget=budget
            )
            used = method
    settings = {"n_matvecs": n_matvecs, "method": method, **spec_settings(spec), "block": block,
                "memory_budget": memory_budget}  # fmt: skip
    meta = spectral_meta(
        "hessian_trace", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism, probes="rademacher",
        stderr_definition=(
            "std(z^T A z)/sqrt(m), Rademacher z" if used == "hutchinson"
            else "sqrt(2 mean||R g_i||^2 / s), R=(I-QQ^T)A(I-QQ^T), s residual probes; tr(Q^T A Q) exact"
            + ("; Q: sketch_vectors Lanczos steps" if used == "krylov++" else "")
        ),
        **plan.meta(), measured_peak_bytes=peak.bytes, measured_peak_how=peak.how,
        auto=None if auto is None else {
            "chosen": auto.method, "frobenius2": auto.frobenius2, "captured_share": auto.captured_share,
            "variance_ratio": auto.variance_ratio,
            "rule": "hutch++ when (||A||_F^2 - c)/(m - 2r) < ||A||_F^2/m, c: energy of half the sketch",
        },
    )  # fmt: skip
    return TraceResult(
        estimate=est, stderr=se, n_matvecs=rec.n_matvecs, method=used, samples=samples, lowrank_trace=low,
        meta=meta,
    )  # fmt: skip


__all__ = [
    "AutoChoice",
    "TracePlan",
    "TraceResult",
    "auto_trace",
    "TRACE_METHODS",
    "estimate_trace",
    "hessian_trace",
    "hutch_plus_plus",
    "hutchinson",
    "krylov_plus_plus",
    "plan_trace",
]
