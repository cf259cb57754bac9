"""Run Python code in a fresh interpreter (for tests that spawn torch.distributed ranks).

The ranks are spawned from a new interpreter, not from the pytest process: state that earlier tests leave in
the pytest process (Hugging Face / Lightning imports, inductor settings) made a spawned rank abort in the
full suite. A gloo rank also aborted at start-up now and then (SIGABRT, no Python error) in full CI runs
only, so such a start is retried, on a fresh port, up to ``tries`` times.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["free_port", "run_fresh"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fresh(
    code: str, args: Sequence[str], *, port_arg: int | None = None, tries: int = 3, timeout: float = 900
) -> tuple[subprocess.CompletedProcess, int]:
    """``python -c code *args`` in a fresh interpreter (``TORCHINDUCTOR*`` variables dropped);
    ``args[port_arg]`` gets a free port on every try. Retried while it fails with a SIGABRT.
    Returns ``(process, tries)``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    args = list(args)
    n = 0
    for _ in range(tries):
        n += 1
        if port_arg is not None:
            args[port_arg] = str(free_port())
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode == 0 or "SIGABRT" not in proc.stderr:
            break
    return proc, n
