"""Demo runs for the app: small but real runs of each phenomenon, generated on first use.

``ensure_demos(root, progress=fn)`` writes every demo in ``DEMOS`` that is missing or incomplete under
``root/<name>`` (resuming an interrupted one) and returns ``{name: Run}``. ``progress(name, step, total,
metrics)`` is called as each demo trains (e.g. to drive a Streamlit progress bar).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import Run, RunError
from .base import RECIPES

__all__ = ["DemoSpec", "DEMOS", "ensure_demos", "demo_complete"]

DemoProgress = Callable[[str, int, int, Mapping[str, Any]], None]


@dataclass(frozen=True)
class DemoSpec:
    """A demo: recipe ``recipe`` run with its ``small`` variant plus ``overrides`` into ``root/name``."""

    name: str
    recipe: str
    title: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0


DEMOS: tuple[DemoSpec, ...] = (
    DemoSpec("grokking", "grokking", "Grokking: (a+b) mod 97, embedding MLP, AdamW wd 1.0"),
    DemoSpec(
        "double_descent", "double_descent", "Double descent: random ReLU features, min-norm least squares"
    ),
    DemoSpec("edge_of_stability", "edge_of_stability", "Edge of stability: tanh MLP on digits, GD eta=0.5"),
)


def demo_complete(path: str | os.PathLike[str], spec: DemoSpec) -> bool:
    """True when ``path`` holds a finished run of ``spec`` (its final checkpoint is written)."""
    try:
        run = Run.open(path)
    except RunError:
        return False
    extra = run.config.get("extra") or {}
    if extra.get("recipe") != RECIPES[spec.recipe].name and extra.get("recipe") != spec.recipe:
        return False
    if "complete" in extra:
        return bool(extra["complete"])
    cfg = RECIPES[spec.recipe].resolve(small=True, **spec.overrides)
    steps = run.steps()
    return bool(steps) and steps[-1] >= int(cfg.get("steps", 0))


def _named_progress(cb: DemoProgress, name: str) -> Callable[[int, int, Mapping[str, Any]], None]:
    def per_step(step: int, total: int, metrics: Mapping[str, Any]) -> None:
        cb(name, step, total, metrics)

    return per_step


def ensure_demos(
    root: str | os.PathLike[str],
    *,
    progress: DemoProgress | bool | None = None,
    names: list[str] | None = None,
) -> dict[str, Run]:
    """Generate the missing demos under ``root`` and return all of them as ``{name: Run}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Run] = {}
    for spec in DEMOS:
        if names is not None and spec.name not in names:
            continue
        path = root / spec.name
        if not demo_complete(path, spec):
            prog: Any = _named_progress(progress, spec.name) if callable(progress) else bool(progress)
            RECIPES[spec.recipe].run(
                path, small=True, seed=spec.seed, progress=prog, resume=True, **spec.overrides
            )
        out[spec.name] = Run.open(path)
    return out
