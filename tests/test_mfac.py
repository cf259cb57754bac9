"""M-FAC inverse products against dense float64 references: (λI + RᵀR/m)⁻¹V by a dense solve, the
spectrum by a dense eigendecomposition, and the gradient window against per-batch autograd gradients."""

from __future__ import annotations

import pytest
import torch

import dynascope.probes as probes
from dynascope.probes.mfac import MFACInverse


def _dense(R: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * torch.eye(R.shape[1], dtype=R.dtype) + R.T @ R / R.shape[0]


@pytest.mark.parametrize(("m", "d"), [(8, 50), (50, 20)])  # fewer gradients than parameters, and more
def test_inverse_products_and_spectrum_equal_dense(m: int, d: int) -> None:
    g = torch.Generator().manual_seed(m)
    R = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    lam = 1e-2
    op = MFACInverse(R, lam)
    V = torch.randn(d, 3, generator=g, dtype=torch.float64)
    F = _dense(R, lam)
    ref = torch.linalg.solve(F, V)
    assert torch.allclose(op @ V, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    assert torch.allclose(op.fisher(V), F @ V, rtol=1e-12, atol=0)
    ev = torch.linalg.eigvalsh(F).flip(0)[: min(m, d)]
    assert torch.allclose(op.eigenvalues(), ev, rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 3


def test_gradient_window_is_the_batch_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    W = probes.gradient_window(model, (x, y), 4)
    ref = []
    for xb, yb in zip(torch.tensor_split(x, 4), torch.tensor_split(y, 4)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.allclose(W, torch.stack(ref), rtol=1e-10, atol=1e-12)
    op = probes.mfac_inverse(model, (x, y), m=4, damping=1e-3)
    v = torch.randn(op.size, dtype=torch.float64)
    assert torch.allclose(op @ v, torch.linalg.solve(_dense(W, 1e-3), v), rtol=1e-8, atol=1e-8)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="damping must be > 0"):
        MFACInverse(torch.ones(2, 3, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match=r"\[m, d\] tensor"):
        MFACInverse(torch.ones(3, dtype=torch.float64), 1e-3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        MFACInverse(torch.tensor([[1.0, float("nan")]], dtype=torch.float64), 1e-3)
    model = torch.nn.Linear(2, 1).double()
    with pytest.raises(ValueError, match="need at least 5 samples"):
        probes.gradient_window(model, (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1).double()), 5)
