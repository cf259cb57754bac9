"""Block Lanczos: every copy of a repeated eigenvalue, restarts within a bounded basis, honest flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynascope.probes as probes
from dynascope.probes.lanczos import eigsh
from dynascope.probes.operators import DenseOperator, LinearOperator


def _gram(n: int, d: int, seed: int) -> torch.Tensor:
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X / n


def _rotated(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return Q @ torch.diag(eigenvalues.double()) @ Q.T


@pytest.mark.parametrize(("C", "k"), [(5, 6), (5, 12), (3, 7), (8, 9)])
def test_kronecker_spectrum_every_copy(C: int, k: int) -> None:
    """``A ⊗ I_C``: each eigenvalue of A appears C times; the top k must show all of them."""
    K = torch.kron(_gram(100, 20, seed=C), torch.eye(C, dtype=torch.float64))
    out = eigsh(DenseOperator(K), k=k, tol=1e-10, method="lanczos")  # the Lanczos path, not the dense one
    expected = torch.linalg.eigvalsh(K).flip(0)[:k]
    assert torch.allclose(out.values, expected, rtol=1e-8, atol=0), (out.values, expected)
    assert bool(out.converged.all())
    assert out.n_runs > 1  # locking found the copies a block of 2 cannot hold
    R = K @ out.vectors - out.vectors * out.values
    assert float(R.norm(dim=0).max()) < 1e-8
    gram = out.vectors.T @ out.vectors  # copies are distinct directions, not the same vector twice
    assert torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-8)


def test_single_vector_cannot_see_copies_block_can() -> None:
    """With block_size=1 and no locking help the copies would be missed; the result says so or finds them."""
    K = torch.kron(_gram(100, 20, seed=1), torch.eye(4, dtype=torch.float64))
    expected = torch.linalg.eigvalsh(K).flip(0)[:6]
    out = eigsh(DenseOperator(K), k=6, tol=1e-10, block_size=1)
    ok = torch.isclose(out.values, expected, rtol=1e-8, atol=0)
    assert bool(ok.all()) or not bool(out.converged[~ok].any()), "a wrong value was reported as converged"


def test_linear_multi_output_model_has_multiplicity_c() -> None:
    """nn.Linear(20, 5) with MSE: H = (2/(N·C)) XᵀX ⊗ I_C (+ bias); top 6 = λ₁ ×5, λ₂ (dense reference)."""
    torch.manual_seed(0)
    x, y = torch.randn(100, 20, dtype=torch.float64), torch.randn(100, 5, dtype=torch.float64)
    model = nn.Linear(20, 5).double()
    res = probes.hessian_eigenvalues(model, (x, y), k=6, loss="mse", tol=1e-10)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:100].reshape(5, 20), theta[100:]
        return ((x @ w.T + b - y) ** 2).mean()

    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta)).flip(0)[:6]
    assert torch.allclose(res.values, dense, rtol=1e-8, atol=1e-12)
    assert bool(res.converged.all())
    assert torch.allclose(res.values[:5], res.values[0].expand(5), rtol=1e-8)  # five copies of λ₁


def test_random_features_readout_has_multiplicity_outputs() -> None:
    """Random features (frozen first layer) + a C-output readout: the readout Hessian is Φᵀ Φ ⊗ I_C."""
    torch.manual_seed(1)
    C = 4
    model = nn.Sequential(nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, C)).double()
    model[0].requires_grad_(False)
    x, y = torch.randn(200, 10, dtype=torch.float64), torch.randn(200, C, dtype=torch.float64)
    res = probes.hessian_eigenvalues(model, (x, y), k=9, loss="mse", tol=1e-10, params="2.weight")
    phi = model[1](model[0](x))
    dense = torch.linalg.eigvalsh(torch.kron(2 * phi.T @ phi / (200 * C), torch.eye(C, dtype=torch.float64)))
    assert torch.allclose(res.values, dense.flip(0)[:9], rtol=1e-8)
    assert bool(res.converged.all())


def test_clustered_and_outlier_spectrum() -> None:
    """Outliers, a tight cluster of distinct values and a bulk: no value lost, none doubled."""
    lam = torch.cat([
        torch.tensor([40.0, 25.0, 25.0, 25.0]),  # an outlier and a triple eigenvalue
        10.0 + 1e-4 * torch.arange(4.0),  # a cluster of distinct values
        0.5 * torch.randn(192, generator=torch.Generator().manual_seed(2)),
    ]).double()  # fmt: skip
    A = _rotated(lam, seed=3)
    out = eigsh(DenseOperator(A), k=8, tol=1e-10)
    assert torch.allclose(out.values, torch.sort(lam, descending=True).values[:8], rtol=1e-8)
    assert bool(out.converged.all())


def test_restart_with_a_small_basis_still_converges() -> None:
    lam = torch.cat([torch.tensor([9.0, 8.5, 8.0]), torch.linspace(-1, 7, 297)]).double()
    A = _rotated(lam, seed=4)
    out = eigsh(DenseOperator(A), k=3, tol=1e-9, max_basis=12, max_iter=4000)
    assert torch.allclose(out.values, torch.tensor([9.0, 8.5, 8.0], dtype=torch.float64), rtol=1e-8)
    assert bool(out.converged.all()) and out.n_restarts > 0
    assert out.peak_basis_vectors <= 12


def test_full_cluster_without_room_is_not_called_converged() -> None:
    """A block of 2 finds copies of a 5-fold eigenvalue two at a time; when the product budget ends
    before the last copy is found, the values after the cluster must not be reported as converged."""
    K = torch.kron(_gram(100, 20, seed=5), torch.eye(5, dtype=torch.float64))
    out = eigsh(DenseOperator(K), k=6, tol=1e-10, max_iter=100)
    expected = torch.linalg.eigvalsh(K).flip(0)[:6]
    wrong = ~torch.isclose(out.values, expected, rtol=1e-8, atol=0)
    assert bool(wrong.any())  # the hidden copies were not found ...
    assert not bool(out.converged[wrong].any())  # ... and the displaced values say so


def test_memory_is_bounded_by_the_basis() -> None:
    A = _rotated(torch.linspace(0, 1, 500).double() ** 4, seed=6)
    out = eigsh(DenseOperator(A), k=5, tol=1e-8, max_basis=30, block_size=3)
    assert out.peak_basis_vectors <= 30
    assert out.memory_bytes(500, torch.float64) == out.peak_basis_vectors * 500 * 8


def test_default_max_basis_is_capped_by_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynascope.probes import lanczos

    # small models: 3k' + 20 + 2b; ResNet-18 in float32 (11.2M): 768 MiB hold 18 vectors; floor 2k' + 4 + 2b
    assert lanczos.default_max_basis(3, 2, 10_000, 4) == 33
    assert lanczos.default_max_basis(3, 2, 11_173_962, 4) == 18
    assert lanczos.default_max_basis(3, 2, 100_000_000, 4) == 14
    assert lanczos.default_max_basis(3, 2, 20, 8) == 20  # never more than P
    # the cap binds in eigsh: a 1 KiB budget on a 500-dimensional float64 problem -> the floor, still exact
    monkeypatch.setattr(lanczos, "BASIS_MEMORY_BYTES", 1024)
    lam = torch.cat([torch.tensor([9.0, 8.5, 8.0]), torch.linspace(-1, 7, 497)]).double()
    out = eigsh(DenseOperator(_rotated(lam, seed=8)), k=3, tol=1e-9, max_iter=4000)
    assert out.max_basis == 14 and out.peak_basis_vectors <= 14 and out.n_restarts > 0
    assert torch.allclose(out.values, torch.tensor([9.0, 8.5, 8.0], dtype=torch.float64), rtol=1e-8)
    assert bool(out.converged.all())


def test_basis_on_another_device_gives_the_same_values() -> None:
    A = _rotated(torch.linspace(-2, 5, 80).double(), seed=7)
    a = eigsh(DenseOperator(A), k=3, tol=1e-10)
    b = eigsh(DenseOperator(A), k=3, tol=1e-10, basis_device="cpu")
    assert torch.allclose(a.values, b.values, rtol=1e-12)


class _OOM(LinearOperator):
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")


def test_out_of_memory_propagates() -> None:
    with pytest.raises(torch.OutOfMemoryError):
        eigsh(_OOM(10, torch.float64, torch.device("cpu")), k=2)


def test_bad_block_arguments() -> None:
    op = DenseOperator(torch.eye(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        eigsh(op, k=2, block_size=0)
    with pytest.raises(ValueError, match="max_basis=5 is too small"):
        eigsh(op, k=3, max_basis=5)


def test_peak_memory_sees_an_allocation() -> None:
    from dynascope.probes.memory import peak_memory

    with peak_memory("cpu") as peak:
        big = torch.ones(64 * 1024 * 1024 // 8, dtype=torch.float64)  # 64 MiB, touched
        del big
    if peak.bytes is not None:  # Linux: peak RSS above the start
        assert peak.bytes >= 48 * 1024 * 1024


def test_hessian_eigenvalues_records_the_solver_and_its_memory() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    res = probes.hessian_eigenvalues(
        model, (torch.randn(64, 8), torch.randint(0, 3, (64,))), k=3, max_basis=20
    )
    P = sum(p.numel() for p in model.parameters())
    assert res.meta["block_size"] == 2 and res.meta["peak_basis_vectors"] <= 20
    assert res.meta["solver_memory_bytes"] == res.meta["peak_basis_vectors"] * P * 4
    assert res.meta["params"]["max_basis"] == 20
