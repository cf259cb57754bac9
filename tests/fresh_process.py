"""Run Python code in a fresh interpreter (for tests that spawn torch.distributed ranks).

The ranks are spawned from a new interpreter, not from the pytest process: state that earlier tests leave in
the pytest process (Hugging Face / Lightning imports, inductor settings) made a spawned rank abort in the
full suite. The ranks meet through a file (:func:`rendezvous`), not a port picked in advance. A failed
process is never retried (a genuine collective mismatch between ranks also dies with
SIGABRT); ``PYTHONFAULTHANDLER`` is set, so a rank that aborts prints every thread's Python stack into the
stderr that the failing assertion shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["failure", "rendezvous", "run_fresh"]


def rendezvous(folder: Path) -> str:
    """A ``file://`` init method in ``folder`` for the ranks of one test: no TCP port is chosen in advance,
    so no other process can take it between the choice and the bind (gloo binds its own ports)."""
    path = Path(folder) / "rendezvous"
    path.unlink(missing_ok=True)
    return path.resolve().as_uri()


def run_fresh(code: str, args: Sequence[str], *, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -c code *args`` in a fresh interpreter (``TORCHINDUCTOR*`` variables dropped, the fault
    handler on in it and in the ranks it spawns)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    env["PYTHONFAULTHANDLER"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def failure(proc: subprocess.CompletedProcess) -> str:
    """The tail of a failed process's output, for an assertion message."""
    return f"exit {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-6000:]
