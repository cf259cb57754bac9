"""Loss-perturbation sharpness: how much the training loss rises when the weights are perturbed.

* Worst case (ASAM, Kwon et al. 2021): ``max_{‖T⁻¹ε‖₂ ≤ ρ} L(w+ε) − L(w)``, ``T = diag(|w| + η)``, by
  projected normalized gradient ascent (:func:`adaptive_sharpness`; m-sharpness over disjoint batches).
* Average case: ``E_ε[L(w+ε)] − L(w)``, ``ε = σ (|w| + η) ⊙ z``, ``z ~ N(0, I)`` by seeded Monte Carlo
  (:func:`average_sharpness`); ``½ σ² tr(T H T)`` for a quadratic loss.

``L`` is the dataset-mean loss (see :mod:`dynascope.probes.losses`). Curvature sharpness (λ_max of the
Hessian, the 2/η thresholds) lives in :mod:`dynascope.probes.curvature_sharpness`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..datasets.batching import as_batches, slice_inputs
from .curvature_setup import takes_operator_spec
from .curvature_sharpness import _mean_sem
from .functional import ModeGuard
from .operators import CurvatureOperator, OperatorSpec, random_vectors
from .results import Result, make_meta, train_randomness
from .validation import check_float, check_int

#: The operator keywords of the loss-perturbation probes (they evaluate the loss only: no operator kind,
#: no shard reduction).
LOSS_KEYWORDS = ("loss", "params", "batch_size", "mode", "dtype", "device")


# ---------------------------------------------------------------------------------------------- SAM-style
@dataclass(frozen=True, kw_only=True)
class AdaptiveSharpnessResult(Result):
    """ASAM-style worst-case sharpness ``max_{‖T⁻¹ε‖≤ρ} L(w+ε) − L(w)``, ``T = diag(|w| + η)``.

    ``sharpness`` is the best value found by ``ascent_steps`` projected normalized-gradient-ascent steps
    (a lower bound of the true maximum; 1 step = the ASAM/SAM closed form). With ``m``: the mean over
    disjoint batches of size m of each batch's worst-case sharpness (m-sharpness); ``per_batch`` holds them.
    """

    sharpness: float
    loss_value: float
    perturbed_loss: float
    rho: float
    eta: float
    ascent_steps: int
    m: int | None
    step_values: list[float]
    per_batch: list[float] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class AverageSharpnessResult(Result):
    """Average-case adaptive sharpness ``E_{ε~N(0, σ² diag(|w|+η)²)}[L(w+ε)] − L(w)`` (Monte Carlo).

    ``samples``: per-draw increases (per antithetic pair means when ``meta.params.antithetic``).
    """

    sharpness: float
    stderr: float
    loss_value: float
    sigma: float
    eta: float
    n_samples: int
    samples: list[float]


def _loss_fn(op: CurvatureOperator) -> Callable[[torch.Tensor, bool], tuple[float, torch.Tensor | None]]:
    """``θ ↦ (L(θ), ∇L(θ) or None)`` for flat parameter vectors of the operator's block."""

    def f(theta: torch.Tensor, need_grad: bool) -> tuple[float, torch.Tensor | None]:
        total = 0.0
        g = torch.zeros_like(theta) if need_grad else None
        with ModeGuard(op.model, op.mode):
            for b in op.source:
                fb = op._batch_loss_fn(b.x, b.y)
                if need_grad:
                    gd, val = torch.func.grad_and_value(fb)(op.space.split(theta))
                    g += op.space.flatten(gd)  # type: ignore[operator]
                else:
                    with torch.no_grad():
                        val = fb(op.space.split(theta))
                total += float(val)
        return total, g

    return f


def _worst_case(
    op: CurvatureOperator, rho: float, eta: float, ascent_steps: int
) -> tuple[float, float, float, list[float]]:
    f = _loss_fn(op)
    w = op.parameters_vector()
    T = w.abs() + eta
    l0, _ = f(w, False)
    delta = torch.zeros_like(w)
    values: list[float] = []
    best_l = l0
    for t in range(ascent_steps):
        _, g = f(w + T * delta, True)
        u = T * g  # type: ignore[operator]
        un = float(u.norm())
        if un == 0.0:
            break
        delta = delta + (rho / math.sqrt(t + 1)) * u / un
        dn = float(delta.norm())
        if dn > rho:
            delta = delta * (rho / dn)
        lt, _ = f(w + T * delta, False)
        values.append(lt - l0)
        best_l = max(best_l, lt)
    return max([0.0, *values]) if values else 0.0, l0, best_l, values


