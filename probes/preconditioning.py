"""Diagonal preconditioners of adaptive optimizers, read from saved optimizer state.

Following Cohen et al. 2022 ("Adaptive gradient methods at the edge of stability"), an adaptive
method updates ``θ ← θ − η P⁻¹ m`` with a diagonal preconditioner ``P``; its linear stability on a
quadratic is governed by the *preconditioned sharpness* ``λ_max(P⁻¹ H)``, compared with a threshold
that depends on the momentum scheme:

* Adam / AdamW (EMA momentum ``m ← β₁ m + (1 − β₁) g``): ``P = (1 − β₁ᵗ) · (√(v / (1 − β₂ᵗ)) + ε)``
  (the momentum bias correction is folded into P, as in the paper), threshold
  ``(2 + 2β₁) / ((1 − β₁) η)`` — 38/η for β₁ = 0.9. ``v`` is the stored ``exp_avg_sq`` (``max_exp_avg_sq``
  with AMSGrad) and ``t`` the stored step count, i.e. the preconditioner of the last update taken.
* RMSProp (torch): ``P = √v + ε`` (centered: ``√(v − ḡ²) + ε``); threshold ``2/η`` without momentum,
  ``(2 + 2μ)/η`` with heavy-ball momentum μ.
* Adagrad: ``P = √(Σ g²) + ε``, threshold ``2/η``.
* SGD: ``P = I``; threshold ``2/η``, ``(2 + 2μ)/((1 − d) η)`` for heavy-ball momentum μ with dampening d,
  ``(2 + 2μ)/((1 + 2μ) η)`` for Nesterov.

``P⁻¹H`` is not symmetric, but ``P^{-1/2} H P^{-1/2}`` is similar to it (same eigenvalues) and
symmetric, so Lanczos runs on :class:`DiagonalScaledOperator` with ``d = P^{-1/2}``.
Per-group learning rates ``η_g`` different from the first positive group lr ``η_1`` are folded into P
(``P_g · η_1/η_g``; a group at ``η_g = 0`` does not move: ``P_g = ∞``, its block of ``P^{-1/2}`` is 0); the
threshold uses ``lr=`` when given, else ``η_1``. λ_max(P⁻¹H) itself needs no lr: at ``η = 0`` (the last
checkpoint of a schedule that decays to zero) it is reported and the threshold is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .functional import ParamSpace
from .operators import LinearOperator

SUPPORTED = ("adam", "adamw", "rmsprop", "adagrad", "sgd")


class DiagonalScaledOperator(LinearOperator):
    """``D A D`` for a symmetric operator ``A`` and a positive diagonal ``D`` (given as a vector)."""

    def __init__(self, op: LinearOperator, d: torch.Tensor) -> None:
        if d.shape != (op.size,):
            raise ValueError(f"the scaling vector must have length {op.size}; got {tuple(d.shape)}")
        super().__init__(op.size, op.dtype, op.device)
        self.vspace = op.vspace
        self.op = op
        self.d = d.to(device=op.device, dtype=op.dtype)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * self.op.matmat(self.d[:, None] * V)


@dataclass(frozen=True)
class Preconditioner:
    """A diagonal preconditioner ``P`` (flattened like the operator's parameter block) and its threshold.

    ``threshold(lr) = threshold_factor / lr`` is the value of ``λ_max(P⁻¹H)`` at which the method's
    update on the local quadratic becomes unstable.
    """

    diag: torch.Tensor
    optimizer: str
    lr: float
    threshold_factor: float
    hyperparameters: dict[str, Any]

    def threshold(self, lr: float | None = None) -> float:
        """``threshold_factor / η``; NaN at ``η = 0`` (no step is taken: no stability threshold)."""
        eta = lr if lr is not None else self.lr
        return self.threshold_factor / eta if eta > 0 else float("nan")


def _normalize_state(optimizer_state: Any, model: nn.Module | None) -> dict[str, Any]:
    """Name-keyed optimizer state (``dynascope.optim/1``) from an optimizer, a state_dict or a saved dict."""
    from ..models.runs import OPTIM_FORMAT, optimizer_state_by_name

    if isinstance(optimizer_state, Mapping) and optimizer_state.get("format") == OPTIM_FORMAT:
        return dict(optimizer_state)
    if isinstance(optimizer_state, torch.optim.Optimizer) or (
        isinstance(optimizer_state, Mapping)
        and "state" in optimizer_state
        and "param_groups" in optimizer_state
    ):
        if model is None:
            raise TypeError("converting a torch optimizer state needs the model (for parameter names)")
        named = optimizer_state_by_name(optimizer_state, model)
        if isinstance(optimizer_state, torch.optim.Optimizer):
            named["optimizer"] = type(optimizer_state).__name__.lower()
        return named
    raise TypeError(
        "optimizer_state must be a torch Optimizer, its state_dict(), or the name-keyed dict from "
        f"Run.load_optimizer_state; got {type(optimizer_state).__name__}"
    )


def _guess_kind(named: Mapping[str, Any]) -> str:
    kind = named.get("optimizer")
    if isinstance(kind, str) and kind:
        return kind.lower()
    keys = set().union(*[set(s) for s in named["state"].values()]) if named["state"] else set()
    if "exp_avg_sq" in keys:
        return "adam"
    if "square_avg" in keys:
        return "rmsprop"
    if "sum" in keys:
        return "adagrad"
    return "sgd"


def _group_of(named: Mapping[str, Any], name: str) -> dict[str, Any]:
    for g in named["param_groups"]:
        if name in g.get("params", []):
            return g
    groups = named["param_groups"]
    if len(groups) == 1 and not groups[0].get("params"):
        return groups[0]
    raise ValueError(f"the optimizer state has no parameter group holding {name!r}")


def _same(values: list[float], what: str) -> float:
    if not values:
        raise ValueError(f"no {what} found in the optimizer state")
    if max(values) - min(values) > 1e-12 * max(1.0, abs(values[0])):
        raise ValueError(
            f"parameter groups use different {what} ({sorted(set(values))}); one threshold needs one"
        )
    return values[0]


def _step_count(st: Mapping[str, Any], name: str) -> float:
    step = st.get("step")
    if step is None:
        raise ValueError(f"optimizer state of {name!r} has no 'step' count")
    t = float(step.item() if isinstance(step, torch.Tensor) else step)
    if t < 1:
        raise ValueError(f"optimizer state of {name!r} has step {t}; no update taken yet")
    return t


def preconditioner_from_state(
    optimizer_state: Any,
    space: ParamSpace,
    *,
    model: nn.Module | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
) -> Preconditioner:
    """Build ``P`` (see the module docstring) for the parameters of ``space`` from optimizer state.

    ``optimizer_state``: a torch optimizer, its ``state_dict()`` (needs ``model``) or the name-keyed
    dict of ``Run.load_optimizer_state``. ``lr``: the η of the threshold (default: the first group's lr;
    other groups' lrs are folded into P). ``optimizer``: override the optimizer kind (``"adam"``, ...).
    """
    named = _normalize_state(optimizer_state, model)
    kind = (optimizer or _guess_kind(named)).lower()
    if kind not in SUPPORTED:
        raise ValueError(f"preconditioned sharpness supports {SUPPORTED}; the optimizer is {kind!r}")
    groups = {n: _group_of(named, n) for n in space.names}
    group_lrs = [float(g["lr"]) for g in groups.values() if "lr" in g]
    positive = [v for v in group_lrs if v > 0]
    # per-group lrs are folded into P relative to the first positive one (all zero: nothing to fold)
    ref_lr = positive[0] if positive else None
    if lr is None:
        if not group_lrs:
            raise ValueError("the optimizer state records no lr; pass lr=")
        lr = ref_lr if ref_lr is not None else 0.0
    lr = float(lr)
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0; got {lr}")
    parts = []
    hyper: dict[str, Any] = {}
    for name, shape in zip(space.names, space.shapes):
        g = groups[name]
        st = named["state"].get(name)
        if ref_lr is None or "lr" not in g:
            scale = 1.0
        else:  # a group at lr 0 does not move: P = ∞ there (its rows of P^{-1/2} H P^{-1/2} are zero)
            scale = ref_lr / float(g["lr"]) if float(g["lr"]) > 0 else float("inf")
        if kind == "sgd":
            parts.append(torch.full(shape, scale, dtype=torch.float64).reshape(-1))
            continue
        if st is None:
            raise ValueError(f"the optimizer state holds nothing for parameter {name!r}")
        eps = float(g.get("eps", 1e-8 if kind != "adagrad" else 1e-10))
        if kind in ("adam", "adamw"):
            beta1, beta2 = (float(b) for b in g.get("betas", (0.9, 0.999)))
            t = _step_count(st, name)
            v = st["max_exp_avg_sq"] if g.get("amsgrad") and "max_exp_avg_sq" in st else st["exp_avg_sq"]
            p = (1 - beta1**t) * ((v.double() / (1 - beta2**t)).sqrt() + eps)
        elif kind == "rmsprop":
            v = st["square_avg"].double()
            if g.get("centered") and "grad_avg" in st:
                v = v - st["grad_avg"].double() ** 2
            p = v.clamp(min=0).sqrt() + eps
        else:  # adagrad
            p = st["sum"].double().sqrt() + eps
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"optimizer state of {name!r} has shape {tuple(p.shape)}, the parameter {shape}")
        parts.append((p * scale).reshape(-1))
    gl = list(groups.values())
    if kind in ("adam", "adamw"):
        beta1 = _same([float(g.get("betas", (0.9, 0.999))[0]) for g in gl], "beta1")
        factor = (2 + 2 * beta1) / (1 - beta1)
        hyper = {"beta1": beta1, "betas": list(gl[0].get("betas", (0.9, 0.999))), "eps": gl[0].get("eps")}
    else:
        mu = _same([float(g.get("momentum", 0.0) or 0.0) for g in gl], "momentum")
        damp = (
            _same([float(g.get("dampening", 0.0) or 0.0) for g in gl], "dampening") if kind == "sgd" else 0.0
        )
        nesterov = bool(gl[0].get("nesterov", False))
        if kind == "sgd" and nesterov:
            factor = (2 + 2 * mu) / (1 + 2 * mu)
        elif kind == "sgd":
            factor = (2 + 2 * mu) / (1 - damp) if damp < 1 else float("inf")
        else:
            factor = 2 + 2 * mu
        hyper = {"momentum": mu, "dampening": damp, "nesterov": nesterov, "eps": gl[0].get("eps")}
    diag = torch.cat(parts)
    if bool(torch.isnan(diag).any()) or bool((diag <= 0).any()):
        raise ValueError("the preconditioner has non-positive or NaN entries")
    return Preconditioner(diag=diag, optimizer=kind, lr=lr, threshold_factor=factor, hyperparameters=hyper)


__all__ = ["DiagonalScaledOperator", "Preconditioner", "preconditioner_from_state"]
