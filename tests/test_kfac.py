"""KFAC and EKFAC against exact float64 references: the GGN G = (1/N) Σ_n J_nᵀ H_n J_n from explicit
Jacobians. KFAC equals G where its factorisation is exact (one linear layer under MSE: the output
Hessian is constant); EKFAC's eigenvalues are the diagonal of each exact GGN block in the KFAC eigenbasis
(its definition) for Linear and Conv2d layers; the operator's eigenvalues equal those of its dense
matrix. With curvlinops installed (benchmark-only: it pins another torch), both equal its
``KFACLinearOperator`` / ``EKFACLinearOperator`` (type-2, expand) on a model no other test uses."""

from __future__ import annotations

import pytest
import torch
from dense import flat_params
from torch import nn
from torch.func import functional_call, jacrev

import dynascope.probes as probes
from dynascope.probes.kronecker import KFACOperator


def _dense_ggn(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    theta, unflat = flat_params(model)
    J = jacrev(lambda th: functional_call(model, unflat(th), (x,)))(theta)  # [N, C, P]
    out = model(x).detach()
    n, c = out.shape
    if loss == "mse":
        H = (2.0 / c) * torch.eye(c, dtype=out.dtype).expand(n, c, c)
    else:
        p = out.softmax(1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / n


def _dense(op: KFACOperator) -> torch.Tensor:
    return op @ torch.eye(op.size, dtype=torch.float64)


def _slices(model: nn.Module) -> dict[str, slice]:
    out, lo = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(lo, lo + p.numel())
        lo += p.numel()
    return out


def test_kfac_is_the_ggn_of_a_linear_layer_under_mse() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    K = _dense(probes.kfac(model, (x, y)))
    G = _dense_ggn(model, x, "mse")
    sl = _slices(model)
    for name in ("weight", "bias"):  # the diagonal blocks; KFAC keeps weight and bias apart
        assert torch.allclose(K[sl[name], sl[name]], G[sl[name], sl[name]], rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(K[sl["weight"], sl["bias"]]) == 0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kfac_eigenbasis(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
        x = torch.randn(10, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)
        ).double()
        x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (x.shape[0],))
    op = probes.ekfac(model, (x, y))
    G, sl = _dense_ggn(model, x, "cross_entropy"), _slices(model)
    for lay in op.layers:
        w = sl[f"{lay.name}.weight"]
        Q = torch.kron(lay.QB, lay.QA)  # vec of an [out, in] matrix, row-major: index (i, j) → i·in + j
        assert torch.allclose(
            torch.diagonal(Q.T @ G[w, w] @ Q), lay.lam_w.reshape(-1), rtol=1e-10, atol=1e-14
        )
        b = sl[f"{lay.name}.bias"]
        assert torch.allclose(torch.diagonal(lay.QB.T @ G[b, b] @ lay.QB), lay.lam_b, rtol=1e-10, atol=1e-14)
    for each in (op, probes.kfac(model, (x, y))):
        dense = _dense(each)
        assert torch.allclose(dense, dense.T, atol=1e-14)
        ev = torch.linalg.eigvalsh(dense).flip(0)
        assert torch.allclose(each.eigenvalues(), ev, rtol=1e-9, atol=1e-13)


def test_equal_to_curvlinops_on_an_unseen_model() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(4, 2, 2), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 8), nn.SiLU(), nn.Linear(8, 5),
    ).double()  # fmt: skip
    x = torch.randn(9, 1, 8, 8, dtype=torch.float64)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, dtype=torch.float64)
    for y, loss in (
        (torch.randint(0, 5, (9,)), nn.CrossEntropyLoss()),
        (torch.randn(9, 5).double(), nn.MSELoss()),
    ):
        for ours, theirs in (
            (probes.kfac, curvlinops.KFACLinearOperator),
            (probes.ekfac, curvlinops.EKFACLinearOperator),
        ):
            ref = theirs(model, loss, list(model.parameters()), [(x, y)], fisher_type="type-2",
                         check_deterministic=False) @ V  # fmt: skip
            got = ours(model, (x, y)) @ V
            assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max())), (
                ours.__name__,
                loss,
            )


def test_refusals_name_what_is_unsupported() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match=r"\['1.weight', '1.bias'\] belong to other modules"):
        probes.kfac(model, data)
    with pytest.raises(ValueError, match="supports the losses"):
        probes.kfac(nn.Linear(3, 2).double(), data, loss="huber")
    with pytest.raises(ValueError, match=r"needs a \[N, C\] model output"):
        probes.kfac(
            nn.Linear(3, 2).double(),
            (torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 2).double()),
        )


def test_shared_layers_are_refused() -> None:
    """A layer called twice per forward, or two layers tying one weight, would mix their statistics."""
    lin = nn.Linear(3, 3).double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match="called more than once per forward"):
        probes.kfac(nn.Sequential(lin, nn.Tanh(), lin), data)
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False)).double()
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied weights"):
        probes.kfac(tied, data)
