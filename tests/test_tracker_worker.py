"""Inline probes off the training thread (dynascope/track_worker.py): the forked worker computes what the
training thread would on the same weights; the tracker delivers, counts planned vs done, says what cadence
it can keep, and the app shows it."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dynascope
from dynascope.models import Run, build
from dynascope.probes import hessian_eigenvalues, sharpness
from dynascope.runner import run_probe
from dynascope.track_worker import ALIGN, PROBE_NICE, ProbeWorker, compute_probe, pack, unpack, warm_start
from dynascope.tracker import run_status

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
LR = 0.1
EOS = {"k": 1, "tol": 1e-3, "trace": False, "lr": LR}  # the inline λ_max's key


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)


def _train(tr: dynascope.Tracker, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = _data()
    tr.step(0)
    for s in range(1, steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        tr.step(s, metrics={"train_loss": loss.item()})


def test_worker_result_equals_the_synchronous_probe_on_the_same_snapshot() -> None:
    """Two jobs (the second warm-started from the first) in the worker vs the same calls in this process,
    on the same weight snapshots: λ_max, the top-5 eigenvalues, the loss, to float32 rounding."""
    model = build("mlp", in_dim=4, width=16, depth=2, out_dim=3, seed=0)
    x, y = _data()
    fns = {"sharpness": sharpness, "hessian_eigenvalues": hessian_eigenvalues}
    worker = ProbeWorker(model, (x, y), fns, threads=1)
    kw_s = {"loss": "cross_entropy", "k": 1, "tol": 1e-3, "trace": False, "lr": LR}
    kw_h = {"loss": "cross_entropy", "k": 5, "tol": 1e-6}
    ref = build("mlp", in_dim=4, width=16, depth=2, out_dim=3, seed=0)
    previous: dict[str, object] = {}
    try:
        for step, scale in ((3, 1.0), (7, 1.3)):
            state = {k: (v * scale).clone() for k, v in model.state_dict().items()}
            worker.checkpoint(step, state)  # a bare worker (no files) keeps the weights for the probes
            specs = [("lm", "sharpness", kw_s, 40, {}), ("he", "hessian_eigenvalues", kw_h, 32, {})]
            worker.submit(step, specs)
            assert worker.busy() == step
            got_step, outcomes = worker.poll(math.inf)
            assert got_step == step and worker.busy() is None
            got = dict(outcomes)
            ref.load_state_dict(state)
            for name, fn, kw, n in (("lm", sharpness, kw_s, 40), ("he", hessian_eigenvalues, kw_h, 32)):
                kwargs = dict(kw, **({"v0": previous[name]} if name in previous else {}))
                sync = compute_probe(fn, ref, (x[:n], y[:n]), kwargs, device=torch.device("cpu"))
                assert got[name].error is None and sync.error is None
                previous[name] = warm_start(fn.__name__, sync.result)
                if name == "lm":
                    a, b = got[name].result.lambda_max, sync.result.lambda_max
                    assert a == pytest.approx(b, rel=1e-5)
                    assert got[name].result.loss_value == pytest.approx(sync.result.loss_value, rel=1e-5)
                    assert got[name].result.meta["params"]["warm_start"] == (step == 7)
                else:
                    assert torch.allclose(got[name].result.values, sync.result.values, rtol=1e-5, atol=1e-7)
    finally:
        worker.close()


def test_worker_and_inline_trackers_store_the_same_probes(tmp_path: Path) -> None:
    """The same training tracked twice, probes in the worker and on the training thread (``budget=None``:
    every due run happens): the same λ_max per step in metrics.csv and in the result store."""
    values = {}
    for mode in ("process", "inline"):
        torch.manual_seed(0)
        model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        path = tmp_path / mode
        with dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", optimizer=opt, schedule=[0],
                               probes={"lambda_max": 3, "gradient_coherence": 6}, budget=None,
                               probe_worker=mode, steps=12) as tr:  # fmt: skip
            assert tr.probe_worker == mode
            _train(tr, model, opt, 12)
        m = dynascope.open_run(path).metrics
        values[mode] = m.set_index("step")[["lambda_max", "coherence_alpha"]].dropna(how="all")
        status = run_status(path)
        assert status["probe_worker"] == mode
        lm = status["probes"]["lambda_max"]
        assert lm["planned"] == lm["done"] == 5 and lm["skipped"] == 0  # steps 0, 3, 6, 9, 12
        assert status["probes"]["gradient_coherence"]["done"] == 3
        extra = json.loads((path / "run.json").read_text())["extra"]["tracker"]
        assert extra["probes"]["lambda_max"]["done"] == 5 and extra["probe_worker"] == mode
        res, cached = run_probe(Run.open(path), "sharpness", step=9, params=EOS)  # the stored result
        assert cached and res.lambda_max == pytest.approx(float(values[mode].loc[9, "lambda_max"]), rel=1e-6)
    a, b = values["process"], values["inline"]
    assert list(a.index) == list(b.index) == [0, 3, 6, 9, 12]
    assert torch.allclose(torch.tensor(a.to_numpy()), torch.tensor(b.to_numpy()), rtol=1e-5, equal_nan=True)


def test_every_planned_run_is_done_or_skipped_with_its_reason(tmp_path: Path) -> None:
    """A probe due every step while the worker needs many steps per run: runs are skipped (the interval is
    kept, no backlog), each with its reason, and planned = done + skipped."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    path = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        probes = {"hessian_eigenvalues": {"every": 1, "tol": 1e-8}}
        tr = dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", optimizer=opt, schedule=[0],
                               probes=probes, budget=1e9)  # fmt: skip
        _train(tr, model, opt, 30)
        tr.close()
    p = tr.status_probes()["hessian_eigenvalues"]
    assert p["planned"] == 31 and p["done"] + p["skipped"] == 31 and p["done"] >= 1
    assert p["every"] == 1  # never stretched
    assert all("still computing step" in s["reason"] for s in tr.skipped)
    done_steps = sorted(dynascope.open_run(path).metrics.dropna(subset=["hessian_lambda_max"])["step"])
    assert len(done_steps) == p["done"]


