"""Built-in demo runs, generated in the background by ``dynascope.recipes.demos``.

``dynascope app`` starts ``build_demos(runs_dir)`` in a separate process *before* Streamlit, so the demos
are under way when the first page is opened; that process keeps ``runs_dir/.demos_status.json`` up to
date and the app shows it (:meth:`DemoJob.refresh` re-reads it). When the app is started another way
(``streamlit run app/main.py``) and no live build is found, ``app/main.py`` starts one background thread
per runs folder on the first script run of any page (shared by all sessions of the server). Either way the
fastest demo comes first, each appears in the run list as soon as it is complete, and the banner reports
the real duration once all are done.
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
#: "process": ``dynascope app`` started the build in its own process; the app only shows its status
BUILDER_ENV = "DYNASCOPE_DEMOS_BUILDER"
#: a build process that has written no status file after this many seconds did not start
START_GRACE_S = 90.0


def demo_specs() -> list[Any]:
    """The built-in demos (``dynascope.recipes.demos.DEMOS``), cheapest first."""
    specs = list(recipe_demos.DEMOS)
    rank = {n: i for i, n in enumerate(recipe_demos.DEMO_ORDER)}
    return sorted(specs, key=lambda s: rank.get(s.name, len(rank)))


def missing_demos(root: Path) -> list[str]:
    """Names of the demos not yet complete under ``root/<name>``."""
    return [spec.name for spec in demo_specs() if not recipe_demos.demo_complete(root / spec.name, spec)]


def auto_generation_enabled() -> bool:
    return os.environ.get(DEMOS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class DemoJob:
    """Background generation of the missing demos under ``root``; its fields are read by the UI.

    A thread job (``start()``) fills the fields itself; a job of another process (``external=True``) is a
    view of its status file, re-read by :meth:`refresh`. ``started`` is in epoch seconds."""

    root: Path
    names: list[str]
    titles: dict[str, str]
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.time)
    finished_after: float | None = None  # seconds the generation took (set once, when it ends)
    seconds: dict[str, float] = field(default_factory=dict)  # per demo, as each completes
    thread: threading.Thread | None = None
    external: bool = False

    @classmethod
    def from_status(cls, root: Path, status: dict[str, Any]) -> DemoJob:
        job = cls(root=root, names=list(status.get("names") or []), titles={}, external=True)
        job._load(status)
        return job

    def _load(self, status: dict[str, Any]) -> None:
        self.names = list(status.get("names") or [])
        self.titles = dict(status.get("titles") or {})
        self.progress = {k: (int(v[0]), int(v[1])) for k, v in (status.get("progress") or {}).items()}
        self.finished = list(status.get("finished") or [])
        self.seconds = {k: float(v) for k, v in (status.get("seconds") or {}).items()}
        self.error = status.get("error")
        self.started = float(status.get("started") or time.time())
        self.finished_after = status.get("finished_after")
        self.done = bool(status.get("done"))
        if not self.done and not recipe_demos.writer_alive(status):
            self.done, self.error = True, self.error or "the demo build process ended before finishing"

    def refresh(self) -> DemoJob:
        """Re-read the status file of an external build (a thread job is always current)."""
        if self.external and not self.done:
            status = recipe_demos.read_status(self.root)
            if status is not None:
                self._load(status)
            elif time.time() - self.started > START_GRACE_S:
                log = self.root / ".demos.log"
                self.done, self.error = True, f"the demo build process did not start (see {log})"
        return self

    def start(self) -> DemoJob:
        self.thread = threading.Thread(target=self._work, name="dynascope-demos", daemon=True)
        self.thread.start()
        return self

    def _work(self) -> None:
        try:
            for name in self.names:
                t0 = time.time()
                recipe_demos.ensure_demos(self.root, progress=self._on_progress, names=[name])
                self.finished.append(name)
                self.seconds[name] = time.time() - t0
        except Exception as exc:  # noqa: BLE001 - shown on the Runs page
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_after = time.time() - self.started
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
    """The (single, server-wide) generation job for ``root``: the build ``dynascope app`` started in its
    own process when its status file says it is running or has finished (its outcome stays visible),
    else a thread started here when demos are missing."""
    key = str(root.resolve())
    with _jobs_lock:
        job = _jobs.get(key)
        if job is not None:  # running, or finished (its outcome stays visible)
            return job.refresh()
        status = recipe_demos.read_status(root)
        recent = status is not None and time.time() - float(status.get("started") or 0) < 6 * 3600
        if status is not None and (recipe_demos.writer_alive(status) or (status.get("done") and recent)):
            external = DemoJob.from_status(root, status)
            if not external.done or external.names:  # an old finished build with nothing done: ignore
                _jobs[key] = external
                return external
        todo = missing_demos(root)
        if not todo:
            return None
        if os.environ.get(BUILDER_ENV) == "process":  # started by `dynascope app`; its status file is due
            _jobs[key] = job = DemoJob(root=root, names=todo, titles={}, external=True)
            job.titles = {s.name: getattr(s, "title", s.name) for s in demo_specs()}
            return job
        titles = {s.name: getattr(s, "title", s.name) for s in demo_specs()}
        _jobs[key] = job = DemoJob(root=root, names=todo, titles=titles).start()
        return job


def job_for(root: Path) -> DemoJob | None:
    return _jobs.get(str(root.resolve()))


def show_progress(job: DemoJob) -> None:
    """Progress of the generation; reruns the whole app when a demo completes (so it gets listed)."""
    job.refresh()
    seen = st.session_state.setdefault("dynascope_demos_seen", 0)
    if len(job.finished) != seen:
        st.session_state["dynascope_demos_seen"] = len(job.finished)
        st.rerun(scope="app")
    if job.done:
        if job.error:
            st.error(f"Generating the demo runs failed: {job.error}")
        else:
            took = job.finished_after if job.finished_after is not None else time.time() - job.started
            each = ", ".join(
                f"{job.titles.get(n, n).split(':')[0].lower()} {job.seconds[n]:.0f} s"
                for n in job.names
                if n in job.seconds
            )
            st.success(
                f"Demo runs ready in `{job.root}` (generated in {took:.0f} s"
                + (f": {each}" if each else "")
                + ")."
            )
        return
    with st.container(border=True, key="demo_progress"):
        st.markdown(
            f"**Preparing the built-in demo runs** in `{job.root}` (first start only; "
            f"{time.time() - job.started:.0f} s so far). Each appears in the run list when ready; "
            "the app stays usable meanwhile."
        )
        for name in job.names:
            step, total = job.progress.get(name, (0, 0))
            state = "done" if name in job.finished else (f"step {step}/{total}" if total else "waiting")
            st.progress(job.fraction(name), text=f"{job.titles.get(name, name)} — {state}")
