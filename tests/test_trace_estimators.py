"""Trace estimators (Hutchinson, Hutch++, Krylov++) against exact dense float64 traces.

Synthetic symmetric matrices with known spectra (low rank, repeated eigenvalues, outliers above a bulk
of both signs) and the dense Hessian of a tiny model (tests/test_operators.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from dense import random_symmetric
from test_hessian_probes import outliers_plus_bulk  # outliers over a bulk of both signs
from test_operators import cases, dense_reference

import dynascope.probes as probes
from dynascope.probes.operators import DenseOperator
from dynascope.probes.trace import TRACE_METHODS, estimate_trace, krylov_plus_plus


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_krylov_exact_when_krylov_space_covers_the_rank(rank: int) -> None:
    """Rank-r A: K_{r+1}(A, q) = span{q} + range(A) is invariant, so (I−QQᵀ)A = 0: zero residual."""
    g = torch.Generator().manual_seed(rank)
    lam = torch.zeros(90, dtype=torch.float64)
    lam[:rank] = torch.randn(rank, generator=g, dtype=torch.float64) * 5  # both signs
    A = random_symmetric(lam, seed=rank)
    op = DenseOperator(A)
    k = rank + 1
    est, se, samples, low = krylov_plus_plus(op, k + 4, seed=3, krylov_dim=k)
    assert op.n_matvecs == k + 4
    assert est == pytest.approx(float(lam.sum()), abs=1e-10 * float(lam.abs().sum()))
    assert low == pytest.approx(float(lam.sum()), abs=1e-10 * float(lam.abs().sum()))
    assert se <= 1e-10 * float(lam.abs().sum()) and samples.abs().max() <= 1e-10 * float(lam.abs().sum())
    # one Krylov dimension short of the rank: no longer exact (the test can fail)
    est_short, _, _, _ = krylov_plus_plus(DenseOperator(A), rank + 4, seed=3, krylov_dim=rank)
    assert abs(est_short - float(lam.sum())) > 1e-8 * float(lam.abs().sum())


def test_krylov_exact_at_full_dimension_through_restarts() -> None:
    """Three distinct eigenvalues: Lanczos hits an invariant subspace after 3 steps and must restart
    (orthogonal fresh direction) to span the space; with k = P the trace is exact (also block Lanczos)."""
    lam = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64).repeat_interleave(torch.tensor([4, 9, 7]))
    A = random_symmetric(lam, seed=7)
    P = A.shape[0]
    for method in ("krylov++", "hutch++"):
        est, se, _, _ = estimate_trace(DenseOperator(A), 3 * P, method=method, seed=1)
        assert est == pytest.approx(float(lam.sum()), abs=1e-10), method
        assert se <= 1e-10
    for b in (2, 6):
        est, se, _, low = krylov_plus_plus(DenseOperator(A), P + 5, seed=2, krylov_dim=P, krylov_block=b)
        assert est == pytest.approx(float(lam.sum()), abs=1e-10) and low == pytest.approx(est, abs=1e-10)


def test_block_krylov_exact_on_low_rank() -> None:
    """Block Krylov [Ω, AΩ, …] with block b contains range(A) once k ≥ rank + b: exact; k = rank: not."""
    lam = torch.zeros(70, dtype=torch.float64)
    lam[:6] = torch.tensor([9.0, -4.0, 3.0, 2.0, -1.5, 1.0], dtype=torch.float64)
    A = random_symmetric(lam, seed=4)
    est, se, _, _ = krylov_plus_plus(DenseOperator(A), 12, seed=0, krylov_dim=9, krylov_block=3)
    assert est == pytest.approx(float(lam.sum()), abs=1e-10) and se <= 1e-10
    est, _, _, _ = krylov_plus_plus(DenseOperator(A), 12, seed=0, krylov_dim=6, krylov_block=3)
    assert abs(est - float(lam.sum())) > 1e-8


def test_krylov_low_rank_part_is_the_trace_of_the_krylov_compression() -> None:
    """Definition check: lowrank_trace = tr(QᵀAQ) for Q an orthonormal basis of
    K_k(A, q0) = span{q0, A q0, …, A^{k-1} q0} with q0 the seeded Gaussian start vector, and the
    samples are (Pg)ᵀA(Pg) for the next Rademacher draws of the same generator, P = I − QQᵀ."""
    A = random_symmetric(outliers_plus_bulk(60, seed=1), seed=2)
    k, s, seed = 4, 5, 11
    est, se, samples, low = krylov_plus_plus(DenseOperator(A), k + s, seed=seed, krylov_dim=k)
    gen = torch.Generator().manual_seed(seed)
    q0 = torch.randn(60, generator=gen, dtype=torch.float64)
    K = torch.stack([torch.linalg.matrix_power(A, j) @ q0 for j in range(k)], dim=1)
    Q, _ = torch.linalg.qr(K)
    assert low == pytest.approx(float(torch.trace(Q.T @ A @ Q)), rel=1e-9)
    G = torch.randint(0, 2, (60, s), generator=gen, dtype=torch.int8).double() * 2 - 1
    Pm = torch.eye(60, dtype=torch.float64) - Q @ Q.T
    R = Pm @ A @ Pm
    assert torch.allclose(samples, (G * (R @ G)).sum(0), rtol=1e-8, atol=1e-10)
    assert est == pytest.approx(low + float(samples.mean()), rel=1e-12)
    assert se == pytest.approx(math.sqrt(2 * float((R @ G).pow(2).sum(0).mean()) / s), rel=1e-8)


# ------------------------------------------------------------------------------ statistics
def test_unbiased_honest_stderr_and_more_accurate_than_hutch_plus_plus() -> None:
    """300 seeds on outliers + bulk (n = 300, 30 products): the mean of the estimates is within 3.5
    standard errors of the mean of the true trace, ±2 stderr covers the truth in ≥ 90 % of seeds, and the
    Krylov basis (10 dims for 10 products) beats Hutch++'s sketch (10 dims for 20 products)."""
    lam = outliers_plus_bulk(300, seed=2)
    A = random_symmetric(lam, seed=3)
    true = float(lam.sum())
    n_seeds = 300
    out: dict[str, torch.Tensor] = {}
    for method in ("krylov++", "hutch++"):
        rows = [estimate_trace(DenseOperator(A), 30, method=method, seed=seed)[:2] for seed in range(n_seeds)]
        out[method] = torch.tensor(rows, dtype=torch.float64)
    est, se = out["krylov++"][:, 0], out["krylov++"][:, 1]
    assert abs(float(est.mean()) - true) <= 3.5 * float(est.std()) / math.sqrt(n_seeds)
    coverage = float(((est - true).abs() <= 2 * se).double().mean())
    assert coverage >= 0.9, coverage
    mae = {m: float((v[:, 0] - true).abs().mean()) for m, v in out.items()}
    assert mae["krylov++"] < 0.8 * mae["hutch++"], mae  # measured 0.70 (20 vs 10 residual probes)


