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
from .lanczos import breakdown_rtol
from .operators import LinearOperator, OperatorSpec, random_vectors
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


def _quadratic_forms(op: LinearOperator, Z: torch.Tensor, block: int) -> torch.Tensor:
    """``z_iᵀ A z_i`` for the columns of ``Z`` (float64), one ``matmat`` per block of columns."""
    out = []
    for lo, n in zip(range(0, Z.shape[1], block), _blocks(Z.shape[1], block)):
        Zb = Z[:, lo : lo + n]
        out.append((Zb.double() * op.matmat(Zb).double()).sum(dim=0))
    return torch.cat(out).cpu()


def hutchinson(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32
) -> tuple[float, float, torch.Tensor]:
    """Hutchinson with Rademacher probes: ``(estimate, stderr, samples)``."""
    if n_matvecs < 2:
        raise ValueError(f"hutchinson needs n_matvecs >= 2 for a standard error; got {n_matvecs}")
    Z = random_vectors(op.size, n_matvecs, seed=seed, dtype=op.dtype, device=op.device, kind="rademacher")
    s = _quadratic_forms(op, Z, block)
    return float(s.mean()), float(s.std() / math.sqrt(s.numel())), s


def _sketch(op: LinearOperator, S: torch.Tensor, block: int) -> torch.Tensor:
    """``A S`` in blocks of columns."""
    return torch.cat(
        [
            op.matmat(S[:, lo : lo + n])
            for lo, n in zip(range(0, S.shape[1], block), _blocks(S.shape[1], block))
        ],
        dim=1,
    )


def _deflate_sketch(
    op: LinearOperator, AS: torch.Tensor, G: torch.Tensor, block: int
) -> tuple[float, float, torch.Tensor, float]:
    """Hutch++ given the sketch ``A S``: ``Q = orth(AS)``, ``tr(QᵀAQ)`` exactly (``r`` products) and
    Hutchinson on the deflated residual with the probes ``G``."""
    s = G.shape[1]
    Q, _ = torch.linalg.qr(AS.double())
    Q = Q.to(op.dtype)
    AQ = _sketch(op, Q, block)
    low = float((Q.double() * AQ.double()).sum())
    Gp = G - Q @ (Q.T @ G)  # (I − QQᵀ) g
    samples, sq_norms = [], []
    for lo, n in zip(range(0, s, block), _blocks(s, block)):
        Gb = Gp[:, lo : lo + n]
        RGb = op.matmat(Gb)
        RGb = RGb - Q @ (Q.T @ RGb)  # R g with R = (I−QQᵀ)A(I−QQᵀ)
        samples.append((Gb.double() * RGb.double()).sum(dim=0))
        sq_norms.append(RGb.double().pow(2).sum(dim=0))
    res = torch.cat(samples).cpu()
    frob2 = float(torch.cat(sq_norms).mean())  # unbiased estimate of ‖R‖_F²
    return low + float(res.mean()), math.sqrt(2.0 * frob2 / s), res, low


