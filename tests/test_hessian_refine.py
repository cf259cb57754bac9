"""Float64 Rayleigh–Ritz refinement of float32 Lanczos eigenpairs (``hessian_eigenvalues(refine=...)``).

Reference: the dense float64 Hessian of the model cast to float64, on float32-representable data
(so that the float64 operator and the reference see the same inputs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_operators import cases, dense_reference

import dynascope.probes as probes
from dynascope.probes.hessian import rayleigh_ritz64
from dynascope.probes.operators import DenseOperator


def float32_case(name: str):
    make, x, y = cases()[name]
    torch.manual_seed(0)
    model = make()  # float32 parameters
    x32 = x.float()
    H = dense_reference(copy.deepcopy(model).double(), x32.double(), y, "hessian")
    return model, x32, y, H


@pytest.mark.parametrize("case", ["mlp-ce", "cnn-bn"])
def test_refined_values_match_dense_float64(case: str) -> None:
    model, x, y, H = float32_case(case)
    lam = torch.linalg.eigvalsh(H).flip(0)[:3]
    plain = probes.hessian_eigenvalues(model, (x, y), k=3, tol=1e-5, refine=False)
    refined = probes.hessian_eigenvalues(model, (x, y), k=3, tol=1e-5, refine=True)
    err_plain = float(((plain.values - lam).abs() / lam.abs()).max())
    err_refined = float(((refined.values - lam).abs() / lam.abs()).max())
    assert 1e-9 < err_plain < 1e-5, err_plain  # float32 products: ~1e-7..1e-8
    assert err_refined <= 1e-9, (err_refined, err_plain)
    assert refined.values.dtype == torch.float64 and bool(refined.converged.all())
    # the reported residuals are the true float64 residuals of the returned (float64) vectors
    U = refined.vectors
    assert U.dtype == torch.float64 and U.shape == (H.shape[0], 3)
    true_res = (H @ U - U * refined.values).norm(dim=0)
    assert torch.allclose(refined.residuals, true_res, rtol=1e-6, atol=1e-13), (refined.residuals, true_res)
    assert torch.allclose(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-12)
    # product accounting: k float64 products on top of the Lanczos ones
    m = refined.meta
    assert m["refined"] is True and m["n_matvecs_refine"] == 3
    assert refined.n_matvecs == m["n_matvecs"] == m["krylov_dim"] + 3
    assert len(m["lanczos_residuals"]) == 3
    assert plain.meta["refined"] is False and plain.meta["n_matvecs_refine"] == 0
    # the float64 products of the CNN ran its convolution through the gather + matmul path
    assert (m["refine_conv2d_gemm"] > 0) == (case == "cnn-bn") and plain.meta["refine_conv2d_gemm"] == 0
    assert plain.n_matvecs == plain.meta["krylov_dim"]


def test_refined_residuals_are_honest_where_float32_lanczos_underestimates() -> None:
    model, x, y, H = float32_case("mlp-ce")
    plain = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-6, refine=False, solver="lanczos")
    refined = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-6, refine=True, solver="lanczos")
    U32 = plain.vectors.double()
    true_plain = (H @ U32 - U32 * plain.values).norm(dim=0)
    # the Lanczos estimate β|s_m| of the float32 run is far below the true residual of its top pair ...
    assert float(plain.residuals[0]) < 0.1 * float(true_plain[0])
    # ... while the refined residual is the true float64 one
    U = refined.vectors
    assert torch.allclose(refined.residuals, (H @ U - U * refined.values).norm(dim=0), rtol=1e-6)


def test_auto_rule_and_return_vectors() -> None:
    model, x, y, _ = float32_case("mlp-ce")
    default = probes.hessian_eigenvalues(model, (x, y), k=2)  # tol 1e-4: no refinement
    assert default.meta["refined"] is False and default.vectors.dtype == torch.float32
    tight = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-5, return_vectors=False)
    assert tight.meta["refined"] is True and tight.vectors is None and tight.meta["n_matvecs_refine"] == 2
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    r64 = probes.hessian_eigenvalues(m64, (x64, y), k=2, tol=1e-6)  # float64 model: auto never refines
    assert r64.meta["refined"] is False
    forced = probes.hessian_eigenvalues(m64, (x64, y), k=2, tol=1e-6, refine=True)  # reuses the operator
    assert forced.meta["refined"] is True and forced.meta["n_matvecs_refine"] == 2
    assert torch.allclose(forced.values, r64.values, rtol=1e-10)
    with pytest.raises(ValueError, match="refine"):
        probes.hessian_eigenvalues(model, (x, y), k=2, refine="yes")


def test_rayleigh_ritz64_exact_on_invariant_subspace() -> None:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 5.0, 30, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    # a non-orthonormal float32 basis of the top-3 eigenspace, mixed
    Y = Q[:, -3:] @ torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    out = rayleigh_ritz64(DenseOperator(A), Y.float())
    assert out.n_matvecs == 3
    assert torch.allclose(out.values, lam[-3:].flip(0), atol=1e-10)  # angle O(eps32): error O(eps32²)
    assert torch.allclose(out.residuals, (A @ out.vectors - out.vectors * out.values).norm(dim=0), atol=1e-14)


@pytest.mark.parametrize("case", ["mlp-ce", "cnn-bn"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_refine_with_batches_and_reduce_fn(kind: str, case: str) -> None:
    """The float64 copy keeps the operator kind, batching (func backend: vmap-ed products, through the
    gather + matmul convolution for the CNN) and the shard reduction."""
    model, x, y, _ = float32_case(case)
    H = dense_reference(copy.deepcopy(model).double(), x.double(), y, kind)
    lam = torch.linalg.eigvalsh(H).flip(0)[:2]
    calls: list[int] = []

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return t

    res = probes.hessian_eigenvalues(
        model, (x, y), k=2, tol=1e-5, operator=kind, batch_size=4, reduce_fn=reduce_fn, refine=True
    )
    assert res.meta["backend"] == "func" and res.meta["refined"] is True
    assert float(((res.values - lam).abs() / lam).max()) <= 1e-9
    assert any(n == 2 * H.shape[0] for n in calls)  # the float64 matmat of 2 vectors was reduced
    assert (res.meta["refine_conv2d_gemm"] > 0) == (case == "cnn-bn")
