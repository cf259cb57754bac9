"""Curvature sharpness: closed forms on quadratics, dense references for preconditioned sharpness,
batch sharpness, warm starts (the trajectory over checkpoints: test_sharpness_track.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.func import functional_call

from dynascope.probes.curvature_sharpness import sharpness

D = torch.float64


def _linear_problem(n: int = 40, d: int = 6, out: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randn(n, out, generator=g, dtype=D)
    torch.manual_seed(seed)
    model = nn.Linear(d, out).double()
    Xt = torch.cat([X, torch.ones(n, 1, dtype=D)], dim=1)  # [X, 1]: weight then bias
    return model, X, y, Xt


def _mlp(seed: int = 0, d: int = 4, h: int = 5, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _dense_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, params, (X,)), y)

    return torch.autograd.functional.hessian(f, _flat_params(model))


def test_quadratic_lambda_max_and_trace_equal_closed_form() -> None:
    model, X, y, Xt = _linear_problem()
    # loss="mse" on one output: L = (1/N) Σ (wᵀx + b − y)², H = (2/N) X̃ᵀX̃ exactly
    H = 2.0 * Xt.T @ Xt / X.shape[0]
    evals = torch.linalg.eigvalsh(H).flip(0)
    lr = 0.9  # 2/η = 2.22 lies between λ_max and tr(H): GD unstable, the trace check fails too
    res = sharpness(model, (X, y), loss="mse", lr=lr, k=3, tol=1e-8, trace_matvecs=30)
    assert res.eigenvalues == pytest.approx(evals[:3].tolist(), rel=1e-8)
    assert res.lambda_max == pytest.approx(float(evals[0]), rel=1e-8)
    assert res.trace == pytest.approx(float(H.trace()), rel=1e-8)  # 7 params ≤ 30/3: Hutch++ is exact
    assert res.two_over_lr == pytest.approx(2 / lr)
    assert res.ratio == pytest.approx(float(evals[0]) / (2 / lr))
    assert res.gd_stable is (float(evals[0]) <= 2 / lr)
    assert res.sgd_trace_stable is (float(H.trace()) <= 2 / lr)
    assert all(res.converged)
    assert res.eigenvectors is not None and res.eigenvectors.shape == (7, 3)
    # eigenvector of λ_max agrees with the dense one up to sign
    dense_vec = torch.linalg.eigh(H).eigenvectors[:, -1]
    assert abs(float(dense_vec @ res.eigenvectors[:, 0])) == pytest.approx(1.0, abs=1e-6)


def test_half_sse_multi_output_closed_form_and_no_lr() -> None:
    model, X, y, Xt = _linear_problem(out=3, seed=1)
    # half_sse: L = (1/N) Σ ½‖Wx + b − y‖², H = I₃ ⊗ X̃ᵀX̃ / N (same eigenvalues, each three times)
    A = Xt.T @ Xt / X.shape[0]
    res = sharpness(model, (X, y), loss="half_sse", k=1, tol=1e-8, trace_matvecs=90)
    assert res.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]), rel=1e-8)
    assert res.trace == pytest.approx(3 * float(A.trace()), rel=1e-8)
    assert res.lr is None and res.two_over_lr is None and res.ratio is None and res.gd_stable is None


def test_gd_stability_flag_follows_threshold() -> None:
    model, X, y, Xt = _linear_problem()
    lam = float(torch.linalg.eigvalsh(2.0 * Xt.T @ Xt / X.shape[0])[-1])
    stable = sharpness(model, (X, y), loss="mse", lr=1.9 / lam, trace=False)
    unstable = sharpness(model, (X, y), loss="mse", lr=2.1 / lam, trace=False)
    assert stable.gd_stable is True and unstable.gd_stable is False
    assert stable.trace is None and stable.sgd_trace_stable is None


def _adam_model(steps: int = 6, lr: float = 0.05):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (30,), generator=g)
    model = _mlp(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, opt, X, y


def test_preconditioned_sharpness_adam_equals_dense_generalized_eigenvalue() -> None:
    model, opt, X, y = _adam_model()
    H = _dense_hessian(model, X, y, nn.functional.cross_entropy)
    beta1, beta2 = opt.param_groups[0]["betas"]
    eps = opt.param_groups[0]["eps"]
    diag = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        v_hat = st["exp_avg_sq"].double() / (1 - beta2**t)
        diag.append(((1 - beta1**t) * (v_hat.sqrt() + eps)).reshape(-1))
    P = torch.cat(diag)
    # λ_max of P⁻¹H: generalized symmetric problem H u = λ P u
    ref = scipy.linalg.eigh(H.numpy(), np.diag(P.numpy()), eigvals_only=True)[-1]
    res = sharpness(model, (X, y), optimizer_state=opt, tol=1e-9, trace=False)
    assert res.preconditioned_lambda_max == pytest.approx(float(ref), rel=1e-7)
    assert res.optimizer == "adam"
    assert res.lr == pytest.approx(0.05)
    assert res.preconditioned_threshold == pytest.approx(38 / 0.05)  # (2 + 2β₁)/((1 − β₁)η), β₁ = 0.9
    assert res.preconditioned_ratio == pytest.approx(float(ref) / (38 / 0.05), rel=1e-7)
    assert res.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)

    # the same from the name-keyed form a run folder stores
    from dynascope.models import optimizer_state_by_name

    named = optimizer_state_by_name(opt, model)
    res2 = sharpness(model, (X, y), optimizer_state=named, tol=1e-9, trace=False)
    assert res2.preconditioned_lambda_max == pytest.approx(float(ref), rel=1e-7)
    # an explicit lr overrides the state's and rescales the threshold only
    res3 = sharpness(model, (X, y), optimizer_state=opt, lr=0.1, tol=1e-9, trace=False)
    assert res3.preconditioned_lambda_max == pytest.approx(float(ref), rel=1e-7)
    assert res3.preconditioned_threshold == pytest.approx(38 / 0.1)


def test_preconditioned_sharpness_rmsprop_with_momentum() -> None:
    g = torch.Generator().manual_seed(4)
    X = torch.randn(25, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (25,), generator=g)
    model = _mlp(seed=4)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    H = _dense_hessian(model, X, y, nn.functional.cross_entropy)
    P = torch.cat(
        [(opt.state[p]["square_avg"].double().sqrt() + 1e-8).reshape(-1) for p in model.parameters()]
    )
    Dm = torch.diag(P.rsqrt())
    ref = float(torch.linalg.eigvalsh(Dm @ H @ Dm)[-1])
    res = sharpness(model, (X, y), optimizer_state=opt, tol=1e-9, trace=False)
    assert res.preconditioned_lambda_max == pytest.approx(ref, rel=1e-7)
    assert res.preconditioned_threshold == pytest.approx((2 + 2 * 0.5) / 0.01)


def test_batch_sharpness_at_least_full_batch_on_a_partition() -> None:
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (40,), generator=g)
    model = _mlp(seed=5)
    # 4 disjoint batches of 10 partition the data: mean_B H_B = H, and λ_max is convex
    res = sharpness(model, (X, y), batch_size_for_batch_sharpness=10, n_batches=4, tol=1e-8, trace=False)
    assert res.batch_lambdas is not None and len(res.batch_lambdas) == 4
    assert res.batch_sharpness >= res.lambda_max
    assert res.batch_sharpness == pytest.approx(float(np.mean(res.batch_lambdas)))
    # each directional curvature g_BᵀH_Bg_B/‖g_B‖² is at most that batch's λ_max
    assert all(d <= lam + 1e-9 for d, lam in zip(res.batch_directional, res.batch_lambdas))
    frame = res.to_frame()
    assert {"rank", "eigenvalue", "lambda_max", "batch_sharpness"} <= set(frame.columns)


def test_warm_start_reuses_eigenvectors() -> None:
    model, opt, X, y = _adam_model()
    cold = sharpness(model, (X, y), k=2, tol=1e-6, trace=False)
    warm = sharpness(model, (X, y), k=2, tol=1e-6, trace=False, v0=cold.eigenvectors)
    assert warm.eigenvalues == pytest.approx(cold.eigenvalues, rel=1e-5)
    assert warm.n_matvecs < cold.n_matvecs
    assert warm.meta["params"]["warm_start"] is True


def test_results_export_and_bad_inputs() -> None:
    model, opt, X, y = _adam_model(steps=2)
    res = sharpness(model, (X, y), lr=0.05, optimizer_state=opt, k=2, trace_matvecs=12)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["eigenvectors"] == {"shape": [res.eigenvectors.shape[0], 2]}
    assert d["meta"]["probe"] == "sharpness" and d["meta"]["mode"] == "eval"
    assert d["meta"]["preconditioned"]["optimizer"] == "adam"
    assert len(res.figure().data) >= 1
    with pytest.raises(ValueError, match="lr"):
        sharpness(model, (X, y), lr=-1.0)
    with pytest.raises(ValueError, match="k must"):
        sharpness(model, (X, y), k=0)
    with pytest.raises(TypeError, match="optimizer_state"):
        sharpness(model, (X, y), optimizer_state=[1, 2])
    with pytest.raises(ValueError, match="batch_size_for_batch_sharpness"):
        sharpness(model, (X, y), batch_size_for_batch_sharpness=1000, trace=False)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no parameter group|nothing"):
        # an optimizer over other tensors does not describe this model
        sharpness(
            model,
            (X, y),
            optimizer_state={
                "format": "dynascope.optim/1",
                "optimizer": "adam",
                "state": {},
                "param_groups": [{"params": ["x"], "lr": 1}],
            },
        )
    res_sgd = sharpness(model, (X, y), optimizer_state=sgd, trace=False)
    assert res_sgd.preconditioned_lambda_max == pytest.approx(res_sgd.lambda_max, rel=1e-6)
    assert res_sgd.preconditioned_threshold == pytest.approx(3.8 / 0.1)  # heavy ball: (2 + 2μ)/η
