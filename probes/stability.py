"""Sharpness of the training loss: λ_max, trace, stability thresholds, preconditioned and batch sharpness.

All curvature is that of the dataset-mean loss ``L(θ) = (1/N) Σ_i ℓ_i`` (see
:mod:`dynascope.probes.losses`; use ``loss="half_sse"`` for the ½‖f − y‖² convention of the
edge-of-stability papers).

* ``λ_max(H)`` by Lanczos (:func:`~dynascope.probes.lanczos.eigsh`, residual-based convergence,
  warm-startable with ``v0=`` previous eigenvectors) and ``tr(H)`` by Hutch++
  (:func:`~dynascope.probes.trace.estimate_trace` on the same operator).
* Stability of full-batch GD on the local quadratic: ``λ_max ≤ 2/η`` (``gd_stable``); the linear-stability
  check used for SGD, ``tr(H) ≤ 2/η`` (``sgd_trace_stable``); ``ratio = λ_max / (2/η)``.
* Preconditioned sharpness ``λ_max(P⁻¹H)`` of Adam/RMSProp/Adagrad/momentum-SGD state against its own
  threshold (Cohen et al. 2022; see :mod:`dynascope.probes.preconditioning`).
* Batch sharpness: the mean over ``n_batches`` disjoint random mini-batches B of size b of
  ``λ_max(H_B)``, ``H_B`` the Hessian of the batch-mean loss. Since λ_max is convex and the mean of
  ``H_B`` over a partition of the data is H, the mean over a full partition is ≥ λ_max(H).
  Also reported: the directional form ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` (``batch_directional_sharpness``,
  the "batch sharpness" of Andreyev & Beneventano 2024, "Edge of stochastic stability").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..datasets.batching import as_batches
from .lanczos import eigsh
from .losses import Loss
from .operators import CurvatureOperator, make_operator, random_vectors
from .preconditioning import DiagonalScaledOperator, preconditioner_from_state
from .results import Result, make_meta


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True, kw_only=True)
class SharpnessResult(Result):
    """Sharpness of the training loss at one point (see :mod:`dynascope.probes.stability`).

    Threshold fields are ``None`` when no learning rate is known; preconditioned fields are ``None``
    without optimizer state; batch fields are ``None`` without ``batch_size_for_batch_sharpness``.
    ``eigenvectors`` ([P, k], for warm starts) is left out of ``to_dict``.
    """

    lambda_max: float
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    trace: float | None
    trace_stderr: float | None
    loss_value: float
    lr: float | None
    two_over_lr: float | None
    ratio: float | None
    gd_stable: bool | None
    sgd_trace_stable: bool | None
    n_matvecs: int
    preconditioned_lambda_max: float | None = None
    preconditioned_threshold: float | None = None
    preconditioned_ratio: float | None = None
    preconditioned_stable: bool | None = None
    optimizer: str | None = None
    batch_size: int | None = None
    batch_lambdas: list[float] | None = None
    batch_sharpness: float | None = None
    batch_sharpness_stderr: float | None = None
    batch_directional: list[float] | None = None
    batch_directional_sharpness: float | None = None
    eigenvectors: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["eigenvectors"] = None if self.eigenvectors is None else {"shape": list(self.eigenvectors.shape)}
        return d

    def summary(self) -> dict[str, Any]:
        """The scalar fields only (one row of :meth:`to_frame`)."""
        d = self.to_dict()
        return {k: v for k, v in d.items() if k != "meta" and not isinstance(v, (list, dict))}

    def to_frame(self):  # -> pandas.DataFrame
        """One row per computed eigenvalue (``rank`` 1..k) with the scalar fields repeated."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "rank": list(range(1, len(self.eigenvalues) + 1)),
                "eigenvalue": self.eigenvalues,
                "residual": self.residuals,
                "eigen_converged": self.converged,
            }
        )
        for k, v in self.summary().items():
            frame[k] = v
        return frame

    def figure(self):  # -> plotly.graph_objects.Figure
        """Top-k eigenvalues (and the batch λ_max distribution) against the 2/η threshold."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(
            x=[f"λ{i + 1}" for i in range(len(self.eigenvalues))],
            y=self.eigenvalues,
            mode="markers",
            name="full-batch eigenvalues",
        )
        if self.batch_lambdas:
            fig.add_box(
                y=self.batch_lambdas, x=["batch λ_max"] * len(self.batch_lambdas), name=f"b={self.batch_size}"
            )
        if self.two_over_lr is not None:
            fig.add_hline(y=self.two_over_lr, line_dash="dash", annotation_text="2/η")
        title = f"λ_max = {self.lambda_max:.4g}"
        if self.trace is not None:
            title += f", tr(H) = {self.trace:.4g}"
        if self.ratio is not None:
            title += f", λ_max/(2/η) = {self.ratio:.3g}"
        fig.update_layout(title=title, yaxis_title="Hessian eigenvalue")
        return fig


# ---------------------------------------------------------------------------------------------- helpers
def _mean_sem(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    sem = float(t.std(unbiased=True)) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return float(t.mean()), sem


def _batch_sharpness(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int,
    n_batches: int,
    seed: int,
    tol: float,
    v0: torch.Tensor | None,
    op_kwargs: dict[str, Any],
    max_iter: int | None,
) -> tuple[list[float], list[float], int]:
    """λ_max(H_B) and g_Bᵀ H_B g_B/‖g_B‖² over disjoint random mini-batches (seeded permutations)."""
    x, y = as_batches(data).tensors()
    n = x.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size_for_batch_sharpness must be between 1 and {n}; got {batch_size}")
    gen = torch.Generator().manual_seed(seed + 104729)
    order = torch.empty(0, dtype=torch.long)
    lambdas, directional, matvecs = [], [], 0
    per_perm = n // batch_size
    for i in range(n_batches):
        if i % per_perm == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(i % per_perm) * batch_size : (i % per_perm + 1) * batch_size].to(x.device)
        op = make_operator(model, (x[idx], y[idx]), **op_kwargs)
        out = eigsh(op, 1, tol=tol, v0=v0, seed=seed + i, max_iter=max_iter)
        lambdas.append(float(out.values[0]))
        g = op.gradient()
        gn = float(g.norm())
        directional.append(float(g @ op.matvec(g)) / gn**2 if gn > 0 else float("nan"))
        matvecs += op.n_matvecs
    return lambdas, directional, matvecs


# ---------------------------------------------------------------------------------------------- API
def sharpness(
    model: nn.Module,
    data: Any,
    *,
    lr: float | None = None,
    loss: str | Callable | Loss = "auto",
    k: int = 1,
    tol: float = 1e-4,
    v0: torch.Tensor | None = None,
    trace: bool = True,
    trace_matvecs: int = 99,
    optimizer_state: Any = None,
    optimizer: str | None = None,
    batch_size_for_batch_sharpness: int | None = None,
    n_batches: int = 10,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_iter: int | None = None,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SharpnessResult:
    """λ_max, trace and stability diagnostics of the training-loss Hessian at the model's weights.

    Parameters
    ----------
    lr:
        Learning rate η for the thresholds (``2/η``); with ``optimizer_state`` it defaults to the
        state's lr.
    k, tol, v0:
        Top-k eigenvalues by Lanczos to residual tolerance ``tol``; ``v0`` warm start
        (``previous.eigenvectors``).
    trace, trace_matvecs:
        Estimate ``tr(H)`` by Hutch++ with ``trace_matvecs`` products (exact when the parameter
        count is at most a third of it).
    optimizer_state:
        Adam/AdamW/RMSprop/Adagrad/SGD state (a torch optimizer, its ``state_dict()`` or
        ``Run.load_optimizer_state(step)``) for the preconditioned sharpness ``λ_max(P⁻¹H)``.
    batch_size_for_batch_sharpness, n_batches:
        Mini-batch size and number of disjoint random batches for batch sharpness.
    params, batch_size, mode, dtype, device, reduce_fn:
        Passed to :class:`~dynascope.probes.operators.CurvatureOperator`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer; got {n_batches!r}")
    started = time.perf_counter()
    op_kwargs: dict[str, Any] = {
        "loss": loss,
        "params": params,
        "batch_size": batch_size,
        "mode": mode,
        "dtype": dtype,
        "device": device,
        "reduce_fn": reduce_fn,
    }
    op = make_operator(model, data, **op_kwargs)
    out = eigsh(op, k, tol=tol, v0=v0, seed=seed, max_iter=max_iter)
    n_matvecs = op.n_matvecs
    lam = float(out.values[0])
    loss_value = op.loss_value()

    trace_val = trace_err = None
    trace_method = None
    if trace:
        before = op.n_matvecs
        from .trace import estimate_trace

        trace_val, trace_err, _, _ = estimate_trace(op, trace_matvecs, method="hutch++", seed=seed)
        trace_method = "hutch++ (dynascope.probes.trace.estimate_trace)"
        n_matvecs += op.n_matvecs - before

    pre: dict[str, Any] = {}
    pre_meta: dict[str, Any] | None = None
    if optimizer_state is not None:
        P = preconditioner_from_state(optimizer_state, op.space, model=op.model, lr=lr, optimizer=optimizer)
        if lr is None:
            lr = P.lr
        sop = DiagonalScaledOperator(op, P.diag.rsqrt())
        pout = eigsh(sop, 1, tol=tol, seed=seed, max_iter=max_iter)
        n_matvecs += sop.n_matvecs
        plam = float(pout.values[0])
        thr = P.threshold(lr)
        pre = {
            "preconditioned_lambda_max": plam,
            "preconditioned_threshold": thr,
            "preconditioned_ratio": plam / thr,
            "preconditioned_stable": plam <= thr,
            "optimizer": P.optimizer,
        }
        pre_meta = {
            "optimizer": P.optimizer,
            "threshold": f"{P.threshold_factor:.6g}/lr",
            "hyperparameters": P.hyperparameters,
            "converged": bool(pout.converged.all()),
            "residual": float(pout.residuals[0]),
        }

    batch: dict[str, Any] = {}
    if batch_size_for_batch_sharpness is not None:
        lambdas, directional, mv = _batch_sharpness(
            model,
            data,
            batch_size=batch_size_for_batch_sharpness,
            n_batches=n_batches,
            seed=seed,
            tol=tol,
            v0=out.vectors[:, :1] if out.vectors is not None else None,
            op_kwargs={**op_kwargs, "batch_size": None, "reduce_fn": None},
            max_iter=max_iter,
        )
        n_matvecs += mv
        mean, sem = _mean_sem(lambdas)
        batch = {
            "batch_size": batch_size_for_batch_sharpness,
            "batch_lambdas": lambdas,
            "batch_sharpness": mean,
            "batch_sharpness_stderr": sem,
            "batch_directional": directional,
            "batch_directional_sharpness": _mean_sem(directional)[0],
        }

    two = 2.0 / lr if lr is not None else None
    meta = make_meta(
        "sharpness",
        model=op.model,
        params={
            "k": k,
            "tol": tol,
            "loss": op.loss.name,
            "lr": lr,
            "seed": seed,
            "warm_start": v0 is not None,
            "trace_matvecs": trace_matvecs if trace else None,
            "n_batches": n_batches if batch_size_for_batch_sharpness else None,
            "params": params,
            "batch_size": batch_size,
        },
        started=started,
        mode=mode,
        reduction="mean over the whole dataset (batches weighted by sample count)",
        n_parameters=op.size,
        n_samples=op.num_samples,
        n_matvecs=n_matvecs,
        lanczos_iterations=out.n_iter,
        backend=op.backend,
        trace_method=trace_method,
        preconditioned=pre_meta,
        batch_sampling="disjoint mini-batches from seeded permutations" if batch else None,
    )
    return SharpnessResult(
        lambda_max=lam,
        eigenvalues=[float(v) for v in out.values],
        residuals=[float(r) for r in out.residuals],
        converged=[bool(c) for c in out.converged],
        trace=trace_val,
        trace_stderr=trace_err,
        loss_value=loss_value,
        lr=float(lr) if lr is not None else None,
        two_over_lr=two,
        ratio=lam / two if two else None,
        gd_stable=(lam <= two) if two else None,
        sgd_trace_stable=(trace_val <= two) if (two and trace_val is not None) else None,
        n_matvecs=n_matvecs,
        eigenvectors=out.vectors,
        meta=meta,
        **pre,
        **batch,
    )


