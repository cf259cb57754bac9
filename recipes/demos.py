"""Demo runs for the app: small but real runs of each phenomenon, generated on first use.

``ensure_demos(root, progress=fn)`` writes every demo in ``DEMOS`` that is missing or incomplete under
``root/<name>`` (resuming an interrupted one) and returns ``{name: Run}``. ``progress(name, step, total,
metrics)`` is called as each demo trains (e.g. to drive a Streamlit progress bar).

``build_demos(root)`` (``python -m dynascope.recipes.demos ROOT``; what ``dynascope app`` starts in a
background process before Streamlit) generates the missing demos, cheapest first, on one torch thread, and
keeps a status file
``root/.demos_status.json`` up to date — ``{"pid", "started", "names", "titles", "progress": {name: [step,
total]}, "finished", "seconds": {name: build time}, "error", "done", "finished_after"}`` (times in epoch
seconds / seconds) — which the app
reads, so the first page visit finds the demos in progress or done.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import Run, RunError
from .base import RECIPES

__all__ = [
    "DemoSpec",
    "DEMOS",
    "ensure_demos",
    "demo_complete",
    "build_demos",
    "read_status",
    "status_path",
    "writer_alive",
    "DEMO_ORDER",
    "STATUS_FILE",
]

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
    DemoSpec(
        "neural_collapse",
        "neural_collapse",
        "Neural collapse: MLP on 100 digits, MSE + weight decay, terminal phase",
    ),
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


# ------------------------------------------------------------------------------ background build + status
STATUS_FILE = ".demos_status.json"
#: cheapest first: the first demo is listed within minutes
DEMO_ORDER = ("double_descent", "neural_collapse", "edge_of_stability", "grokking")


def status_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / STATUS_FILE


def read_status(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status file of a demo build under ``root`` (``None`` when there is none or it is unreadable)."""
    try:
        data = json.loads(status_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def writer_alive(status: Mapping[str, Any]) -> bool:
    """True when the process that writes ``status`` is still running (on this machine)."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _ordered(names: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(DEMO_ORDER)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def build_demos(root: str | os.PathLike[str], *, min_interval: float = 0.5) -> dict[str, Any]:
    """Generate the missing demos under ``root`` (cheapest first) while writing the status file; returns
    the final status. Errors are recorded in the status (``"error"``) and re-raised."""
    import torch

    from ..models.atomic import atomic_write_text

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # One thread: the demos' small networks gain little from a second one, and on a loaded 2-core machine
    # (the app, its probes, other work) torch's spinning worker threads made the build ~15× slower
    # (neural_collapse: 205 s with 2 threads at load ~9, 11 s with one).
    torch.set_num_threads(1)
    names = _ordered([s.name for s in DEMOS if not demo_complete(root / s.name, s)])
    status: dict[str, Any] = {
        "pid": os.getpid(),
        "started": time.time(),
        "names": names,
        "titles": {s.name: s.title for s in DEMOS},
        "progress": {},
        "finished": [],
        "seconds": {},
        "error": None,
        "done": False,
        "finished_after": None,
    }
    last = [0.0]

    def write(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last[0] >= min_interval:
            last[0] = now
            atomic_write_text(status_path(root), json.dumps(status))

    def progress(name: str, step: int, total: int, metrics: Mapping[str, Any]) -> None:
        status["progress"][name] = [int(step), int(total)]
        write()

    write(force=True)
    try:
        for name in names:
            t0 = time.time()
            ensure_demos(root, progress=progress, names=[name])
            status["finished"].append(name)
            status["seconds"][name] = time.time() - t0
            write(force=True)
    except BaseException as exc:
        status["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        status["done"] = True
        status["finished_after"] = time.time() - status["started"]
        write(force=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m dynascope.recipes.demos ROOT``: build the missing demos with a status file; nothing
    when another build of ``ROOT`` is running, and only a removal of a stale status file when every demo
    is complete."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dynascope.recipes.demos RUNS_DIR", file=sys.stderr)
        return 2
    root = Path(args[0])
    status = read_status(root)
    if status is not None and not status.get("done") and status.get("pid") != os.getpid():
        if writer_alive(status):
            print(f"demos: a build of {root} is already running (pid {status['pid']})")
            return 0
    if all(demo_complete(root / s.name, s) for s in DEMOS):
        status_path(root).unlink(missing_ok=True)
        print(f"demos: all complete in {root}")
        return 0
    try:
        status = build_demos(args[0])
    except Exception as exc:  # noqa: BLE001 - recorded in the status file; one line here
        print(f"demos: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"demos ready in {args[0]} ({status['finished_after']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