# ------------------------------------------------------------------------------ real model
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_krylov_hessian_trace_matches_dense(kind: str) -> None:
    make, x, y = cases()["mlp-ce"]
    torch.manual_seed(0)
    model = make().double()
    H = dense_reference(model, x, y, kind)
    P = H.shape[0]
    true = float(H.trace())
    exact = probes.hessian_trace(model, (x, y), n_matvecs=3 * P, method="krylov++", operator=kind)
    assert exact.n_matvecs == 3 * P and exact.method == "krylov++"
    assert exact.estimate == pytest.approx(true, abs=1e-9 * float(H.abs().sum()))
    assert exact.lowrank_trace == pytest.approx(true, abs=1e-9 * float(H.abs().sum()))
    for seed in range(4):
        r = probes.hessian_trace(model, (x, y), n_matvecs=12, method="krylov++", seed=seed, operator=kind)
        assert r.n_matvecs == 12 and r.stderr > 0 and r.samples.numel() == 8
        assert abs(r.estimate - true) <= 3 * r.stderr, (seed, r.estimate, true, r.stderr)
    assert "Lanczos" in r.meta["stderr_definition"]


def test_krylov_bad_arguments() -> None:
    op = DenseOperator(random_symmetric(outliers_plus_bulk(20), seed=0))
    assert "krylov++" in TRACE_METHODS
    with pytest.raises(ValueError, match="n_matvecs >= 4"):
        estimate_trace(op, 3, method="krylov++")
    with pytest.raises(ValueError, match="krylov_dim"):
        krylov_plus_plus(op, 10, krylov_dim=9)
    with pytest.raises(ValueError, match="krylov_dim"):
        krylov_plus_plus(op, 10, krylov_dim=0)
    with pytest.raises(ValueError, match="krylov_block"):
        krylov_plus_plus(op, 10, krylov_block=0)
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_trace(op, 10, method="xtrace ")


