"""The tracker's background writer: file writes (and their fsyncs) leave the training thread.

Used when the tracker has no probe worker process (no inline probes, probes on the training thread, or a
worker that died); with a worker, the worker process writes the run (:mod:`dynascope.track_worker`).

The training thread hands over a snapshot of what to write — CPU copies of the weights and the optimizer
state, metrics rows, the status — and one writer thread runs the jobs in the order they came. Every file is
still written atomically (temp file, fsync, rename), so a reader, or a process killed with SIGKILL, sees
each file whole or not at all, a visible checkpoint has its optimizer state, and metrics rows and status
never name a checkpoint that is not yet on disk (they are written after every job handed over before them).

* Checkpoint snapshots wait for the writer while their total size stays within ``max_pending_bytes``
  (default 256 MiB; one snapshot may always wait, however large); a further one waits for the writer
  before it is taken (memory stays bounded; the wait counts as tracker time).
* A flush handed over while the previous flush is still the last job waiting merges into it (rows by step,
  the newest status), so a fast loop with frequent flushes never builds a queue.
* A job that raises is recorded and the writer goes on with the next jobs; :meth:`Writer.errors` hands the
  records to the training thread (the tracker raises them at its next call).
* ``threaded=False`` runs every job at once on the caller's thread (the same order and files); so does a
  writer after :meth:`Writer.close`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Writer"]

FlushFn = Callable[[list[dict[str, Any]], dict[str, Any] | None], None]


class _Job:
    __slots__ = ("fn", "kind", "rows", "status")

    def __init__(self, fn: Callable[..., None], kind: str) -> None:
        self.fn, self.kind = fn, kind
        self.rows: dict[int, dict[str, Any]] = {}
        self.status: dict[str, Any] | None = None


class Writer:
    """Run write jobs in order on one daemon thread (module docstring)."""

    def __init__(
        self, *, threaded: bool = True, max_pending_bytes: int = 256 << 20, name: str = "dynascope-tracker"
    ) -> None:
        if (
            isinstance(max_pending_bytes, bool)
            or not isinstance(max_pending_bytes, int)
            or max_pending_bytes < 0
        ):
            raise ValueError(f"max_pending_bytes must be a non-negative int, got {max_pending_bytes!r}")
        self.threaded = threaded
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0  # snapshots handed over and not yet written
        self.busy_seconds = 0.0  # wall time running jobs
        self.cpu_seconds = 0.0  # CPU time of the thread running them (an fsync's wait is not CPU)
        self.jobs_done = 0
        self._errors: list[str] = []
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0  # jobs taken off the queue and not finished
        self._stop = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ hand-over (training thread)
    def submit(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` (runs after every job queued before it)."""
        self._put(_Job(fn, "job"))

    def submit_checkpoint(self, snapshot: Callable[[], Callable[[], None]], nbytes: int) -> float:
        """Wait until a snapshot of ``nbytes`` fits (module docstring), then call ``snapshot()`` on this
        thread (it copies what to write) and queue the job it returns. Returns the seconds waited."""
        t0 = time.perf_counter()
        with self._cond:
            while self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                self._cond.wait()
            self._pending_bytes += nbytes
        waited = time.perf_counter() - t0
        try:
            fn = snapshot()
        except BaseException:
            self._release(nbytes)
            raise

        def job() -> None:
            try:
                fn()
            finally:
                self._release(nbytes)

        self._put(_Job(job, "checkpoint"))
        return waited

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._pending_bytes -= nbytes
            self._cond.notify_all()

    def flush(self, rows: list[dict[str, Any]], status: dict[str, Any] | None, write: FlushFn) -> None:
        """Queue writing ``rows`` and ``status`` with ``write(rows, status)``; merges into a waiting flush."""
        with self._cond:
            last = self._jobs[-1] if self._jobs else None
            if last is None or last.kind != "flush":
                last = _Job(write, "flush")
                self._jobs.append(last)
            for r in rows:
                last.rows.setdefault(int(r["step"]), {}).update(r)
            if status is not None:
                last.status = status
            self._cond.notify_all()
        if self._inline():
            self._run_queued()

    def _put(self, job: _Job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()
        if self._inline():
            self._run_queued()

    def _inline(self) -> bool:
        """Jobs run on the caller's thread without a writer thread, or once it is stopped (``close()``)."""
        return not self.threaded or (
            self._stop and not (self._thread is not None and self._thread.is_alive())
        )

    # ------------------------------------------------------------------ the writer
    def _execute(self, job: _Job) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if job.kind == "flush":
                job.fn([job.rows[s] for s in sorted(job.rows)], job.status)
            else:
                job.fn()
        except Exception as e:  # noqa: BLE001 - reported on the training thread by check()
            with self._cond:
                self._errors.append(f"{type(e).__name__}: {e}")
        finally:
            self.busy_seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0
            self.jobs_done += 1

    def _run_queued(self) -> None:
        while self._jobs:
            self._execute(self._jobs.popleft())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running += 1
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    # ------------------------------------------------------------------ waiting, errors
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done; ``False`` if ``timeout`` passed first."""
        if self._inline():
            self._run_queued()
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._jobs or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def errors(self) -> list[str]:
        """The errors recorded since the last call (and forgets them)."""
        with self._cond:
            out, self._errors = self._errors, []
        return out

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + self._running

    def close(self, timeout: float | None = None) -> bool:
        """Drain and stop the thread; ``False`` when jobs were still running at ``timeout``."""
        done = self.drain(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and done:
            self._thread.join(timeout)
        return done
