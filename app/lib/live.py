"""Live runs: a run folder still being written (a training loop or ``dynascope.Tracker`` appending
checkpoints and metrics.csv rows) is polled, so a page follows it without a reload.

The run folder format is the one of :class:`dynascope.models.Run` (run.json, checkpoints/, metrics.csv);
nothing here writes to it.
"""

from __future__ import annotations

import time
from pathlib import Path

#: A run counts as live when one of its files changed within this many seconds.
LIVE_WINDOW_S = 120.0
POLL_S = 2.0


def last_write(path: Path) -> float:
    """The newest modification time (epoch seconds) of run.json, metrics.csv and the checkpoints."""
    times = []
    for p in (path / "run.json", path / "metrics.csv", path / "checkpoints"):
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    ck = path / "checkpoints"
    if ck.is_dir():
        try:
            times.extend(f.stat().st_mtime for f in ck.iterdir())
        except OSError:
            pass
    return max(times, default=0.0)


def is_live(path: Path, window: float = LIVE_WINDOW_S) -> bool:
    """True when the run folder was written within the last ``window`` seconds."""
    return time.time() - last_write(path) < window