# ---------------------------------------------------------------------------------------------- SAM-style
@dataclass(frozen=True, kw_only=True)
class AdaptiveSharpnessResult(Result):
    """ASAM-style worst-case sharpness ``max_{‖T⁻¹ε‖≤ρ} L(w+ε) − L(w)``, ``T = diag(|w| + η)``.

    ``sharpness`` is the best value found by ``steps`` projected normalized-gradient-ascent steps
    (a lower bound of the true maximum; 1 step = the ASAM/SAM closed form). With ``m``: the mean over
    disjoint batches of size m of each batch's worst-case sharpness (m-sharpness); ``per_batch`` holds them.
    """

    sharpness: float
    loss_value: float
    perturbed_loss: float
    rho: float
    eta: float
    steps: int
    m: int | None
    step_values: list[float]
    per_batch: list[float] = field(default_factory=list)

    def figure(self):  # -> plotly.graph_objects.Figure
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Scatter(x=list(range(1, len(self.step_values) + 1)), y=self.step_values, mode="lines+markers")
        )
        fig.update_layout(
            title=f"Adaptive sharpness (ρ={self.rho}, η={self.eta}) = {self.sharpness:.4g}",
            xaxis_title="ascent step",
            yaxis_title="L(w+ε) − L(w)",
        )
        return fig


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

    def figure(self):  # -> plotly.graph_objects.Figure
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.samples))
        fig.update_layout(
            title=f"Average-case sharpness (σ={self.sigma}) = {self.sharpness:.4g} ± {self.stderr:.2g}",
            xaxis_title="L(w+ε) − L(w)",
        )
        return fig