def test_cadence_estimate_and_warning(tmp_path: Path) -> None:
    """The interval the worker can keep: requested · ⌈run seconds / (step seconds · requested)⌉, warned once
    from the second run with planned vs possible runs over ``steps``; inline under the budget:
    requested · 2^⌈log2(run seconds / (budget · step seconds · requested))⌉."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    tr = dynascope.Tracker(tmp_path / "run", model, data=_data(), loss="cross_entropy", schedule=[0],
                           probes={"lambda_max": 50}, steps=2000, probe_worker="inline")  # fmt: skip
    p = tr._probes[0]
    tr._budget.train, tr._timed_steps = 2.0, 1000  # 2 ms a step
    p.runs = 1
    tr._check_cadence(p, 0.025)  # 0.025 / (0.1 · 0.002 · 50) = 2.5 → ×4
    assert p.possible_every == 200 and p.cadence_note is None  # the first run is cold: no warning yet
    tr.probe_worker = "process"
    p.runs = 2
    with pytest.warns(UserWarning, match=r"every 50 steps was requested.*about every 100 steps \(planned 41 "
                      r"runs over 2000 steps, possible about 21\)"):  # fmt: skip
        tr._check_cadence(p, 0.15)  # 0.15 s = 75 steps → the next due multiple of 50: 100
    assert p.possible_every == 100 and "possible about 21" in p.cadence_note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr._check_cadence(p, 0.15)  # once
    tr.budget = None  # no budget: every due run happens, training waits
    tr._check_cadence(p, 0.15)
    assert p.possible_every == 50
    # the rest of the tracker takes 15 % of training time, over the 10 % budget: no room for probes
    tr.budget, p.cadence_note = 0.1, None
    tr._budget.own["write"] = 0.3
    with pytest.warns(UserWarning, match=r"already takes 15\.0% of training time, over the budget 0\.1"):
        tr._check_cadence(p, 0.15)
    assert p.possible_every is None
    # 5 % taken, a run costs the training thread 2 ms: 0.002 / (0.05 · 0.002) = 20 steps < the worker's 75
    tr._budget.own["write"], p.interval.cost = 0.1, 0.002
    tr._check_cadence(p, 0.15)
    assert p.possible_every == 100
    p.interval.cost = 0.02  # 200 steps of budget per run: the budget decides
    tr._check_cadence(p, 0.15)
    assert p.possible_every == 200
    tr.close()


def test_a_dead_worker_hands_probes_back_to_the_training_thread(tmp_path: Path) -> None:
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    tr = dynascope.Tracker(tmp_path / "run", model, data=(x, y), loss="cross_entropy", optimizer=opt,
                           schedule=[0], probes={"lambda_max": 2}, budget=None)  # fmt: skip
    tr.step(0)
    os.kill(tr._worker._proc.pid, signal.SIGKILL)
    tr._worker._proc.join(10)
    for s in range(1, 7):
        tr.step(s)
    tr.close()
    p = tr.status_probes()["lambda_max"]
    assert tr.probe_worker == "inline" and "stopped" in run_status(tmp_path / "run")["probe_worker_note"]
    # 2, 4, 6 ran on the training thread; step 0 was lost with the worker (skipped, with the reason) — unless
    # the worker had already sent it back when the kill came (a race this test does not control)
    lost = bool(tr.skipped)
    assert (p["planned"], p["done"], p["skipped"], p.get("error")) == (4, 4 - lost, int(lost), None)
    if lost:
        assert tr.skipped[0]["step"] == 0 and "worker" in tr.skipped[0]["reason"]
    run = dynascope.open_run(tmp_path / "run")
    steps = sorted(run.metrics.dropna(subset=["lambda_max"])["step"])
    assert steps == [2, 4, 6] if lost else [0, 2, 4, 6]
    # what the dead worker had not written was written by the training process: every checkpoint and row
    assert run.steps == [0, 2, 4, 6] and run.metrics["step"].tolist() == list(range(7))


def test_runs_page_shows_planned_vs_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    path = tmp_path / "runs" / "tracked"
    with dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", optimizer=opt, schedule=[0],
                           probes={"lambda_max": 2}, budget=None) as tr:  # fmt: skip
        _train(tr, model, opt, 6)
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("views/runs.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("planned vs done" in m.value for m in at.markdown)
    frame = next(d.value for d in at.dataframe if "planned" in d.value.columns)
    row = frame.set_index("probe").loc["lambda_max"]
    assert (row["planned"], row["done"], row["skipped"]) == (4, 4, 0)


def test_flush_while_the_worker_computes_writes_each_row_once(tmp_path: Path) -> None:
    """``flush()`` while the worker computes the step's probe waits for it: one complete row per step."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    path = tmp_path / "run"
    tr = dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", optimizer=opt, schedule=[0],
                           probes={"lambda_max": 5}, budget=None)  # fmt: skip
    _train(tr, model, opt, 5)
    assert tr._inflight is not None or tr._probes[0].runs == 2  # step 5's λ_max handed to the worker
    tr.flush()
    for s in range(6, 9):
        tr.step(s, metrics={"train_loss": 0.0})
    tr.close()
    m = dynascope.open_run(path).metrics
    assert m["step"].tolist() == list(range(9))  # each step once
    assert m.set_index("step")["lambda_max"].notna().tolist() == [s in (0, 5) for s in range(9)]


