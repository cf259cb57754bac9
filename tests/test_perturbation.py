"""Loss-perturbation sharpness: ASAM worst case against its closed form and quadratic bound,
average case against ½σ² tr(T H T)."""

from __future__ import annotations

import json

import pytest
import torch
from test_curvature_sharpness import _adam_model, _flat_params, _linear_problem

from dynascope.probes.perturbation import adaptive_sharpness, average_sharpness


def test_adaptive_sharpness_one_step_is_asam_closed_form_and_more_steps_do_better() -> None:
    model, X, y, Xt = _linear_problem(seed=6)
    rho, eta = 0.3, 0.01
    w = _flat_params(model)
    T = w.abs() + eta
    H = 2.0 * Xt.T @ Xt / X.shape[0]
    r = Xt @ w - y[:, 0]
    loss = lambda v: float(((Xt @ v - y[:, 0]) ** 2).mean())  # noqa: E731
    gvec = 2.0 * Xt.T @ r / X.shape[0]
    eps = rho * T**2 * gvec / (T * gvec).norm()  # ASAM: ε = ρ T² ∇L / ‖T ∇L‖
    one = adaptive_sharpness(model, (X, y), loss="mse", rho=rho, eta=eta, ascent_steps=1)
    assert one.sharpness == pytest.approx(loss(w + eps) - loss(w), rel=1e-10)
    many = adaptive_sharpness(model, (X, y), loss="mse", rho=rho, eta=eta, ascent_steps=25)
    # quadratic: L(w+Tδ) − L(w) = (T∇L)ᵀδ + ½ δᵀ(THT)δ ≤ ρ‖T∇L‖ + ½ρ² λ_max(THT)
    bound = rho * float((T * gvec).norm()) + 0.5 * rho**2 * float(
        torch.linalg.eigvalsh(T[:, None] * H * T)[-1]
    )
    assert one.sharpness <= many.sharpness <= bound + 1e-12
    assert many.sharpness > one.sharpness  # the curvature term is not captured by the first step
    assert one.meta["params"]["rho"] == rho and one.meta["params"]["ascent_steps"] == 1
    m_sharp = adaptive_sharpness(model, (X, y), loss="mse", rho=rho, eta=eta, m=10)
    assert len(m_sharp.per_batch) == 4 and all(v >= 0 for v in m_sharp.per_batch)
    json.dumps(many.to_dict())


def test_average_sharpness_matches_quadratic_expectation() -> None:
    model, X, y, Xt = _linear_problem(seed=7)
    sigma = 0.2
    w = _flat_params(model)
    H = 2.0 * Xt.T @ Xt / X.shape[0]
    expected = 0.5 * sigma**2 * float((w.abs() ** 2 * torch.diagonal(H)).sum())  # ½σ² tr(T H T), T = |w|
    res = average_sharpness(model, (X, y), loss="mse", sigma=sigma, n_samples=400, seed=1)
    assert abs(res.sharpness - expected) < 4 * res.stderr
    assert res.stderr < 0.2 * expected  # the test has power
    assert len(res.samples) == 200 and res.meta["params"]["sigma"] == sigma
    plain = average_sharpness(model, (X, y), loss="mse", sigma=sigma, n_samples=400, seed=1, antithetic=False)
    assert abs(plain.sharpness - expected) < 4 * plain.stderr
    assert res.stderr < plain.stderr  # antithetic pairs cancel the first-order term


def test_bad_inputs() -> None:
    model, _opt, X, y = _adam_model(steps=2)
    with pytest.raises(ValueError, match="rho"):
        adaptive_sharpness(model, (X, y), rho=0.0)
