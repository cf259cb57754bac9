"""Seed twins: the same recipe run again with the next seed, trained in a background thread.

A recipe run records its recipe and full config in ``run.json`` (``extra.recipe``, ``extra.config``), so
``RECIPES[recipe].run(out, seed=seed + 1, **config)`` trains an independent replicate — what mode
connectivity compares (a real barrier between two solutions, before and after alignment). The twin goes
beside the run (``<name>-seed<k>``), so it is listed with the other runs; one job per twin folder,
shared by all sessions of the server.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynascope.models import Run


def recipe_of(run: Run) -> tuple[str, dict[str, Any]] | None:
    """``(recipe name, config)`` of a recipe run, else ``None``."""
    extra = run.extra or {}
    recipe, config = extra.get("recipe"), extra.get("config")
    if not recipe or not isinstance(config, dict):
        return None
    from dynascope.recipes import RECIPES

    return (recipe, dict(config)) if recipe in RECIPES else None


def twin_path(run: Run) -> Path:
    """Where the seed twin of ``run`` goes: ``<run>-seed<seed+1>`` beside it."""
    seed = int(run.config.get("seed") or 0) + 1
    return run.path.parent / f"{run.path.name}-seed{seed}"


@dataclass
class TwinJob:
    """Background training of one seed twin; its fields are read by the UI."""

    source: Path
    out: Path
    recipe: str
    config: dict[str, Any]
    seed: int
    step: int = 0
    total: int = 0
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    finished_after: float | None = None
    thread: threading.Thread | None = None

    def start(self) -> TwinJob:
        self.thread = threading.Thread(target=self._work, name=f"dynascope-twin-{self.out.name}", daemon=True)
        self.thread.start()
        return self

    def _work(self) -> None:
        from dynascope.recipes import RECIPES

        try:
            RECIPES[self.recipe].run(
                self.out, seed=self.seed, progress=self._on_progress, resume=True, **self.config
            )
        except Exception as exc:  # noqa: BLE001 - shown on the page
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_after = time.monotonic() - self.started
            self.done = True

    def _on_progress(self, step: int, total: int, metrics: Any = None) -> None:
        self.step, self.total = int(step), int(total)

    @property
    def fraction(self) -> float:
        if self.done and self.error is None:
            return 1.0
        return min(max(self.step / self.total, 0.0), 1.0) if self.total else 0.0


_jobs: dict[str, TwinJob] = {}
_lock = threading.Lock()


def job_for(run: Run) -> TwinJob | None:
    return _jobs.get(str(twin_path(run)))


def start_twin(run: Run) -> TwinJob:
    """Start (or return the running) seed-twin job of a recipe run; ``ValueError`` for other runs."""
    found = recipe_of(run)
    if found is None:
        raise ValueError(f"run '{run.path}' is not a recipe run (run.json has no extra.recipe/config)")
    recipe, config = found
    out = twin_path(run)
    with _lock:
        job = _jobs.get(str(out))
        if job is not None and (not job.done or job.error is None):
            return job
        seed = int(run.config.get("seed") or 0) + 1
        _jobs[str(out)] = job = TwinJob(
            source=run.path, out=out, recipe=recipe, config=config, seed=seed
        ).start()
        return job
