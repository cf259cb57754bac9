"""Lanczos against dense eigendecompositions and closed-form spectra."""

from __future__ import annotations

import pytest
import torch
from dense import random_symmetric

from dynascope.probes.lanczos import eigsh, lanczos_tridiagonal
from dynascope.probes.operators import DenseOperator


def deep_net_like_spectrum(n: int = 300, seed: int = 0) -> torch.Tensor:
    """A few separated outliers above a clustered bulk near zero (both signs), as in deep nets."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([50.0, 31.0, 22.0, 14.0, 9.0, 6.5])
    bulk = 0.3 * torch.randn(n - outliers.numel(), generator=g, dtype=torch.float64)
    return torch.cat([outliers.double(), bulk])


def test_top_k_matches_eigvalsh_to_1e8() -> None:
    A = random_symmetric(torch.randn(80, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3)
    op = DenseOperator(A)
    out = eigsh(op, k=5, tol=1e-10, max_iter=80)
    expected = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert torch.allclose(out.values, expected, rtol=1e-8, atol=0)
    assert bool(out.converged.all())
    # eigenvectors: A y = θ y, residuals as reported
    R = A @ out.vectors - out.vectors * out.values
    assert torch.allclose(R.norm(dim=0), out.residuals, rtol=1e-4, atol=1e-10)


def test_known_spectrum_outliers_and_bulk() -> None:
    lam = deep_net_like_spectrum()
    op = DenseOperator(random_symmetric(lam, seed=1))
    out = eigsh(op, k=5, tol=1e-8)
    assert torch.allclose(
        out.values, torch.tensor([50.0, 31.0, 22.0, 14.0, 9.0], dtype=torch.float64), rtol=1e-8
    )
    assert out.n_matvecs < 100, "separated outliers should converge in far fewer products than n"
    assert out.n_matvecs == out.n_iter


@pytest.mark.parametrize("which", ["SA", "LM", "BE"])
def test_other_ends(which: str) -> None:
    lam = torch.linspace(-4, 7, 60, dtype=torch.float64) ** 3 / 50
    A = random_symmetric(lam, seed=2)
    out = eigsh(DenseOperator(A), k=3, which=which, tol=1e-10, max_iter=60)
    s = torch.sort(lam, descending=True).values
    expected = {
        "SA": s[-3:],
        "LM": torch.sort(lam[torch.argsort(lam.abs(), descending=True)[:3]], descending=True).values,
        "BE": torch.cat([s[:3], s[-3:]]),
    }[which]
    assert torch.allclose(out.values, expected, rtol=1e-8)


def test_unconverged_values_are_reported_as_such() -> None:
    lam = torch.linspace(0, 1, 400, dtype=torch.float64)  # no gap: slow convergence
    out = eigsh(DenseOperator(random_symmetric(lam)), k=3, tol=1e-12, max_iter=12)
    assert out.n_iter == 12
    assert not bool(out.converged.all())
    assert bool((out.residuals > 0).all())


def test_warm_start_from_previous_eigenvectors_saves_products() -> None:
    lam = deep_net_like_spectrum(seed=4)
    A = random_symmetric(lam, seed=5)
    cold = eigsh(DenseOperator(A), k=3, tol=1e-8)
    B = A + 1e-3 * random_symmetric(torch.randn(lam.numel(), dtype=torch.float64), seed=6)  # next checkpoint
    cold_b = eigsh(DenseOperator(B), k=3, tol=1e-8)
    warm_b = eigsh(DenseOperator(B), k=3, tol=1e-8, v0=cold.vectors)
    assert torch.allclose(warm_b.values, cold_b.values, rtol=1e-8)
    assert warm_b.n_matvecs < cold_b.n_matvecs


def test_invariant_subspace_restart_finds_repeated_and_zero_eigenvalues() -> None:
    lam = torch.tensor([5.0, 5.0, 3.0] + [0.0] * 17, dtype=torch.float64)  # rank 3, a double eigenvalue
    out = eigsh(DenseOperator(random_symmetric(lam, seed=7)), k=4, tol=1e-10, max_iter=20)
    assert torch.allclose(out.values, torch.tensor([5.0, 5.0, 3.0, 0.0], dtype=torch.float64), atol=1e-9)


def test_bad_arguments() -> None:
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="which"):
        eigsh(op, which="XX")
    with pytest.raises(ValueError, match="k must be"):
        eigsh(op, k=5)
    with pytest.raises(ValueError, match="v0"):
        eigsh(op, k=1, v0=torch.zeros(4))


def test_tridiagonal_batch_is_gauss_quadrature() -> None:
    """m-step Lanczos integrates polynomials of degree < 2m exactly: Σ τ_j θ_j^p = vᵀA^p v / vᵀv."""
    lam = deep_net_like_spectrum(n=120, seed=8)
    A = random_symmetric(lam, seed=9)
    V0 = torch.randn(120, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    tri = lanczos_tridiagonal(DenseOperator(A), V0, steps=10)
    assert tri.alpha.shape == (4, 10)
    for i in range(4):
        theta, tau = tri.ritz(i)
        assert torch.isclose(tau.sum(), torch.tensor(1.0, dtype=torch.float64))
        v = V0[:, i]
        for p in range(1, 8):
            exact = v @ torch.linalg.matrix_power(A, p) @ v / (v @ v)
            assert torch.isclose((tau * theta**p).sum(), exact, rtol=1e-8)


def test_tridiagonal_breakdown_stops_that_probe() -> None:
    lam = torch.tensor(
        [2.0, 1.0, 0.5] + [0.0] * 9, dtype=torch.float64
    )  # 4 distinct values: breaks at step 4
    A = random_symmetric(lam, seed=11)
    tri = lanczos_tridiagonal(DenseOperator(A), torch.randn(12, 2, dtype=torch.float64), steps=8)
    assert tri.steps.tolist() == [4, 4]
    theta, tau = tri.ritz(0)
    assert torch.allclose(theta, torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64), atol=1e-9)
