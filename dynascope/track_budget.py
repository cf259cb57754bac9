"""The tracker's overhead budget: its time on the training thread stays under a fraction of training time.

Accounting (seconds, cumulative since the tracker started):

* ``train``: the time the training loop spends between tracker calls;
* ``own``: the time spent inside the tracker's per-step calls on the training thread — checkpoint snapshots
  and their hand-off to the background writer (plus any wait for it), metric and status hand-offs, inline
  probes;
* ``background``: the background writer thread's CPU time (``time.thread_time``; 0 with a probe worker,
  which writes the run in its own process). It runs beside training
  but is charged too: a Python thread shares the interpreter lock (and, on a busy machine, the cores) with
  the training loop; its waits on ``fsync`` hold neither, so its wall time is reported, not charged.
* ``interference``: what the probe worker's runs cost training although they run in another process —
  the training steps taken while it computed, minus the same number of steps at the mean length of steps
  taken while it was idle (the slowdown from sharing cores, caches and memory bandwidth; about 0 with a
  spare core). The worker's own time is not charged: it is another process with its own thread budget
  (:mod:`dynascope.track_worker`); what it costs the training thread — the snapshot hand-off, the checkpoint
  written for the probe — is in ``own``.
  The constructor's setup and ``close()`` are recorded, not budgeted.

``charged = own + background + interference`` is what the budget bounds.

The rule, applied when an inline probe comes due (``step % every == 0``), with ``cost`` its last measured
cost on the training thread (the probe plus the checkpoint written for it):

* **run** when ``charged + cost ≤ budget × train``; a probe's first run always happens (it measures the cost);
* **defer** otherwise: that run is skipped and recorded, and the probe's interval doubles (*stretch*) —
  for a probe on the training thread; one in the probe worker keeps its interval (its run costs the
  training thread only the hand-off, so it simply runs at the next due step the budget has room for);
* **relax** (hysteresis): when a stretched probe runs and ``charged + cost ≤ RELAX × budget × train``
  (``RELAX = 1/2``), its interval halves, never below the requested one. The band between ``RELAX × budget``
  and ``budget`` is a factor 2, the factor an interval changes by, so an interval does not flip back and
  forth on every due step;
* checkpoints on the user's schedule are never deferred nor dropped: their cost counts in ``own`` (so
  probes yield to them) and when they alone exceed the budget the status says so (:meth:`over_budget`).

So ``charged ≤ budget × train`` holds at every step except for the first run of each probe and scheduled
checkpoints that on their own take more than the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RELAX", "Interval", "OverheadBudget"]

#: a stretched interval halves when the overhead is at most this fraction of the budget
RELAX = 0.5


@dataclass
class Interval:
    """A probe's interval: ``requested`` by the user, ``every`` now (stretched ×2 / relaxed ÷2) and the
    ``cost`` (seconds on the training thread) of its last run (``None`` before the first)."""

    requested: int
    every: int = 0
    cost: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.requested, bool) or not isinstance(self.requested, int) or self.requested < 1:
            raise ValueError(f"a probe interval must be a positive int, got {self.requested!r}")
        self.every = self.every or self.requested

    def due(self, step: int) -> bool:
        return step % self.every == 0


@dataclass
class OverheadBudget:
    """Cumulative training and tracker seconds, and the run / defer / relax rule (module docstring).

    ``fraction``: the budget as a fraction of training time; ``None`` never defers nor relaxes.
    """

    fraction: float | None
    train: float = 0.0
    own: dict[str, float] = field(default_factory=lambda: {"probe": 0.0, "checkpoint": 0.0, "write": 0.0})
    background: float = 0.0
    interference: float = 0.0

    def add_train(self, seconds: float) -> None:
        self.train += max(seconds, 0.0)

    def add_own(self, kind: str, seconds: float) -> None:
        self.own[kind] = self.own.get(kind, 0.0) + max(seconds, 0.0)

    @property
    def own_total(self) -> float:
        return sum(self.own.values())

    @property
    def charged(self) -> float:
        """``own + background + interference``: the tracker time the budget bounds."""
        return self.own_total + self.background + self.interference

    def admits(self, cost: float) -> bool:
        """``charged + cost ≤ budget × train`` (always true without a budget)."""
        return self.fraction is None or self.charged + cost <= self.fraction * self.train

    def decide(
        self, interval: Interval, planned: float = 0.0, stretch: bool = True
    ) -> tuple[bool, str | None]:
        """Run the due probe (``True, None``), or defer it and stretch its interval (``False, reason``).
        ``planned``: the cost of the probes already admitted at this step. ``stretch=False`` (probes in the
        worker: a run costs the training thread only its hand-off) skips the run and keeps the interval,
        so the probe runs again as soon as the budget has room."""
        if interval.cost is None or self.admits(planned + interval.cost):
            return True, None
        if stretch:
            interval.every *= 2
        return False, (
            f"tracker time {self.charged:.3g} s + {planned + interval.cost:.3g} s would exceed "
            f"{self.fraction:g} × training time {self.train:.3g} s"
        )

    def relax(self, interval: Interval) -> bool:
        """After a run: halve a stretched interval when ``charged + cost ≤ RELAX × budget × train``."""
        if self.fraction is None or interval.every <= interval.requested or interval.cost is None:
            return False
        if self.charged + interval.cost > RELAX * self.fraction * self.train:
            return False
        interval.every = max(interval.every // 2, interval.requested)
        return True

    @property
    def fixed(self) -> float:
        """The charged seconds that are not the probes' (training-thread time and interference)."""
        return max(self.charged - self.own.get("probe", 0.0) - self.interference, 0.0)

    def over_budget(self) -> str | None:
        """A note when checkpoints and writes alone take more than the budget (they are never deferred)."""
        if self.fraction is None or self.train <= 0:
            return None
        fixed = self.fixed
        if fixed <= self.fraction * self.train:
            return None
        return (
            f"checkpoints and writes alone take {fixed / self.train:.1%} of training time (budget "
            f"{self.fraction:.0%}); they are never deferred, so inline probes wait — a sparser checkpoint "
            "schedule lowers it"
        )

    def summary(self) -> dict[str, Any]:
        t = self.train
        return {
            "train_seconds": round(t, 6),
            "tracker_seconds": round(self.own_total, 6),
            "background_seconds": round(self.background, 6),
            "interference_seconds": round(self.interference, 6),
            "fraction": self.charged / t if t > 0 else None,
            "budget": self.fraction,
        }
