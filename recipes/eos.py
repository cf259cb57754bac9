"""Edge of stability (Cohen et al. 2021): full-batch GD drives λ_max up to 2/η and holds it there.

Setup: the first 1000 scikit-learn digits (file order), pixels /16 minus their training mean
(``normalize="center"``), one-hot targets; tanh MLP 64-200-200-10 (PyTorch default init); loss
L(θ) = (1/N) Σ_i ½‖f(x_i; θ) − y_i‖² (``half_sse``); plain GD with step size η (0.5 → 2/η = 4,
0.25 → 2/η = 8). GD on a quadratic with curvature λ diverges when λ > 2/η; training nevertheless
continues, non-monotonically, with λ_max hovering at 2/η.

λ_max, the top eigenvalue of the Hessian ∇²L on the full training set, is computed at every checkpoint
by :func:`dynascope.probes.sharpness` (``k=1, trace=False``, Lanczos warm-started from the previous top
eigenvector: the one λ_max-over-training path, shared with ``track_sharpness`` and the Tracker), logged as
``sharpness`` (with ``two_over_lr`` and ``sharpness_ratio`` = λ_max·η/2) and written to the run's result
store under the key of ``probe("sharpness", step=s, k=1, tol=lanczos_tol, trace=False, lr=η)`` (queued
in ``pending_results/``, filed by :func:`dynascope.runner.ingest_pending` when the run is next read).

``edge_of_stability_adam`` (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"): the
same model, data and loss trained by full-batch Adam (η = 1e-3, torch's β = (0.9, 0.999), ε = 1e-8). For
Adam the quantity that equilibrates is the *preconditioned* sharpness λ_max(P⁻¹H), with
P = (1 − β₁ᵗ)(√v̂ + ε) from the optimizer state, at the threshold (2 + 2β₁)/((1 − β₁)η) = 38/η = 38,000;
on this run it rises from ~0.05 of the threshold to ~1 by step 250 and then hovers at 0.9–1.1 of it
while λ_max(H) keeps growing far beyond 2/η. Optimizer-state schedule: the state is saved at **every
checkpoint** (``save_optimizer=True``; none exists at step 0, before the first update), so λ_max(P⁻¹H)
can be computed afterwards at each of them — by the app's Edge of stability page or
``dynascope.probes.sharpness(model, data, optimizer_state=run.load_optimizer_state(step))``. The
recipe logs λ_max(P⁻¹H) at every checkpoint after the first update (``precond_sharpness``, with
``precond_threshold`` = 38/η and ``precond_ratio``), warm-started like the GD recipe's λ_max; it logs no
λ_max(H) (against 2/η it says nothing for Adam).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..models import Run
from ..probes.curvature_sharpness import sharpness
from .base import Recipe, recipe_function, register_recipe
from .train import train

__all__ = [
    "edge_of_stability",
    "lambda_max",
    "SharpnessTracker",
    "EOS_CONFIG",
    "EOS_SMALL",
    "EOS_ADAM_CONFIG",
    "EOS_ADAM_SMALL",
]

EOS_CONFIG: dict[str, Any] = {
    "lr": 0.5,
    "n_train": 1000,
    "width": 200,
    "depth": 2,
    "activation": "tanh",
    "steps": 1500,
    "log_every": 5,
    "checkpoint_every": 25,
    "lanczos_tol": 1e-3,
    "optimizer": "sgd",
    "save_optimizer": "last",
    "device": "cpu",
}

#: CI / demo variant: same model, data and η; 1300 steps (λ_max reaches 2/η by step ~100 and the loss
#: halves by ~1100), λ_max every 50 steps (≈ 6 MB of checkpoints).
EOS_SMALL: dict[str, Any] = {"steps": 1300, "checkpoint_every": 50}

#: Full-batch Adam (torch defaults β = (0.9, 0.999), ε = 1e-8); optimizer state at every checkpoint.
EOS_ADAM_CONFIG: dict[str, Any] = {
    **EOS_CONFIG,
    "optimizer": "adam",
    "lr": 1e-3,
    "steps": 1000,
    "checkpoint_every": 25,
    "save_optimizer": True,
}
#: CI / demo variant: 400 steps (λ_max(P⁻¹H) reaches 38/η by step ~250), 8 checkpoints with state.
EOS_ADAM_SMALL: dict[str, Any] = {"steps": 400, "checkpoint_every": 50}


def lambda_max(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    loss: str = "half_sse",
    tol: float = 1e-3,
    v0: torch.Tensor | None = None,
    max_iter: int = 100,
) -> tuple[float, torch.Tensor | None, bool]:
    """Top Hessian eigenvalue of the dataset-mean ``loss`` at the model's weights: :func:`dynascope.probes.
    sharpness` (``k=1, trace=False``), the one λ_max computation of the recipes, ``track_sharpness`` and the
    Tracker.

    Returns ``(λ_max, eigenvector or None, converged)``; ``v0`` warm-starts Lanczos.
    """
    r = sharpness(model, data, loss=loss, tol=tol, v0=v0, trace=False, max_iter=max_iter)
    vec = r.eigenvectors[:, 0].detach().clone() if r.eigenvectors is not None else None
    return r.lambda_max, vec, bool(r.converged[0])


class SharpnessTracker:
    """A ``checkpoint_fn`` for ``train``: warm-started λ_max on the training set by
    :func:`dynascope.probes.sharpness` (``k=1, trace=False``), logged as ``sharpness`` against 2/η. With
    ``preconditioned=True`` (Adam) the same call with ``optimizer_state`` gives λ_max(P⁻¹H), P from the
    optimizer's state, logged as ``precond_sharpness`` against its threshold ``precond_threshold`` (38/η for
    β₁ = 0.9); nothing is logged before the first update (no state yet).

    The results are kept and :meth:`store` queues them for the run's result store (after ``train`` wrote
    the checkpoints); the runner files them under its key of ``probe("sharpness", step=s, **self.params)``
    when the run is next read, so the trajectory views find them as cached results."""

    def __init__(
        self, lr: float, *, loss: str = "half_sse", tol: float = 1e-3, preconditioned: bool = False
    ) -> None:
        self.lr, self.loss, self.tol, self.preconditioned = float(lr), loss, tol, preconditioned
        self._v: torch.Tensor | None = None
        self.results: list[tuple[int, Any]] = []

    @property
    def params(self) -> dict[str, Any]:
        """The runner parameters of the λ_max computed here (the result store key)."""
        return {"k": 1, "tol": self.tol, "trace": False, "lr": self.lr,
                **({"optimizer_state": True} if self.preconditioned else {})}  # fmt: skip

    def __call__(
        self, model: nn.Module, step: int, data: Any, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, Any]:
        if self.preconditioned and (optimizer is None or not optimizer.state):
            return {}
        state = optimizer if self.preconditioned else None
        r = sharpness(model, data.train, loss=self.loss, k=1, tol=self.tol, v0=self._v, trace=False,
                      lr=self.lr, optimizer_state=state)  # fmt: skip
        if r.eigenvectors is not None and torch.isfinite(r.eigenvectors).all():
            self._v = r.eigenvectors
        self.results.append((step, r))
        if self.preconditioned:
            return {
                "precond_sharpness": r.preconditioned_lambda_max,
                "precond_threshold": r.preconditioned_threshold,
                "precond_ratio": r.preconditioned_ratio,
                "sharpness_converged": bool(r.meta["preconditioned"]["converged"]),
            }
        return {
            "sharpness": r.lambda_max,
            "two_over_lr": 2.0 / self.lr,
            "sharpness_ratio": r.lambda_max * self.lr / 2.0,
            "sharpness_converged": bool(r.converged[0]),
        }

    def store(self, run: Run) -> int:
        """Queue the kept results for ``run``'s result store (:meth:`Run.add_pending_result`: recipes sit
        below the runner; it files them under its key when the run is next read); returns their number."""
        for step, r in self.results:
            run.add_pending_result("sharpness", step, self.params, r)
        return len(self.results)


@recipe_function("edge_of_stability", EOS_CONFIG)
def edge_of_stability(
    out: str | os.PathLike[str], cfg: dict[str, Any], seed: int, progress: Any, overwrite: bool, resume: bool
) -> Run:
    """Train the edge-of-stability recipe into run folder ``out`` (config keys: ``EOS_CONFIG``).

    ``optimizer="sgd"``: plain full-batch GD, λ_max logged at every checkpoint against 2/η.
    ``optimizer="adam"``: full-batch Adam; λ_max(P⁻¹H) logged at every checkpoint against 38/η, and the
    optimizer state saved there (see the module docstring)."""
    lr = float(cfg["lr"])
    if not lr > 0:
        raise ValueError(f"edge_of_stability: lr must be > 0, got {lr}")
    opt = str(cfg["optimizer"]).lower()
    if opt not in ("sgd", "adam"):
        raise ValueError(f"edge_of_stability: optimizer must be 'sgd' or 'adam', got {cfg['optimizer']!r}")
    adam = opt == "adam"
    # the stability threshold of the update: 2/η for GD, (2 + 2β₁)/((1 − β₁)η) = 38/η for Adam (β₁ = 0.9)
    threshold = 38.0 / lr if adam else 2.0 / lr
    run_cfg = {
        "path": out,
        "model": {
            "name": "mlp",
            "in_dim": 64,
            "width": int(cfg["width"]),
            "depth": int(cfg["depth"]),
            "out_dim": 10,
            "activation": cfg["activation"],
            "seed": seed,
        },
        "dataset": {
            "name": "digits",
            "n_train": int(cfg["n_train"]),
            "shuffle": False,
            "normalize": "center",
            "targets": "onehot",
            "seed": seed,
        },
        "optimizer": {"name": opt, "lr": lr},
        "lr_schedule": None,
        "loss": "half_sse",
        "seed": seed,
        "extra": {
            "recipe": "edge_of_stability_adam" if adam else "edge_of_stability",
            "phenomenon": "edge_of_stability",
            "config": cfg,
            "batch_size": None,
            "two_over_lr": 2.0 / lr,
            "stability_threshold": threshold,
        },
        "notes": (
            f"Edge of stability: full-batch Adam, eta={lr:g} (preconditioned threshold "
            f"38/eta={threshold:g}), MSE 1/2||f-y||^2."
            if adam
            else f"Edge of stability: full-batch GD, eta={lr:g} (2/eta={2 / lr:g}), MSE 1/2||f-y||^2."
        ),
    }
    tracker = SharpnessTracker(lr, tol=float(cfg["lanczos_tol"]), preconditioned=adam)
    run = train(
        run_cfg,
        steps=int(cfg["steps"]),
        log_every=int(cfg["log_every"]),
        checkpoint_steps=int(cfg["checkpoint_every"]),
        save_optimizer=cfg["save_optimizer"],
        progress=progress,
        resume=resume,
        overwrite=overwrite,
        device=cfg["device"],
        checkpoint_fn=tracker,
    )
    tracker.store(run)  # λ_max in the result store too: the trajectory views read it as cached results
    return run


register_recipe(
    Recipe(
        name="edge_of_stability",
        phenomenon="edge_of_stability",
        description="First 1000 digits (centred, one-hot), tanh MLP 64-200-200-10, ½‖f−y‖², full-batch GD "
        "η=0.5: λ_max rises from ~2.4 to 2/η=4 and hovers there while the loss falls non-monotonically.",
        fn=edge_of_stability,
        config=EOS_CONFIG,
        small=EOS_SMALL,
    )
)
register_recipe(
    Recipe(
        name="edge_of_stability_lr0.25",
        phenomenon="edge_of_stability",
        description="As edge_of_stability with η=0.25 (2/η=8); progressive sharpening takes longer.",
        fn=edge_of_stability,
        config={**EOS_CONFIG, "lr": 0.25, "steps": 3000},
        small={"steps": 2000, "checkpoint_every": 50},
    )
)
register_recipe(
    Recipe(
        name="edge_of_stability_adam",
        phenomenon="edge_of_stability",
        description="As edge_of_stability with full-batch Adam η=1e-3: the preconditioned sharpness "
        "λ_max(P⁻¹H) rises to 38/η and hovers there; optimizer state saved at every checkpoint.",
        fn=edge_of_stability,
        config=EOS_ADAM_CONFIG,
        small=EOS_ADAM_SMALL,
    )
)