def _subsets(
    data: Any, m: int, seed: int, max_batches: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = as_batches(data).tensors()
    n = y.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"m must be between 1 and the number of samples {n}; got {m}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(y.device)
    count = n // m if max_batches is None else min(n // m, max_batches)
    parts = [order[i * m : (i + 1) * m] for i in range(count)]
    return [(slice_inputs(x, idx), y[idx]) for idx in parts]


def _meta(
    probe: str, op: CurvatureOperator, settings: dict[str, Any], *, seed: int, started: float, **extra: Any
) -> dict[str, Any]:
    """The ``.meta`` of a loss-perturbation probe: its settings with the loss and seed, the operator's keys
    and the stochastic modules (train mode: dropout makes the perturbed losses random)."""
    return make_meta(
        probe, model=op.model, params={**settings, "loss": op.loss.name, "seed": seed}, started=started,
        **op.meta(), stochastic_modules=train_randomness(probe, op.model, op.mode), **extra,
    )  # fmt: skip


@takes_operator_spec(*LOSS_KEYWORDS)
def adaptive_sharpness(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    rho: float = 0.5,
    eta: float = 0.01,
    ascent_steps: int = 1,
    m: int | None = None,
    max_batches: int | None = None,
    seed: int = 0,
) -> AdaptiveSharpnessResult:
    """ASAM worst-case adaptive sharpness ``max_{‖T_w⁻¹ε‖₂ ≤ ρ} L(w+ε) − L(w)``, ``T_w = diag(|w| + η)``.

    ``spec``: the loss and parameters (an :class:`~dynascope.probes.operators.OperatorSpec`; only the loss
    is evaluated), or its fields as keywords (``loss``, ``params``, ``batch_size``, ``mode``, ``dtype``,
    ``device``). Solved in ``δ = T⁻¹ε`` by ``ascent_steps`` steps of projected normalized gradient ascent
    from δ = 0 with step ``ρ/√(t+1)`` (step t = 0, 1, ...), ascent direction ``T ∇L(w + Tδ)``; the first
    step lands on the ASAM closed form ``ε = ρ T² ∇L / ‖T ∇L‖``. Reports the largest increase over the
    iterates (≥ 0). ``m``: m-sharpness — the average over disjoint random batches of size m (at most
    ``max_batches``) of each batch's own worst case.
    """
    check_float("rho", rho, min=0, min_open=True)
    check_float("eta", eta, min=0)
    check_int("ascent_steps", ascent_steps, min=1)
    check_int("m", m, min=1, optional=True)
    check_int("max_batches", max_batches, min=1, optional=True)
    check_int("seed", seed)
    started = time.perf_counter()
    op = spec.build(model, data)
    s, l0, lbest, values = _worst_case(op, float(rho), float(eta), ascent_steps)
    per_batch: list[float] = []
    if m is not None:
        batch_spec = spec.replace(batch_size=None)
        for xb, yb in _subsets(data, m, seed, max_batches):
            per_batch.append(_worst_case(batch_spec.build(model, (xb, yb)), rho, eta, ascent_steps)[0])
    settings = {"rho": rho, "eta": eta, "ascent_steps": ascent_steps, "m": m, "max_batches": max_batches}
    meta = _meta(
        "adaptive_sharpness", op, settings, seed=seed, started=started,
        m_sharpness="per disjoint batch of size m, then the mean over batches" if m is not None else None,
        ball="||T^-1 eps||_2 <= rho, T = diag(|w| + eta), all selected parameters",
        solver="projected normalized gradient ascent in T^-1 eps, step rho/sqrt(t+1); max over iterates",
    )  # fmt: skip
    return AdaptiveSharpnessResult(
        sharpness=_mean_sem(per_batch)[0] if per_batch else s,
        loss_value=l0,
        perturbed_loss=lbest,
        rho=float(rho),
        eta=float(eta),
        ascent_steps=ascent_steps,
        m=m,
        step_values=values,
        per_batch=per_batch,
        meta=meta,
    )


@takes_operator_spec(*LOSS_KEYWORDS)
def average_sharpness(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    sigma: float = 0.01,
    eta: float = 0.0,
    n_samples: int = 20,
    antithetic: bool = True,
    seed: int = 0,
) -> AverageSharpnessResult:
    """Average-case adaptive sharpness ``E_ε[L(w+ε)] − L(w)`` with ``ε = σ (|w| + η) ⊙ z``, ``z ~ N(0, I)``.

    ``spec``: the loss and parameters, or its fields as keywords (as in :func:`adaptive_sharpness`).
    Monte Carlo with ``n_samples`` loss evaluations at seeded draws. ``antithetic=True`` (default) pairs
    ``±ε`` and averages each pair, which removes the first-order term ``∇Lᵀε`` from the variance
    (``samples`` then holds ``n_samples // 2`` pair means); ``stderr`` = std(samples) / √len(samples).
    For a quadratic loss the expectation is ``½ σ² tr(T H T)``, ``T = diag(|w| + η)``.
    """
    check_float("sigma", sigma, min=0, min_open=True)
    check_float("eta", eta, min=0)
    check_int("n_samples", n_samples, min=2)
    if antithetic and n_samples < 4:
        raise ValueError(f"antithetic sampling needs n_samples >= 4 (two pairs); got {n_samples}")
    check_int("seed", seed)
    started = time.perf_counter()
    op = spec.build(model, data)
    f = _loss_fn(op)
    w = op.parameters_vector()
    T = w.abs() + eta
    l0, _ = f(w, False)
    if antithetic:
        Z = random_vectors(op.size, n_samples // 2, seed=seed, dtype=op.dtype, device=op.device)
        samples = [
            0.5 * (f(w + sigma * T * Z[:, i], False)[0] + f(w - sigma * T * Z[:, i], False)[0]) - l0
            for i in range(Z.shape[1])
        ]
    else:
        Z = random_vectors(op.size, n_samples, seed=seed, dtype=op.dtype, device=op.device)
        samples = [f(w + sigma * T * Z[:, i], False)[0] - l0 for i in range(n_samples)]
    mean, sem = _mean_sem(samples)
    settings = {"sigma": sigma, "eta": eta, "n_samples": n_samples, "antithetic": antithetic}
    meta = _meta("average_sharpness", op, settings, seed=seed, started=started,
                 noise="eps = sigma * (|w| + eta) * z, z ~ N(0, I), seeded CPU generator")  # fmt: skip
    return AverageSharpnessResult(
        sharpness=mean,
        stderr=sem,
        loss_value=l0,
        sigma=float(sigma),
        eta=float(eta),
        n_samples=n_samples,
        samples=samples,
        meta=meta,
    )


__all__ = ["AdaptiveSharpnessResult", "AverageSharpnessResult", "adaptive_sharpness", "average_sharpness"]

