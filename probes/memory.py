"""Peak memory of a block of work, where the platform reports it.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the tensors' bytes);
* Linux CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset by writing
  ``5`` to ``/proc/self/clear_refs`` — pages, so it includes the allocator's slack and other threads;
* elsewhere: ``None`` (not measured).

The reported value is the peak *above* the memory in use when the block started. On CPU, glibc keeps
freed heap memory mapped unless large blocks are ``mmap``-ed, so run with ``MALLOC_MMAP_THRESHOLD_=131072``
(as ``bench/bench_memory.py`` does) for a peak that reflects live tensors. A block nested in another is
not measured on CPU (resetting the peak would spoil the outer measurement).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), else ``None``."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


_DEPTH = [0]  # nesting: an inner block must not reset the peak an outer one is measuring


class PeakMemory:
    """Result holder of :func:`peak_memory`: ``.bytes`` (peak above the start) and ``.how``."""

    bytes: int | None = None
    how: str = "not measured"


@contextmanager
def peak_memory(device: torch.device | str | None = None) -> Iterator[PeakMemory]:
    """Measure the peak memory above the starting level while the ``with`` block runs."""
    out = PeakMemory()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield out
        torch.cuda.synchronize(dev)
        out.bytes, out.how = torch.cuda.max_memory_allocated(dev) - start, "cuda max_memory_allocated"
        return
    start = rss_bytes()
    resettable = False
    if _DEPTH[0] == 0:
        try:
            _CLEAR.write_text("5")
            resettable = start is not None
        except OSError:
            pass
    _DEPTH[0] += 1
    try:
        yield out
    finally:
        _DEPTH[0] -= 1
    peak = _status_kib("VmHWM")
    if resettable and peak is not None and start is not None:
        out.bytes, out.how = max(peak * 1024 - start, 0), "peak RSS (VmHWM) above the start"
    elif _DEPTH[0] > 0:
        out.how = "not measured (inside another peak_memory block)"