def hutch_plus_plus(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32
) -> tuple[float, float, torch.Tensor, float]:
    """Hutch++: ``(estimate, stderr, residual samples, tr(QᵀAQ))`` using exactly ``n_matvecs`` products.

    Split ``n_matvecs = 2r + s`` with ``r = n_matvecs // 3`` (``s ≥ r``, ``s ≥ 2``).
    """
    if n_matvecs < 4:
        raise ValueError(
            f"hutch++ needs n_matvecs >= 4 (sketch, projection, >= 2 residual probes); got {n_matvecs}"
        )
    r = min(n_matvecs // 3, op.size)
    s = n_matvecs - 2 * r
    probes = random_vectors(op.size, r + s, seed=seed, dtype=op.dtype, device=op.device, kind="rademacher")
    return _deflate_sketch(op, _sketch(op, probes[:, :r], block), probes[:, r:], block)


@dataclass(frozen=True)
class AutoChoice:
    """What :func:`auto_trace` saw in its sketch: ``‖A‖_F²`` (estimated), the share of it that half the
    sketch captures, the predicted variance ratio Hutch++/Hutchinson and the method chosen."""

    frobenius2: float
    captured_share: float
    variance_ratio: float
    method: str


def auto_trace(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32
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
    ``m − 2r`` columns.
    """
    if n_matvecs < 4:
        raise ValueError(f"auto needs n_matvecs >= 4 (as hutch++); got {n_matvecs}")
    r = min(n_matvecs // 3, op.size)
    s = n_matvecs - 2 * r
    # the same probes as hutchinson(op, m, seed): when Hutchinson is chosen the result is exactly its own
    probes = random_vectors(
        op.size, n_matvecs, seed=seed, dtype=op.dtype, device=op.device, kind="rademacher"
    )
    S = probes[:, :r]
    AS = _sketch(op, S, block)
    Y = AS.double()
    total = float(Y.pow(2).sum())
    frob2 = total / r
    half = r // 2
    captured = 0.0
    if half >= 1 and r - half >= 1 and total > 0:
        Y1, Y2 = Y[:, :half], Y[:, half:]
        Q1, Q2 = torch.linalg.qr(Y1)[0], torch.linalg.qr(Y2)[0]
        captured = float((Q1.T @ Y2).pow(2).sum() + (Q2.T @ Y1).pow(2).sum()) / total
    captured = min(max(captured, 0.0), 1.0)
    ratio = ((1.0 - captured) / max(s, 1)) / (1.0 / n_matvecs) if total > 0 else 1.0
    if ratio < 1.0:
        est, se, res, low = _deflate_sketch(op, AS, probes[:, r : r + s], block)
        method = "hutch++"
    else:
        res = torch.cat(
            [(S.double() * AS.double()).sum(dim=0).cpu(), _quadratic_forms(op, probes[:, r:], block)]
        )
        est, se, low = float(res.mean()), float(res.std() / math.sqrt(res.numel())), 0.0
        method = "hutchinson"
    return est, se, res, low, AutoChoice(frob2, captured, ratio, method)


def _residual_hutchinson(
    op: LinearOperator, Q: torch.Tensor, G: torch.Tensor, block: int
) -> tuple[torch.Tensor, float]:
    """Hutchinson on ``R = (I − QQᵀ) A (I − QQᵀ)``: samples ``(Pg)ᵀ A (Pg)`` for the columns ``g`` of ``G``
    and the unbiased estimate ``mean ‖R g‖²`` of ``‖R‖_F²`` (``Q`` orthonormal columns, ``P = I − QQᵀ``)."""
    s = G.shape[1]
    Gp = G - Q @ (Q.T @ G)
    Gp = Gp - Q @ (Q.T @ Gp)  # second sweep: P g orthogonal to Q to working precision
    samples, sq_norms = [], []
    for lo, n in zip(range(0, s, block), _blocks(s, block)):
        Gb = Gp[:, lo : lo + n]
        RGb = op.matmat(Gb)
        RGb = RGb - Q @ (Q.T @ RGb)
        samples.append((Gb.double() * RGb.double()).sum(dim=0))
        sq_norms.append(RGb.double().pow(2).sum(dim=0))
    return torch.cat(samples).cpu(), float(torch.cat(sq_norms).mean())


def krylov_plus_plus(
    op: LinearOperator,
    n_matvecs: int,
    *,
    seed: int = 0,
    block: int = 32,
    krylov_dim: int | None = None,
    krylov_block: int = 1,
) -> tuple[float, float, torch.Tensor, float]:
    """Krylov-deflated Hutchinson: ``(estimate, stderr, residual samples, tr(QᵀAQ))``, exactly ``n_matvecs``
    products.

    ``k = krylov_dim`` (default ``n_matvecs // 3``, at most ``P``) steps of block Lanczos (block size
    ``krylov_block``, full reorthogonalisation) from Gaussian start vectors give ``Q [P, k]`` and
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
    k = min(k, op.size)
    s = n_matvecs - k
    gen = torch.Generator().manual_seed(seed)  # one stream: start block, replacements, residual probes

    def fresh(n: int) -> torch.Tensor:
        return torch.randn(op.size, n, generator=gen, dtype=torch.float64).to(
            device=op.device, dtype=op.dtype
        )

    def orth_against(W: torch.Tensor, Qj: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # two Gram-Schmidt sweeps
            W = W - Qj @ (Qj.T @ W)
        return W

    Q = torch.zeros(op.size, k, dtype=op.dtype, device=op.device)
    W = fresh(min(krylov_block, k))
    low, scale, j = 0.0, 0.0, 0
    while True:
        Qb, Rb = torch.linalg.qr(W)
        lost = Rb.diagonal().abs() <= breakdown_rtol(op.dtype) * max(scale, float(Rb.diagonal().abs().max()))
        if bool(lost.any()):  # invariant subspace: continue from fresh directions orthogonal to Q
            W = W.clone()
            W[:, lost] = orth_against(fresh(int(lost.sum())), Q[:, :j])
            Qb, _ = torch.linalg.qr(W)
            Qb, _ = torch.linalg.qr(orth_against(Qb, Q[:, :j]))
        nb = min(Qb.shape[1], k - j)
        Qb = Qb[:, :nb]
        Q[:, j : j + nb] = Qb
        AQb = op.matmat(Qb)
        low += float((Qb.double() * AQb.double()).sum())
        scale = max(scale, float(AQb.norm(dim=0).max()))
        j += nb
        if j == k:
            break
        W = orth_against(AQb, Q[:, :j])
    G = torch.randint(0, 2, (op.size, s), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    res, frob2 = _residual_hutchinson(op, Q, G.to(device=op.device, dtype=op.dtype), block)
    return low + float(res.mean()), math.sqrt(2.0 * frob2 / s), res, low


def estimate_trace(
    op: LinearOperator, n_matvecs: int, *, method: str = "auto", seed: int = 0, block: int = 32
) -> tuple[float, float, torch.Tensor, float]:
    """Trace of any symmetric :class:`LinearOperator`: ``(estimate, stderr, samples, lowrank_trace)``."""
    check_choice("method", method, TRACE_METHODS)
    check_int("n_matvecs", n_matvecs)
    if method == "auto":
        return auto_trace(op, n_matvecs, seed=seed, block=block)[:4]
    if method == "hutchinson":
        est, se, s = hutchinson(op, n_matvecs, seed=seed, block=block)
        return est, se, s, 0.0
    if method == "krylov++":
        return krylov_plus_plus(op, n_matvecs, seed=seed, block=block)
    return hutch_plus_plus(op, n_matvecs, seed=seed, block=block)


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    loss: str | Callable = "auto",
    output: Any = None,
    n_matvecs: int = 100,
    method: str = "auto",
    operator: str = "hessian",
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block: int = 32,
    reduce_fn: Callable | None = None,
    check_determinism: bool = True,
) -> TraceResult:
    """``tr(A)`` of the Hessian / GGN / Fisher of the dataset-mean loss with exactly ``n_matvecs`` products.

    ``method="auto"`` (default: Hutch++ or Hutchinson chosen from the first sketch, see :func:`auto_trace`;
    ``.method`` and ``meta["auto"]`` say which and why), ``"hutch++"``, ``"hutchinson"`` or ``"krylov++"``
    (see the module docstring for the estimators and their standard errors). ``block`` probes share one
    ``matmat`` (one data pass).
    """
    check_choice("method", method, TRACE_METHODS)
    check_int("n_matvecs", n_matvecs)
    check_int("seed", seed)
    t0 = time.perf_counter()
    op = OperatorSpec(
        kind=operator, loss=loss, output=output, params=params, batch_size=batch_size, mode=mode, dtype=dtype,
        device=device, reduce_fn=reduce_fn,
    ).build(model, data)  # fmt: skip
    rec = RecordingOperator(op)
    auto = None
    if method == "auto":
        est, se, samples, low, auto = auto_trace(rec, n_matvecs, seed=seed, block=block)
        used = auto.method
    else:
        est, se, samples, low = estimate_trace(rec, n_matvecs, method=method, seed=seed, block=block)
        used = method
    settings = {"n_matvecs": n_matvecs, "method": method, "params": params, "batch_size": batch_size,
                "block": block}  # fmt: skip
    meta = spectral_meta(
        "hessian_trace", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism, probes="rademacher",
        stderr_definition=(
            "std(z^T A z)/sqrt(m), Rademacher z" if used == "hutchinson"
            else "sqrt(2 mean||R g_i||^2 / s), R=(I-QQ^T)A(I-QQ^T), s residual probes; tr(Q^T A Q) exact"
            + ("; Q: n_matvecs//3 Lanczos steps" if used == "krylov++" else "")
        ),
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
    "TraceResult",
    "auto_trace",
    "TRACE_METHODS",
    "estimate_trace",
    "hessian_trace",
    "hutch_plus_plus",
    "hutchinson",
    "krylov_plus_plus",
]
