"""The tracker's overhead budget (stretch and relax, with a fake clock: no timed assertions) and its
background writer (order, coalesced flushes, bounded snapshots, errors raised on the training thread)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import dynascope
import dynascope.tracker as tracker_mod
from dynascope.models import RunError, build
from dynascope.track_budget import RELAX, Interval, OverheadBudget
from dynascope.track_writer import Writer
from dynascope.tracker import Tracker, run_status

LR = 0.1


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------------------------------ the rule
def test_budget_rule_runs_defers_and_relaxes_with_hysteresis() -> None:
    b = OverheadBudget(0.1)
    iv = Interval(2)
    assert b.decide(iv) == (True, None)  # the first run measures the cost
    iv.cost = 1.0
    b.add_own("probe", 1.0)
    b.add_train(10.0)
    run, why = b.decide(iv)  # 1 + 1 > 0.1 × 10
    assert not run and iv.every == 4 and "would exceed 0.1 × training time 10 s" in why
    b.add_train(10.0)
    assert b.decide(iv) == (True, None) and iv.every == 4  # 1 + 1 ≤ 0.1 × 20: runs, interval kept
    assert not b.decide(iv, planned=0.5)[0] and iv.every == 8  # probes admitted at this step count
    # relax: only when own + cost ≤ RELAX × budget × train, never below the requested interval
    assert RELAX == 0.5
    b.add_train(20.0)  # train 40: relax threshold 0.5 × 0.1 × 40 = 2 = own 1 + cost 1
    assert b.relax(iv) and iv.every == 4
    b.add_own("checkpoint", 0.5)  # own 1.5 + cost 1 = 2.5: inside the band (2, 4]: no change either way
    assert not b.relax(iv) and iv.every == 4
    assert b.decide(iv) == (True, None) and iv.every == 4
    b.add_train(1000.0)
    assert b.relax(iv) and iv.every == 2
    assert not b.relax(iv) and iv.every == 2  # the requested interval is the floor
    free = OverheadBudget(None)
    iv2 = Interval(3, cost=1e9)
    assert free.decide(iv2) == (True, None) and not free.relax(iv2) and iv2.every == 3
    with pytest.raises(ValueError, match="positive int"):
        Interval(0)


def test_over_budget_note_when_checkpoints_alone_exceed_it() -> None:
    b = OverheadBudget(0.1)
    b.add_train(10.0)
    b.add_own("probe", 5.0)  # probes are deferrable: no note
    assert b.over_budget() is None
    b.add_own("checkpoint", 1.5)
    assert "checkpoints and writes alone take 15.0% of training time" in b.over_budget()
    assert b.summary()["fraction"] == pytest.approx(0.65)


def test_background_writer_time_is_charged_to_the_budget() -> None:
    """The writer thread shares the interpreter lock with training: its busy time is charged too."""
    b = OverheadBudget(0.1)
    b.add_train(10.0)
    b.add_own("probe", 0.4)
    iv = Interval(5, cost=0.5)
    assert b.admits(0.5) and b.decide(iv) == (True, None)
    b.background = 0.2  # 0.4 + 0.2 + 0.5 > 0.1 × 10
    assert not b.admits(0.5)
    run, reason = b.decide(iv)
    assert not run and iv.every == 10 and "tracker time 0.6 s" in reason
    assert b.summary()["background_seconds"] == 0.2 and b.summary()["fraction"] == pytest.approx(0.06)


# ------------------------------------------------------------------------------------------ fake clock
class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_tracker_stretches_then_relaxes_then_stretches_on_a_fake_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training takes 1 s a step, λ_max (requested every 2 steps) 1 s a run, then 0.05 s (from step 201),
    then 1 s again (from 321); only the fake clock moves. The interval stretches while the probe is dear,
    comes back to 2 when it is cheap, stretches again; the tracker's time stays within the budget apart
    from the first run (and the first dear run after the cheap ones)."""
    clock = FakeClock()
    monkeypatch.setattr(tracker_mod, "_clock", clock)
    cost = {"now": 1.0}
    original = Tracker._run_probe

    def timed_probe(self, p, step, lr):  # the probe "takes" cost["now"] seconds of the fake clock
        clock.t += cost["now"]
        if p.runs < 3:  # a real λ_max for the first runs; then only the count (keeps the test fast)
            return original(self, p, step, lr)
        p.runs += 1

    monkeypatch.setattr(Tracker, "_run_probe", timed_probe)
    model = build("mlp", in_dim=4, width=4, depth=1, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    # probes and writes on the training thread (the rule for inline probes): a background writer's busy time
    # would be read off the fake clock while this thread moves it, a race that made the budget (and the
    # intervals) differ from run to run
    tr = Tracker(tmp_path / "run", model, data=(x, y), loss="cross_entropy", optimizer=opt, schedule=[0],
                 probes={"lambda_max": 2}, budget=0.1, heartbeat_s=1e9, save_optimizer=False,
                 background_writes=False, probe_worker="inline")  # fmt: skip
    everys: dict[int, int] = {}
    ran: list[int] = []
    tr.step(0)
    first = tr.overhead["tracker_seconds"]
    assert first == pytest.approx(1.0)
    for s in range(1, 381):
        if s == 201:
            cost["now"] = 0.05
        if s == 321:
            cost["now"] = 1.0
        clock.t += 1.0  # one training step
        with torch.no_grad():
            for prm in model.parameters():
                prm.mul_(0.999)
        tr.step(s, metrics={"train_loss": 1.0 / s})
        everys[s] = tr._probes[0].interval.every
        if tr._probes[0].runs > len(ran) + 1:
            ran.append(s)
        o = tr.overhead
        slack = first + (0.95 if s > 320 else 0.0)  # the first run; the first dear run after cheap ones
        assert o["tracker_seconds"] <= 0.1 * o["train_seconds"] + slack + 1e-9, s
    tr.close()
    skipped, relaxed = tr.skipped, tr.relaxed
    # dear phase: deferred at 2, 4, 8, 16 (the interval doubling each time), first run again at 32
    assert [(k["step"], k["every"]) for k in skipped[:4]] == [(2, 4), (4, 8), (8, 16), (16, 32)]
    assert ran[:4] == [32, 64, 96, 128]
    # ... and the interval came back (halving) once the cumulative overhead fell to half the budget
    assert relaxed[0] == {"step": 128, "probe": "lambda_max", "every": 16}
    # cheap phase: the interval returns to the requested 2 (halving; late, as the overhead is cumulative and
    # the dear phase used the whole budget) and stays there
    cheap = [r for r in relaxed if 200 < r["step"] <= 320]
    assert cheap and cheap[-1]["every"] == 2
    assert [r["every"] for r in cheap] == sorted((r["every"] for r in cheap), reverse=True)
    assert all(everys[s] == 2 for s in range(280, 321)) and set(range(280, 321, 2)) <= set(ran)
    assert not [k for k in skipped if 200 < k["step"] <= 320]
    # dear again: deferred, stretched
    assert [k for k in skipped if k["step"] > 320] and everys[380] > 2
    status = run_status(tmp_path / "run")
    assert status["relaxed"] == relaxed and status["skipped"] == skipped
    assert status["probes"]["lambda_max"]["every_requested"] == 2


# ------------------------------------------------------------------------------------------ the writer
def test_writer_runs_jobs_in_order_and_coalesces_waiting_flushes() -> None:
    w = Writer()
    gate, log = threading.Event(), []
    w.submit(lambda: (gate.wait(30), log.append("gate")))
    w.flush([{"step": 1, "a": 1}], {"step": 1}, lambda rows, st: log.append(("flush", rows, st)))
    w.flush([{"step": 2, "a": 2}, {"step": 1, "b": 1}], {"step": 2}, lambda rows, st: log.append("never"))
    w.submit_checkpoint(lambda: lambda: log.append("ckpt"), nbytes=8)
    w.flush([{"step": 3}], {"step": 3}, lambda rows, st: log.append(("flush", rows, st)))
    gate.set()
    assert w.drain(timeout=30)
    assert log == [
        "gate",
        ("flush", [{"step": 1, "a": 1, "b": 1}, {"step": 2, "a": 2}], {"step": 2}),  # merged, newest status
        "ckpt",
        ("flush", [{"step": 3}], {"step": 3}),  # not merged across the checkpoint queued before it
    ]
    assert w.close(timeout=30) and w.pending == 0


def test_writer_bounds_waiting_snapshots_and_records_errors() -> None:
    w = Writer(max_pending_bytes=100)
    gate = threading.Event()
    taken: list[str] = []
    w.submit_checkpoint(lambda: (taken.append("a"), lambda: gate.wait(30))[1], nbytes=80)
    second = threading.Thread(
        target=lambda: w.submit_checkpoint(lambda: (taken.append("b"), lambda: None)[1], 80)
    )
    second.start()
    second.join(0.3)
    assert taken == ["a"]  # 80 + 80 > 100: the second snapshot is not taken while the first waits
    gate.set()
    second.join(30)
    assert taken == ["a", "b"]

    def fail() -> None:
        raise OSError("disk full")

    w.submit(fail)
    w.submit(lambda: taken.append("after"))
    assert w.drain(timeout=30)
    assert w.errors() == ["OSError: disk full"] and w.errors() == [] and taken[-1] == "after"
    assert w.close(timeout=30)
    w.submit(
        lambda: taken.append("late")
    )  # a closed writer runs jobs in place: nothing waits on a dead thread
    assert taken[-1] == "late" and w.drain(timeout=1)
    sync = Writer(threaded=False)
    sync.submit(lambda: taken.append("now"))
    assert taken[-1] == "now" and sync.pending == 0


def test_a_failed_background_write_is_raised_on_the_training_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build("mlp", in_dim=4, width=4, depth=1, out_dim=3, seed=0)
    tr = Tracker(tmp_path / "run", model, data=_data(), schedule="linear", checkpoint_every=2)
    tr.step(0)
    tr.flush()

    def broken(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(tr.run, "save_checkpoint", broken)
    tr.step(1)
    tr.step(2)  # the checkpoint of step 2 fails in the writer
    with pytest.raises(RunError, match="background write failed: OSError: no space left on device"):
        tr.flush()
    monkeypatch.undo()
    tr.step(3)
    tr.step(4)
    tr.flush()  # written, nothing raised
    assert run_status(tmp_path / "run")["last_checkpoint"] == 4
    monkeypatch.setattr(tr.run, "save_checkpoint", broken)
    tr.step(5)
    with pytest.raises(RunError, match="no space left"):  # the last checkpoint (step 5) fails at close
        tr.close()
    status = run_status(tmp_path / "run")
    assert status["state"] == "failed" and "no space left" in status["error"]
    assert dynascope.open_run(tmp_path / "run").steps == [0, 4]


def test_background_and_foreground_writes_give_the_same_run(tmp_path: Path) -> None:
    x, y = _data(32)
    runs = {}
    for bg in (True, False):
        torch.manual_seed(0)
        model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        path = tmp_path / f"bg{bg}"
        kw = {"probes": {"lambda_max": 3}, "heartbeat_s": 0.0, "background_writes": bg, "budget": None}
        with dynascope.Tracker(path, model, data=(x, y), loss="cross_entropy", optimizer=opt, **kw) as tr:
            tr.step(0)
            for s in range(1, 11):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                tr.step(s, metrics={"train_loss": loss})
        runs[bg] = dynascope.open_run(path)
    a, b = runs[True], runs[False]
    assert a.steps == b.steps == [0, 1, 2, 3, 4, 6, 8, 9, 10]
    for s in a.steps:  # the snapshot is the weights at that step, not later ones
        for (ka, va), (kb, vb) in zip(a.model(s).state_dict().items(), b.model(s).state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
        ea = a.run.load_optimizer_state(s)["state"]
        eb = b.run.load_optimizer_state(s)["state"]
        assert all(torch.equal(ea[n]["exp_avg"], eb[n]["exp_avg"]) for n in ea)
    ma, mb = a.metrics, b.metrics
    assert ma["step"].tolist() == mb["step"].tolist() == list(range(11))
    assert ma["lambda_max"].tolist()[3::3] == pytest.approx(mb["lambda_max"].tolist()[3::3], rel=1e-12)
    assert len(a.cached("sharpness")) == len(b.cached("sharpness")) == 4