def test_pack_round_trips_nested_state_exactly() -> None:
    """The checkpoint hand-off: tensors of any dtype / layout copied into one aligned byte buffer and back."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    state = {
        "w": w.t(),  # not contiguous
        "b": torch.randn(3, generator=g, dtype=torch.float64),
        "n": torch.tensor(7),  # 0-d int64
        "mask": torch.rand(4, generator=g) > 0.5,
        "h": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    optimizer = {
        "format": "by-name",
        "state": {"w": {"momentum_buffer": torch.ones(3, 5)}},
        "groups": [{"lr": 0.1}],
    }
    skeleton, buf = pack((state, optimizer))
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    offsets = [v[1] for v in [*skeleton[0].values(), skeleton[1]["state"]["w"]["momentum_buffer"]]]
    assert all(o % ALIGN == 0 for o in offsets)
    w.mul_(2)  # the buffer holds a copy taken at pack time
    got_state, got_opt = unpack(
        skeleton, torch.frombuffer(bytearray(buf.numpy().tobytes()), dtype=torch.uint8)
    )
    for k, v in state.items():
        ref = (w / 2).t() if k == "w" else v
        assert (
            got_state[k].dtype == ref.dtype
            and got_state[k].shape == ref.shape
            and torch.equal(got_state[k], ref)
        )
    assert torch.equal(got_opt["state"]["w"]["momentum_buffer"], torch.ones(3, 5))
    assert got_opt["format"] == "by-name" and got_opt["groups"] == [{"lr": 0.1}]


def test_with_the_worker_the_training_process_runs_no_thread_of_the_tracker(tmp_path: Path) -> None:
    """The worker process writes the run (checkpoints, rows, status, results) and computes the probes at a
    lower priority (its probe thread only: with a budget, training never waits for it); the training
    process gains no thread."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    before = threading.active_count()
    path = tmp_path / "run"
    tr = dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", optimizer=opt, schedule="linear",
                           checkpoint_every=4, probes={"lambda_max": 4}, budget=1e9)  # fmt: skip
    assert tr.probe_worker == "process"
    _train(tr, model, opt, 6)
    assert threading.active_count() == before
    tr.flush()  # everything handed over is written now
    status = run_status(path)
    assert status["live"] and status["last_row"] == 6 and status["last_checkpoint"] == 4
    assert Run.open(path).steps() == [0, 4]
    if sys.platform.startswith("linux"):  # nice values per thread of the worker: one thread at PROBE_NICE
        nices = []
        for task in Path(f"/proc/{status['worker_pid']}/task").iterdir():
            nices.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        assert sorted(nices)[-1] == os.getpriority(os.PRIO_PROCESS, 0) + PROBE_NICE
        assert sorted(nices)[0] == os.getpriority(os.PRIO_PROCESS, 0)  # its writes keep their priority
    tr.close()
    assert threading.active_count() == before
    m = dynascope.open_run(path).metrics
    assert m["step"].tolist() == list(range(7))
    assert m["lambda_max"].notna().sum() == tr.status_probes()["lambda_max"]["done"] >= 1  # step 4: if free


