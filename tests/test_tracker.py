"""dynascope.Tracker in a plain PyTorch loop: the run folder, the checkpoint schedule, inline probes stored
under the runner's keys (so the notebook and app reuse them), the overhead budget, the status file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import dynascope
from dynascope.models import Run, build, checkpoint_due
from dynascope.probes import hessian_eigenvalues
from dynascope.runner import run_probe
from dynascope.tracker import STATUS_FILE, describe_status, run_status

HERE = Path(__file__).resolve().parent
LR = 0.1
EOS = {"k": 1, "tol": 1e-3, "trace": False, "lr": LR}  # the parameters of the inline λ_max


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(tracker: dynascope.Tracker, model: torch.nn.Module, opt, steps: int, data) -> None:
    x, y = data
    tracker.step(0)
    for s in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        tracker.step(s, metrics={"train_loss": loss})


def test_checkpoint_due_schedules() -> None:
    assert [s for s in range(130) if checkpoint_due(s)] == [0, 1, 2, 4, 8, 16, 32, 64, 100, 128]
    assert [s for s in range(10) if checkpoint_due(s, "log")] == [0, 1, 2, 4, 8]
    assert [s for s in range(25) if checkpoint_due(s, "linear", every=10)] == [0, 10, 20]
    assert [s for s in range(10) if checkpoint_due(s, 3)] == [0, 3, 6, 9]
    assert [s for s in range(10) if checkpoint_due(s, [2, 7])] == [2, 7]
    with pytest.raises(ValueError, match="checkpoint schedule"):
        checkpoint_due(1, "sqrt")
    with pytest.raises(ValueError, match="every"):
        checkpoint_due(1, every=0)


def test_plain_loop_run_folder_and_inline_probes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = _data()
    path = tmp_path / "run"
    probes = {"lambda_max": 6, "gradient_coherence": 12}
    with dynascope.Tracker(path, model, data=data, loss="cross_entropy", optimizer=opt, checkpoint_every=10,
                           probes=probes, budget=None) as tr:  # fmt: skip
        _train(tr, model, opt, 20, data)
        status = run_status(path)
        assert status["live"] and describe_status(status).startswith("still being written")
    run = dynascope.open_run(path)
    # schedule "log+linear" (every 10) ∪ probe steps (every 6, 12) ∪ the last step
    assert run.steps == [0, 1, 2, 4, 6, 8, 10, 12, 16, 18, 20]
    assert run.checkpoints["lr"].tolist() == [LR] * len(run.steps)
    assert all(run.run.checkpoint(s).optimizer_path is not None for s in run.steps)
    m = run.metrics
    assert m["step"].tolist() == list(range(21))
    assert m["lambda_max"].notna().sum() == 4 and m["grad_norm"].notna().sum() == 2
    status = run_status(path)
    assert status["state"] == "finished" and not status["live"]
    assert status["probes"]["lambda_max"]["runs"] == 4 and status["skipped"] == []
    # the run re-opens: spec, data (the saved probe batch) and weights
    assert run.run.config["extra"]["tracker"]["model_spec"]["reopenable"] is True
    x, y = run.dataset().train
    assert torch.equal(x, data[0]) and torch.equal(y, data[1])
    for s in (6, 18):
        inline = m.loc[m["step"] == s, "lambda_max"].item()
        # the runner finds the inline result under its own key: nothing is recomputed
        res, cached = run_probe(run.run, "sharpness", step=s, params=EOS, store=run.store)
        assert cached and res.lambda_max == pytest.approx(inline, rel=1e-12)
        # and it is the top Hessian eigenvalue of the saved checkpoint, to solver tolerance
        ref = hessian_eigenvalues(run.model(s), (x, y), k=1, loss="cross_entropy", tol=1e-6).values[0]
        assert inline == pytest.approx(float(ref), rel=1e-4)
    _, cached = run_probe(run.run, "gradient_coherence", step=12, store=run.store)
    assert cached
    assert len(run.cached("sharpness")) == 4
    # cached sharpness results come back (and convert again) without their eigenvector tensor
    assert run.results["probe"].value_counts().to_dict() == {"sharpness": 4, "gradient_coherence": 2}


def test_spec_data_probe_batch_is_the_runner_max_samples(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    x, y = _data(48)
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tr = dynascope.Tracker(tmp_path / "run", model, data={"file": str(tmp_path / "d.safetensors")},
                           loss="cross_entropy", optimizer=opt, probe_samples=16, probes={"lambda_max": 4},
                           budget=None)  # fmt: skip
    _train(tr, model, opt, 4, (x, y))
    tr.close()
    run = Run.open(tmp_path / "run")
    assert run.dataset_config["file"] == str((tmp_path / "d.safetensors").resolve())
    res, cached = run_probe(run, "sharpness", step=4, params=EOS, max_samples=16)
    assert cached
    _, cached_all = run_probe(run, "sharpness", step=4, params=EOS, write=False)
    assert not cached_all  # the whole training set is another key


def test_budget_skips_and_stretches(tmp_path: Path) -> None:
    """Probes on the training thread: a deferred run doubles the interval."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tr = dynascope.Tracker(tmp_path / "run", model, data=_data(), loss="cross_entropy", optimizer=opt,
                           probes={"lambda_max": 2}, budget=1e-9, schedule=[0],
                           probe_worker="inline")  # fmt: skip
    _train(tr, model, opt, 12, _data())
    tr.close()
    skipped = tr.skipped
    assert [s["step"] for s in skipped] == [2, 4, 8]  # every 2 → 4 → 8 → 16: the first run (step 0) only
    assert [s["every"] for s in skipped] == [4, 8, 16]
    assert "training time" in skipped[0]["reason"]
    status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert status["skipped"] == skipped and status["probes"]["lambda_max"]["runs"] == 1
    assert status["overhead"]["probe_seconds"] > 0 and status["overhead"]["train_seconds"] > 0
    assert Run.open(tmp_path / "run").steps() == [0, 12]


