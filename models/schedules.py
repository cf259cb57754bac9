"""Learning-rate schedules as small JSON descriptions, evaluated by ``lr_at(schedule, step)``.

Steps count optimizer updates from 0. ``lr`` is the peak/base rate (falls back to ``base_lr``).

- ``{"type": "constant", "lr"}``: lr.
- ``{"type": "step", "lr", "gamma", "step_size"}``: lr·gamma^⌊step/step_size⌋; or with
  ``"milestones": [m1, m2, ...]``: lr·gamma^#{mᵢ ≤ step}.
- ``{"type": "cosine", "lr", "total_steps", "min_lr"=0}``:
  min_lr + (lr − min_lr)·(1 + cos(π·min(step, T)/T))/2.
- ``{"type": "warmup_cosine", "lr", "warmup_steps", "total_steps", "min_lr"=0}``: linear warmup
  lr·(step+1)/W for step < W (so step W−1 reaches lr), then cosine from lr to min_lr over the
  remaining T−W steps (progress (step−W)/(T−W), clamped to 1).
- ``{"type": "list", "values": [...]}``: values[step] (last value after the end); with
  ``"steps": [s0=0, s1, ...]`` piecewise constant: values[i] for the largest i with sᵢ ≤ step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "SCHEDULE_TYPES",
    "CHECKPOINT_SCHEDULES",
    "checkpoint_due",
    "lr_at",
    "validate_schedule",
    "torch_scheduler",
]

SCHEDULE_TYPES = ("constant", "step", "cosine", "warmup_cosine", "list")


def _num(s: Mapping[str, Any], key: str, *, default: Any = None, positive: bool = False) -> float:
    v = s.get(key, default)
    if v is None:
        raise ValueError(f"lr schedule {s.get('type')!r} needs {key!r}: {dict(s)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"lr schedule key {key!r} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"lr schedule key {key!r} must be > 0, got {v!r}")
    return float(v)


def validate_schedule(schedule: Mapping[str, Any], base_lr: float | None = None) -> dict[str, Any]:
    """Check a schedule description (raises ``ValueError`` naming the problem) and return a plain copy."""
    if not isinstance(schedule, Mapping):
        raise TypeError(f"lr schedule must be a dict, got {type(schedule).__name__}")
    s = dict(schedule)
    kind = s.get("type")
    if kind not in SCHEDULE_TYPES:
        raise ValueError(f"lr schedule type must be one of {SCHEDULE_TYPES}, got {kind!r}")
    if kind != "list":
        _num(s, "lr", default=base_lr)
    if kind == "step":
        _num(s, "gamma")
        if "milestones" in s:
            m = s["milestones"]
            if not isinstance(m, (list, tuple)) or any(int(a) > int(b) for a, b in zip(m, m[1:])):
                raise ValueError(f"milestones must be a non-decreasing list of steps, got {m!r}")
        else:
            _num(s, "step_size", positive=True)
    elif kind in ("cosine", "warmup_cosine"):
        total = _num(s, "total_steps", positive=True)
        _num(s, "min_lr", default=0.0)
        if kind == "warmup_cosine":
            w = _num(s, "warmup_steps", default=0)
            if not 0 <= w <= total:
                raise ValueError(f"warmup_steps must be in [0, total_steps={total:g}], got {w:g}")
    elif kind == "list":
        values = s.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError("list lr schedule needs a non-empty 'values' list")
        for i, v in enumerate(values):
            _num({"type": "list", f"values[{i}]": v}, f"values[{i}]")
        if "steps" in s:
            steps = s["steps"]
            if not isinstance(steps, (list, tuple)) or len(steps) != len(values):
                raise ValueError("list lr schedule: 'steps' must be a list as long as 'values'")
            if list(steps) != sorted(steps) or steps[0] != 0:
                raise ValueError(f"list lr schedule: 'steps' must be sorted and start at 0, got {steps!r}")
    return s


def lr_at(schedule: Mapping[str, Any], step: int, base_lr: float | None = None) -> float:
    """Learning rate at optimizer step ``step`` (≥ 0) under ``schedule`` (formulas in the module doc)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        try:
            step_i = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"step must be a non-negative int, got {step!r}") from None
        if step_i != step or step_i < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = step_i
    s = validate_schedule(schedule, base_lr)
    kind = s["type"]
    if kind == "list":
        values = s["values"]
        if "steps" in s:
            return float(values[bisect.bisect_right(s["steps"], step) - 1])
        return float(values[min(step, len(values) - 1)])
    lr = _num(s, "lr", default=base_lr)
    if kind == "constant":
        return lr
    if kind == "step":
        gamma = float(s["gamma"])
        if "milestones" in s:
            n = bisect.bisect_right([int(m) for m in s["milestones"]], step)
        else:
            n = step // int(s["step_size"])
        return lr * gamma**n
    total = float(s["total_steps"])
    min_lr = float(s.get("min_lr", 0.0))
    if kind == "cosine":
        t = min(step, total) / total
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    warmup = float(s.get("warmup_steps", 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = 1.0 if total <= warmup else min((step - warmup) / (total - warmup), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def torch_scheduler(schedule: Mapping[str, Any], optimizer: Any) -> Any:
    """A ``torch.optim.lr_scheduler.LambdaLR`` that sets every group's lr to ``lr_at(schedule, step)``.

    Each param group's initial lr is the base; the factor is lr_at/base, so a group with a different
    initial lr is scaled proportionally. Call ``scheduler.step()`` after each ``optimizer.step()``.
    """
    from torch.optim.lr_scheduler import LambdaLR

    base = float(optimizer.param_groups[0]["lr"])
    s = validate_schedule(schedule, base)
    if s["type"] != "list" and "lr" in s:
        base_sched = float(s["lr"])
    else:
        base_sched = base
    if base_sched == 0:
        raise ValueError("torch_scheduler needs a non-zero base lr")
    return LambdaLR(optimizer, lambda step: lr_at(s, step, base) / base_sched)


# ----------------------------------------------------------------------------- checkpoint schedules
CHECKPOINT_SCHEDULES = ("log", "linear", "log+linear")


def checkpoint_due(step: int, schedule: str | int | Any = "log+linear", *, every: int = 100) -> bool:
    """Whether a run of unknown length saves a checkpoint at ``step`` (step 0 always).

    ``"log"``: step 0 and powers of two (1, 2, 4, ...); ``"linear"``: every ``every`` steps;
    ``"log+linear"``: both (dense early, where dynamics change fastest, then evenly spaced);
    an int ``k``: every ``k`` steps; a collection of ints: exactly those steps.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint 'every' must be a positive int, got {every!r}")
    if isinstance(schedule, str):
        if schedule not in CHECKPOINT_SCHEDULES:
            raise ValueError(
                f"checkpoint schedule must be one of {CHECKPOINT_SCHEDULES}, an int or a list of steps; "
                f"got {schedule!r}"
            )
        log = step == 0 or (step & (step - 1)) == 0
        linear = step % every == 0
        return {"log": log, "linear": linear, "log+linear": log or linear}[schedule]
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        if schedule < 1:
            raise ValueError(f"checkpoint interval must be a positive int, got {schedule}")
        return step % schedule == 0
    try:
        return step in {int(s) for s in schedule}
    except TypeError:
        raise ValueError(
            f"checkpoint schedule must be one of {CHECKPOINT_SCHEDULES}, an int or a list of steps; "
            f"got {schedule!r}"
        ) from None