def _loss_fn(op: CurvatureOperator) -> Callable[[torch.Tensor, bool], tuple[float, torch.Tensor | None]]:
    """``θ ↦ (L(θ), ∇L(θ) or None)`` for flat parameter vectors of the operator's block."""
    from .operators import ModeGuard

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
    op: CurvatureOperator, rho: float, eta: float, steps: int
) -> tuple[float, float, float, list[float]]:
    f = _loss_fn(op)
    w = op.parameters_vector()
    T = w.abs() + eta
    l0, _ = f(w, False)
    delta = torch.zeros_like(w)
    values: list[float] = []
    best_l = l0
    for t in range(steps):
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
    n = x.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"m must be between 1 and the number of samples {n}; got {m}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    count = n // m if max_batches is None else min(n // m, max_batches)
    return [(x[order[i * m : (i + 1) * m]], y[order[i * m : (i + 1) * m]]) for i in range(count)]


def adaptive_sharpness(
    model: nn.Module,
    data: Any,
    *,
    rho: float = 0.5,
    eta: float = 0.01,
    steps: int = 1,
    m: int | None = None,
    max_batches: int | None = None,
    loss: str | Callable | Loss = "auto",
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AdaptiveSharpnessResult:
    """ASAM worst-case adaptive sharpness ``max_{‖T_w⁻¹ε‖₂ ≤ ρ} L(w+ε) − L(w)``, ``T_w = diag(|w| + η)``.

    Solved in ``δ = T⁻¹ε`` by ``steps`` steps of projected normalized gradient ascent from δ = 0 with
    step ``ρ/√(t+1)`` (step t = 0, 1, ...), ascent direction ``T ∇L(w + Tδ)``; the first step lands on the
    ASAM closed form ``ε = ρ T² ∇L / ‖T ∇L‖``. Reports the largest increase over the iterates (≥ 0).
    ``m``: m-sharpness — the average over disjoint random batches of size m (at most ``max_batches``)
    of each batch's own worst case.
    """
    for name, v in (("rho", rho), ("eta", eta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "rho" and v == 0):
            raise ValueError(
                f"{name} must be a {'positive' if name == 'rho' else 'non-negative'} number; got {v!r}"
            )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    started = time.perf_counter()
    kw = {
        "loss": loss,
        "params": params,
        "batch_size": batch_size,
        "mode": mode,
        "dtype": dtype,
        "device": device,
    }
    op = make_operator(model, data, **kw)
    s, l0, lbest, values = _worst_case(op, float(rho), float(eta), steps)
    per_batch: list[float] = []
    if m is not None:
        for xb, yb in _subsets(data, m, seed, max_batches):
            per_batch.append(
                _worst_case(make_operator(model, (xb, yb), **{**kw, "batch_size": None}), rho, eta, steps)[0]
            )
    meta = make_meta(
        "adaptive_sharpness",
        model=op.model,
        params={
            "rho": rho,
            "eta": eta,
            "steps": steps,
            "m": m,
            "max_batches": max_batches,
            "loss": op.loss.name,
            "seed": seed,
        },
        started=started,
        mode=mode,
        reduction="mean over the whole dataset (per batch of size m for m-sharpness)",
        ball="||T^-1 eps||_2 <= rho, T = diag(|w| + eta), all selected parameters",
        solver="projected normalized gradient ascent in T^-1 eps, step rho/sqrt(t+1); max over iterates",
    )
    return AdaptiveSharpnessResult(
        sharpness=_mean_sem(per_batch)[0] if per_batch else s,
        loss_value=l0,
        perturbed_loss=lbest,
        rho=float(rho),
        eta=float(eta),
        steps=steps,
        m=m,
        step_values=values,
        per_batch=per_batch,
        meta=meta,
    )


def average_sharpness(
    model: nn.Module,
    data: Any,
    *,
    sigma: float = 0.01,
    eta: float = 0.0,
    n_samples: int = 20,
    antithetic: bool = True,
    loss: str | Callable | Loss = "auto",
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AverageSharpnessResult:
    """Average-case adaptive sharpness ``E_ε[L(w+ε)] − L(w)`` with ``ε = σ (|w| + η) ⊙ z``, ``z ~ N(0, I)``.

    Monte Carlo with ``n_samples`` loss evaluations at seeded draws. ``antithetic=True`` (default) pairs
    ``±ε`` and averages each pair, which removes the first-order term ``∇Lᵀε`` from the variance
    (``samples`` then holds ``n_samples // 2`` pair means); ``stderr`` = std(samples) / √len(samples).
    For a quadratic loss the expectation is ``½ σ² tr(T H T)``, ``T = diag(|w| + η)``.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number; got {sigma!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be a non-negative number; got {eta!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2; got {n_samples!r}")
    if antithetic and n_samples < 4:
        raise ValueError(f"antithetic sampling needs n_samples >= 4 (two pairs); got {n_samples}")
    started = time.perf_counter()
    op = make_operator(
        model, data, loss=loss, params=params, batch_size=batch_size, mode=mode, dtype=dtype, device=device
    )
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
    meta = make_meta(
        "average_sharpness",
        model=op.model,
        params={
            "sigma": sigma,
            "eta": eta,
            "n_samples": n_samples,
            "antithetic": antithetic,
            "loss": op.loss.name,
            "seed": seed,
        },
        started=started,
        mode=mode,
        reduction="mean over the whole dataset",
        noise="eps = sigma * (|w| + eta) * z, z ~ N(0, I), seeded CPU generator",
    )
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


__all__ = [
    "AdaptiveSharpnessResult",
    "AverageSharpnessResult",
    "SharpnessResult",
    "adaptive_sharpness",
    "average_sharpness",
    "sharpness",
]