def test_model_specs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("tracked_models", HERE / "own" / "tracked_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import sys

    sys.modules["tracked_models"] = mod
    try:
        net = mod.SmallNet()
        tr = dynascope.Tracker(tmp_path / "a", net, data=_data(), loss="cross_entropy")
        tr.step(0)
        tr.close()
        run = Run.open(tmp_path / "a")
        assert run.model_config["factory"] == f"{HERE / 'own' / 'tracked_models.py'}:SmallNet"
        torch.testing.assert_close(run.load_model(0)(_data()[0]), net(_data()[0]))
        with pytest.warns(UserWarning, match="can only be re-opened with a spec"):
            tr = dynascope.Tracker(tmp_path / "b", mod.NeedsArgs(5), data=_data(), loss="cross_entropy")
        tr.close()
        info = Run.open(tmp_path / "b").extra["tracker"]["model_spec"]
        assert info["reopenable"] is False and "NeedsArgs" in info["note"]
        given = {"factory": f"{HERE / 'own' / 'tracked_models.py'}:NeedsArgs", "kwargs": {"width": 5}}
        tr = dynascope.Tracker(tmp_path / "c", mod.NeedsArgs(5), data=_data(), model_spec=given)
        tr.close()
        assert Run.open(tmp_path / "c").extra["tracker"]["model_spec"]["reopenable"] is True
    finally:
        sys.modules.pop("tracked_models", None)

    class Local(torch.nn.Linear):
        pass

    # a class no reader can import travels as an exported program (tests/test_tracker_export.py) ...
    dynascope.Tracker(tmp_path / "d", Local(4, 3), data=_data()).close()
    assert "exported" in Run.open(tmp_path / "d").model_config

    class Branchy(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if x.sum() > 0 else -super().forward(x)

    # ... unless torch.export cannot trace it: then the tracker asks for a spec
    with pytest.warns(UserWarning, match="cannot travel as an exported program"):
        with pytest.raises(ValueError, match="model_spec="):
            dynascope.Tracker(tmp_path / "d2", Branchy(4, 3), data=_data())
    with pytest.raises(ValueError, match="lambda_max"):
        dynascope.Tracker(tmp_path / "e", build("mlp", in_dim=4, width=8, depth=2, out_dim=3), data=_data(),
                          probes={"lmax": 5})  # fmt: skip


def test_only_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dynascope.tracker as tracker_mod

    monkeypatch.setattr(tracker_mod, "_is_writer", lambda: False)
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tr = dynascope.Tracker(tmp_path / "run", model, data=_data(), optimizer=opt, probes={"lambda_max": 1})
    _train(tr, model, opt, 3, _data())
    tr.close()
    assert not (tmp_path / "run").exists()


def test_cli_runs_shows_a_run_being_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dynascope.cli import main

    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    tr = dynascope.Tracker(tmp_path / "run", model, data=_data())
    tr.step(0)
    tr.flush()
    assert main(["runs", str(tmp_path)]) == 0
    assert "still being written (step 0" in capsys.readouterr().out
    tr.close()
    assert main(["runs", str(tmp_path)]) == 0
    assert "[finished at step 0]" in capsys.readouterr().out


def test_hessian_and_ntk_inline_probes_are_runner_cache_hits(tmp_path: Path) -> None:
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    probes = {"hessian_eigenvalues": {"every": 5, "k": 2}, "ntk": 10}
    with dynascope.Tracker(tmp_path / "run", model, data=_data(), loss="cross_entropy", optimizer=opt,
                           probes=probes, ntk_samples=16, budget=None, schedule=[0]) as tr:  # fmt: skip
        _train(tr, model, opt, 10, _data())
    run = dynascope.open_run(tmp_path / "run")
    assert run.steps == [0, 5, 10]
    for s in (5, 10):
        res, cached = run_probe(run.run, "hessian_eigenvalues", step=s, params={"k": 2}, store=run.store)
        assert cached and len(res.values) == 2
        assert run.metrics.loc[run.metrics["step"] == s, "hessian_lambda_max"].item() == res.values[0]
    _, cached = run_probe(run.run, "ntk", step=10, max_samples=16, store=run.store)
    assert cached
    assert run.metrics["ntk_alignment"].notna().sum() == 2


def test_a_failing_inline_probe_is_switched_off_not_raised(tmp_path: Path) -> None:
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.warns(UserWarning, match="inline probe 'ntk' failed at step 0 and is switched off"):
        with dynascope.Tracker(tmp_path / "run", model, data=_data(), optimizer=opt, probes={"ntk": 2},
                               ntk_samples=2, budget=None) as tr:  # fmt: skip
            _train(tr, model, opt, 4, _data())
    status = run_status(tmp_path / "run")
    assert status["state"] == "finished" and status["probes"]["ntk"]["runs"] == 0
    assert "exceeds the kernel size" in status["probes"]["ntk"]["error"]


def test_inline_sharpness_with_the_runner_defaults_serves_a_plain_probe_call(tmp_path: Path) -> None:
    """``probes={"sharpness": {..., the runner's defaults}}``: ``open_run(...).probe("sharpness",
    step=s)`` with no parameters is a cache hit — both take η from the run (the optimizer's lr, the
    run's schedule)."""
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    defaults = {"every": 4, "tol": 1e-4, "trace": True}
    with dynascope.Tracker(tmp_path / "run", model, data=_data(), loss="cross_entropy", optimizer=opt,
                           probes={"sharpness": defaults}, budget=None, schedule=[0]) as tr:  # fmt: skip
        _train(tr, model, opt, 8, _data())
    run = dynascope.open_run(tmp_path / "run")
    for s in (4, 8):
        _, cached = run_probe(run.run, "sharpness", step=s, store=run.store)
        assert cached
        before = len(run.results)
        res = run.probe("sharpness", step=s)
        assert len(run.results) == before and res.trace is not None and res.lr == pytest.approx(LR)
