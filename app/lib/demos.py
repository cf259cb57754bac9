"""Built-in demo runs, generated when the app starts by ``dynascope.recipes.demos.ensure_demos``
(``app/main.py`` starts the job on the first script run of any page, not on a visit to the Runs page).

Generation runs in one background thread per runs folder (shared by all sessions of the server), the
fastest demo first, so the app stays usable: each demo appears in the run list as soon as it is
complete (a half-trained one can be inspected live), and the Runs page shows a progress bar per demo.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from dynascope.recipes import demos as recipe_demos

DEMOS_ENV = "DYNASCOPE_DEMOS"  # "0" turns automatic generation off (tests, read-only installs)
# cheapest first: users see the first demo's charts within seconds
_ORDER = ("double_descent", "edge_of_stability", "grokking")


def demo_specs() -> list[Any]:
    """The built-in demos (``dynascope.recipes.demos.DEMOS``), cheapest first."""
    specs = list(recipe_demos.DEMOS)
    rank = {n: i for i, n in enumerate(_ORDER)}
    return sorted(specs, key=lambda s: rank.get(s.name, len(rank)))


def missing_demos(root: Path) -> list[str]:
    """Names of the demos not yet complete under ``root/<name>``."""
    return [spec.name for spec in demo_specs() if not recipe_demos.demo_complete(root / spec.name, spec)]


def auto_generation_enabled() -> bool:
    return os.environ.get(DEMOS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class DemoJob:
    """Background generation of the missing demos under ``root``; its fields are read by the UI."""

    root: Path
    names: list[str]
    titles: dict[str, str]
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    finished_after: float | None = None  # seconds the generation took (set once, when it ends)
    thread: threading.Thread | None = None

    def start(self) -> DemoJob:
        self.thread = threading.Thread(target=self._work, name="dynascope-demos", daemon=True)
        self.thread.start()
        return self

    def _work(self) -> None:
        try:
            for name in self.names:
                recipe_demos.ensure_demos(self.root, progress=self._on_progress, names=[name])
                self.finished.append(name)
        except Exception as exc:  # noqa: BLE001 - shown on the Runs page
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_after = time.monotonic() - self.started
            self.done = True

    def _on_progress(self, name: str, step: int, total: int, metrics: Any = None) -> None:
        self.progress[name] = (int(step), int(total))

    def fraction(self, name: str) -> float:
        if name in self.finished:
            return 1.0
        step, total = self.progress.get(name, (0, 0))
        return min(max(step / total, 0.0), 1.0) if total else 0.0


_jobs: dict[str, DemoJob] = {}
_jobs_lock = threading.Lock()


def start_generation(root: Path) -> DemoJob | None:
    """The (single, server-wide) generation job for ``root``; started when demos are missing."""
    key = str(root.resolve())
    with _jobs_lock:
        job = _jobs.get(key)
        if job is not None:  # running, or finished (its outcome stays visible)
            return job
        todo = missing_demos(root)
        if not todo:
            return None
        titles = {s.name: getattr(s, "title", s.name) for s in demo_specs()}
        _jobs[key] = job = DemoJob(root=root, names=todo, titles=titles).start()
        return job


def job_for(root: Path) -> DemoJob | None:
    return _jobs.get(str(root.resolve()))


def show_progress(job: DemoJob) -> None:
    """Progress of the generation; reruns the whole app when a demo completes (so it gets listed)."""
    seen = st.session_state.setdefault("dynascope_demos_seen", 0)
    if len(job.finished) != seen:
        st.session_state["dynascope_demos_seen"] = len(job.finished)
        st.rerun(scope="app")
    if job.done:
        if job.error:
            st.error(f"Generating the demo runs failed: {job.error}")
        else:
            took = job.finished_after if job.finished_after is not None else time.monotonic() - job.started
            st.success(f"Demo runs ready in `{job.root}` (generated in {took:.0f} s).")
        return
    with st.container(border=True, key="demo_progress"):
        st.markdown(
            f"**Preparing the built-in demo runs** in `{job.root}` (first start only; "
            f"{time.monotonic() - job.started:.0f} s so far). Each appears in the run list when ready; "
            "the app stays usable meanwhile."
        )
        for name in job.names:
            step, total = job.progress.get(name, (0, 0))
            state = "done" if name in job.finished else (f"step {step}/{total}" if total else "waiting")
            st.progress(job.fraction(name), text=f"{job.titles.get(name, name)} — {state}")