def test_interference_charges_the_slowdown_of_steps_taken_while_the_worker_computed(tmp_path: Path) -> None:
    """Steps that ended after the worker finished count as idle; the busy ones are charged their excess over
    the mean idle step (the sum of either sign, never below 0), and a probe's cost carries a run's mean."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    tr = dynascope.Tracker(tmp_path / "run", model, data=_data(), loss="cross_entropy", schedule=[0],
                           probes={"lambda_max": 50})  # fmt: skip
    tr._idle_steps = [10 * 0.002, 10]  # idle steps of 2 ms
    # three steps of 3 ms while the worker computed (ending at 1.003, 1.006, 1.009), then one after it
    tr._worker_steps = [(1.003, 0.003), (1.006, 0.003), (1.009, 0.003), (1.012, 0.002)]
    tr._interference(done_at=1.0085)
    assert tr._budget.interference == pytest.approx(3 * 0.001, rel=1e-9)
    assert tr._idle_steps[1] == 11 and tr._idle_steps[0] == pytest.approx(0.022)
    tr._worker_steps = [(2.0, 0.001)]  # faster than idle: the total goes down, not below zero
    tr._interference(done_at=3.0)
    assert tr._budget.interference == pytest.approx(0.003 - 0.001, rel=1e-6)
    tr._worker_steps = [(3.0, 0.0)] * 3
    tr._interference(done_at=4.0)
    assert tr._budget.interference == 0.0 and tr._raw_interference < 0
    assert tr.overhead["worker_interference_seconds"] == 0.0
    tr.close()


def test_close_waits_for_the_worker_only_as_long_as_the_budget_has_room(tmp_path: Path) -> None:
    """With a budget and no room left, ``close()`` drops the probe the worker computes (recorded as skipped)
    and still leaves a complete run: every row, the checkpoints, no result stored for the dropped run; a
    probe's first run is always waited for."""
    model = build("mlp", in_dim=4, width=64, depth=3, out_dim=3, seed=0)
    path = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        probes = {"hessian_eigenvalues": {"every": 10, "k": 5, "tol": 1e-10}}
        tr = dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", schedule=[0], budget=1e-9,
                               probes=probes)  # fmt: skip
        tr.step(0)  # the first run always happens (it measures the cost)
        tr.flush()  # waits for it
        tr._budget.train = 1e9  # room for the run at step 10 ...
        for s in range(1, 11):
            tr.step(s)
        tr._budget.train = 0.0  # ... then none: close() at once does not wait for it
        tr.close()
    p = tr.status_probes()["hessian_eigenvalues"]
    dropped = [s for s in tr.skipped if "closed" in s["reason"]]
    assert p["planned"] == 2 and p["done"] >= 1 and p["done"] + p["skipped"] == 2
    assert len(dropped) == p["skipped"]
    run = dynascope.open_run(path)
    assert run.metrics["step"].tolist() == list(range(11)) and run.steps == [0, 10]
    assert len(run.cached("hessian_eigenvalues")) == p["done"]  # a dropped run stored nothing
    assert run_status(path)["state"] == "finished"


def test_a_write_that_fails_in_the_worker_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    """The worker process writes the run: its write errors come back and are raised by the tracker (once);
    the worker goes on with the next writes."""
    import shutil

    from dynascope.models import RunError

    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    path = tmp_path / "run"
    tr = dynascope.Tracker(path, model, data=_data(), loss="cross_entropy", optimizer=opt, schedule="linear",
                           checkpoint_every=2, probes={"lambda_max": 100}, budget=None)  # fmt: skip
    assert tr.probe_worker == "process"
    _train(tr, model, opt, 1)
    tr.flush()
    shutil.rmtree(path / "checkpoints")
    (path / "checkpoints").write_text("not a folder")  # the next checkpoint cannot be written
    tr.step(2)
    with pytest.raises(RunError, match="background write failed: checkpoint of step 2: FileExistsError"):
        tr.flush()
    (path / "checkpoints").unlink()
    (path / "checkpoints").mkdir()
    tr.step(3)
    tr.step(4)
    tr.close()  # written, nothing raised: the error was raised once
    status = run_status(path)
    assert status["state"] == "finished" and status["last_checkpoint"] == 4
