"""The product self-check: right products pass, a wrong double backward is caught."""

from __future__ import annotations

import torch
from torch import nn

from dynascope.probes.operators import OperatorSpec
from dynascope.probes.selfcheck import check_product


def _data(d: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)


class _WrongSecondDerivative(torch.autograd.Function):
    """tanh whose first derivative is right and whose derivative of the derivative is off by 2×
    (written for torch.func: forward / setup_context / backward)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _Derivative.apply(g, y)


class _Derivative(torch.autograd.Function):
    @staticmethod
    def forward(g, y):
        return g * (1 - y * y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gg):
        g, y = ctx.saved_tensors
        # d/dy of g (1 - y²) is -2 g y; reporting -4 g y (and the exact d/dg) is the planted error
        return gg * (1 - y * y), gg * (-4 * g * y)


class _Planted(nn.Module):
    def forward(self, x):
        return _WrongSecondDerivative.apply(x)


def _check(model: nn.Module, dtype=torch.float64):
    x, y = _data()
    op = OperatorSpec(kind="hessian", loss="cross_entropy").build(
        model.to(dtype), (x.to(dtype), y)
    )
    return check_product(op)


def test_right_products_pass_in_float64_and_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    r64 = _check(model)
    assert r64["passed"] and r64["agreement"] < 1e-8, r64
    r32 = _check(model, torch.float32)
    assert r32["passed"] and r32["agreement"] < 1e-3, r32


def test_a_wrong_double_backward_is_caught() -> None:
    torch.manual_seed(0)
    planted = nn.Sequential(nn.Linear(4, 8), _Planted(), nn.Linear(8, 3))
    report = _check(planted)
    assert not report["passed"] and report["agreement"] > 100 * report["tolerance"], report
    # the same network with torch's tanh passes: the check blames the product, not the model
    honest = nn.Sequential(planted[0], nn.Tanh(), planted[2])
    assert _check(honest)["passed"]


def test_torch_weight_norm_double_backward_is_caught(monkeypatch) -> None:
    """torch 2.13's fused weight_norm: its double backward disagrees with its gradients (the probes
    evaluate it with plain ops, tests/test_architectures.py; here the fused op is kept on purpose)."""
    from torch.nn.utils.parametrizations import weight_norm

    from dynascope.probes import functional

    monkeypatch.setattr(functional, "plain_parametrizations", lambda model: model)
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.Tanh(), weight_norm(nn.Linear(8, 3)))
    report = _check(model)
    assert not report["passed"], report


def test_other_operators_are_not_checked() -> None:
    x, y = _data()
    op = OperatorSpec(kind="ggn", loss="cross_entropy").build(nn.Linear(4, 3).double(), (x, y))
    assert check_product(op)["passed"] is None


def test_spectral_probes_record_the_check_once_per_architecture_and_warn_on_failure() -> None:
    import pytest

    from dynascope.probes import hessian_eigenvalues, hessian_trace

    x, y = _data()
    torch.manual_seed(0)
    good = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    first = hessian_eigenvalues(good, (x, y), k=2, loss="cross_entropy")
    assert first.meta["product_check"]["passed"] and "cached" not in first.meta["product_check"]
    again = hessian_trace(good, (x, y), n_matvecs=6, loss="cross_entropy")
    assert again.meta["product_check"]["cached"]
    planted = nn.Sequential(nn.Linear(4, 8), _Planted(), nn.Linear(8, 3)).double()
    with pytest.warns(UserWarning, match="double backward is wrong"):
        bad = hessian_eigenvalues(planted, (x, y), k=2, loss="cross_entropy")
    assert bad.meta["product_check"]["passed"] is False
    ggn = hessian_eigenvalues(planted, (x, y), k=2, loss="cross_entropy", operator="ggn")
    assert ggn.meta["product_check"] is None


def test_piecewise_linear_models_get_no_verdict_rather_than_a_false_alarm() -> None:
    """A ReLU MLP on 512 digits: units switch inside the step, gradients jump, the differences disagree
    with each other (e ≈ 0.16): no verdict — never a false alarm."""
    from dynascope.datasets import load
    from dynascope.models import build

    x, y = load("digits", n_train=512).train
    model = build("mlp", in_dim=64, width=64, depth=2, out_dim=10, seed=0, activation="relu").double()
    report = check_product(OperatorSpec(kind="hessian").build(model, (x.double(), y)))
    assert report["passed"] is None and "no verdict" in report["reason"], report