@pytest.mark.parametrize("kind", ["bulk", "outliers"])
def test_auto_is_never_worse_than_the_better_estimator(kind: str) -> None:
    """Multi-seed rms error of method="auto" ≤ min(Hutchinson, Hutch++) + 10 % (relative), at 100 products."""
    import math

    from dynascope.probes.trace import auto_trace, hutch_plus_plus, hutchinson

    g = torch.Generator().manual_seed(0)
    n = 400
    if kind == "bulk":  # a wide bulk: Hutch++ wastes two thirds of its products
        lam = torch.rand(n, generator=g, dtype=torch.float64) * 0.1 + 0.05
    else:  # a few outliers dominate ‖A‖_F: deflation wins
        lam = torch.cat(
            [torch.tensor([80.0, 60, 40, 30, 20, 15, 10, 8, 6, 5]), 0.05 * torch.randn(n - 10, generator=g)]
        )
        lam = lam.double()
    op, tr = DenseOperator(random_symmetric(lam, seed=1)), float(lam.sum())
    errs: dict[str, list[float]] = {"hutchinson": [], "hutch++": [], "auto": []}
    chosen, ratios = set(), []
    for seed in range(24):
        errs["hutchinson"].append(hutchinson(op, 100, seed=seed)[0] - tr)
        errs["hutch++"].append(hutch_plus_plus(op, 100, seed=seed)[0] - tr)
        est, _, _, _, choice = auto_trace(op, 100, seed=seed)
        errs["auto"].append(est - tr)
        chosen.add(choice.method)
        ratios.append(round(choice.variance_ratio, 3))
    rms = {k: math.sqrt(sum(e * e for e in v) / len(v)) for k, v in errs.items()}
    assert rms["auto"] <= 1.1 * min(rms["hutchinson"], rms["hutch++"]), rms
    assert chosen == ({"hutchinson"} if kind == "bulk" else {"hutch++"}), ratios
    if kind == "bulk":
        # choosing Hutchinson returns its estimate (the same probes, no product wasted) up to the rounding
        # of the products, which BLAS may sum in another order for another block of columns: each sample
        # zᵀAz (|z| = 1) is off by at most 2γₙ·1ᵀ|A|1 with γₙ = n·ε / (1 − n·ε), in both estimators
        eps = torch.finfo(torch.float64).eps
        bound = 4 * (n * eps / (1 - n * eps)) * float(op.matrix.abs().sum())
        gaps = [abs(a - h) for a, h in zip(errs["auto"], errs["hutchinson"])]
        assert max(gaps) <= bound, (max(gaps), bound)


def test_auto_is_the_default_and_says_what_it_chose() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = (torch.randn(40, 5), torch.randint(0, 3, (40,)))
    res = probes.hessian_trace(model, data, n_matvecs=30)
    assert res.method in ("hutch++", "hutchinson") and res.n_matvecs == 30
    assert res.meta["params"]["method"] == "auto" and res.meta["auto"]["chosen"] == res.method
    assert 0.0 <= res.meta["auto"]["captured_share"] <= 1.0
