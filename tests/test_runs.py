"""Run folders (create/open, checkpoints, optimizer state, metrics) and learning-rate schedules."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from dynascope.models import (
    Run,
    RunError,
    build,
    load_checkpoint,
    lr_at,
    model_config,
    torch_scheduler,
    validate_schedule,
)
from dynascope.models.tiny import TINY_CONFIGS, build_tiny, example_input

DATASET = {"name": "xor", "n_train": 16, "n_test": 8, "seed": 0}
MLP = {"name": "mlp", "in_dim": 2, "width": 6, "depth": 1, "out_dim": 2}


def tmp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


def make_run(path: Path, **kw) -> Run:
    kw.setdefault("model", MLP)
    kw.setdefault("dataset", DATASET)
    kw.setdefault("optimizer", {"name": "sgd", "lr": 0.1, "weight_decay": 0.0})
    return Run.create(path, **kw)


# ----------------------------------------------------------------------------------------- schedules
def test_lr_schedules_closed_forms():
    assert lr_at({"type": "constant", "lr": 0.3}, 1000) == 0.3
    assert lr_at({"type": "constant"}, 5, base_lr=0.2) == 0.2
    step = {"type": "step", "lr": 1.0, "gamma": 0.5, "step_size": 10}
    assert [lr_at(step, s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    ms = {"type": "step", "lr": 1.0, "gamma": 0.1, "milestones": [3, 5]}
    assert [lr_at(ms, s) for s in (2, 3, 4, 5, 99)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])
    cos = {"type": "cosine", "lr": 1.0, "total_steps": 100, "min_lr": 0.1}
    assert (
        lr_at(cos, 0) == 1.0
        and lr_at(cos, 100) == pytest.approx(0.1)
        and lr_at(cos, 500) == pytest.approx(0.1)
    )
    assert lr_at(cos, 50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cos, 25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    wc = {"type": "warmup_cosine", "lr": 2.0, "warmup_steps": 4, "total_steps": 14}
    assert [lr_at(wc, s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr_at(wc, 4) == 2.0 and lr_at(wc, 9) == pytest.approx(1.0) and lr_at(wc, 14) == pytest.approx(0.0)
    lst = {"type": "list", "values": [0.1, 0.2, 0.3]}
    assert [lr_at(lst, s) for s in (0, 1, 2, 50)] == [0.1, 0.2, 0.3, 0.3]
    pw = {"type": "list", "steps": [0, 10, 20], "values": [1.0, 0.5, 0.25]}
    assert [lr_at(pw, s) for s in (0, 9, 10, 19, 20, 1000)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    "sched,fragment",
    [
        ({"type": "exp"}, "type must be one of"),
        ({"type": "constant"}, "needs 'lr'"),
        ({"type": "step", "lr": 1.0, "gamma": 0.5}, "needs 'step_size'"),
        ({"type": "cosine", "lr": 1.0, "total_steps": 0}, "must be > 0"),
        ({"type": "warmup_cosine", "lr": 1.0, "warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
        ({"type": "list", "values": []}, "non-empty"),
        ({"type": "list", "steps": [1, 2], "values": [1.0, 2.0]}, "start at 0"),
        ({"type": "constant", "lr": float("nan")}, "finite"),
    ],
)
def test_bad_schedules(sched, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_schedule(sched)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        lr_at({"type": "constant", "lr": 1.0}, -1)


def test_torch_scheduler_follows_lr_at():
    sched = {"type": "warmup_cosine", "lr": 0.4, "warmup_steps": 3, "total_steps": 10, "min_lr": 0.01}
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.4)
    s = torch_scheduler(sched, opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert seen == pytest.approx([lr_at(sched, i) for i in range(12)], rel=1e-12)


# ----------------------------------------------------------------------------------------- run folders
def test_run_round_trip(tmp_path):
    path = tmp_path / "run"
    sched = {"type": "cosine", "total_steps": 100}
    run = make_run(path, lr_schedule=sched, seed=3, notes="hello")
    assert sorted(os.listdir(path)) == ["checkpoints", "run.json"]
    cfg = json.loads((path / "run.json").read_text())
    assert cfg["schema"] == "dynascope.run" and cfg["schema_version"] == 1 and cfg["seed"] == 3
    assert (
        cfg["model"] == model_config(build(**MLP))
        and cfg["dataset"] == DATASET
        and cfg["notes"] == "hello"
        and cfg["created"]
    )
    assert cfg["optimizer"] == {"name": "sgd", "lr": 0.1, "weight_decay": 0.0}

    models = {}
    for step in (0, 10, 5):
        model = build(**MLP, seed=step)
        models[step] = model
        info = run.save_checkpoint(
            model, step, epoch=step // 5, metrics={"train_loss": torch.tensor(1.5 - step / 10)}
        )
        assert info.path.name == f"step_{step:06d}.safetensors"

    again = Run.open(path)
    assert (
        again.model_config == model_config(build(**MLP))
        and again.dataset_config == DATASET
        and again.seed == 3
    )
    cks = again.checkpoints()
    assert [c.step for c in cks] == [0, 5, 10] and [c.epoch for c in cks] == [0, 1, 2]
    assert (
        cks[1].metrics == {"train_loss": pytest.approx(1.0)}
        and cks[1].metadata["model_config"] == again.model_config
    )
    x = example_input({"name": "mlp", "in_dim": 2}, n=7)
    for step, model in models.items():
        loaded = again.load_model(step)
        assert torch.equal(loaded(x), model(x))
    last = again.load_model()
    assert torch.equal(last(x), models[10](x))
    assert model_config(again.build_model()) == model_config(build(**MLP))
    assert again.lr_at(0) == pytest.approx(0.1) and again.lr_at(50) == pytest.approx(0.05)
    assert tmp_files(tmp_path) == []
    ck = load_checkpoint(cks[2].path)  # run checkpoints are plain safetensors files
    assert ck.format == "safetensors" and ck.step == 10


def test_run_from_built_model_and_constant_lr(tmp_path):
    model = build_tiny("cnn")
    run = Run.create(
        tmp_path / "r", model=model, dataset={"name": "digits"}, optimizer={"name": "adam", "lr": 1e-3}
    )
    assert run.model_config == model_config(model) and run.lr_schedule is None
    assert run.lr_at(12345) == 1e-3
    run.save_checkpoint(model, 1)
    x = example_input(TINY_CONFIGS["cnn"])
    assert torch.equal(run.load_model(1)(x), model(x))
    with pytest.raises(RunError, match="does not match the run's"):
        run.save_checkpoint(build_tiny("mlp"), 2)


def test_optimizer_state_round_trip_resumes_identically(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(12, 2), torch.randint(0, 2, (12,))
    model = build(**MLP)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)

    def train_step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        train_step(model, opt)
    run = make_run(tmp_path / "r", optimizer=opt)
    assert run.optimizer_config["name"] == "adamw" and run.optimizer_config["lr"] == 0.01
    run.save_checkpoint(model, 3, optimizer=opt)
    info = run.checkpoint(3)
    assert info.optimizer_path is not None and info.optimizer_path.name == "step_000003.optim.pt"
    # The file is plain: weights_only loading works and state is keyed by parameter name.
    raw = torch.load(info.optimizer_path, weights_only=True)
    assert set(raw["state"]) == {n for n, _ in model.named_parameters()}
    assert raw["state"]["head.weight"]["exp_avg_sq"].shape == model.head.weight.shape
    # Resume: a fresh model + optimizer restored from the run take the same next step.
    model2 = run.load_model(3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    named = run.load_optimizer_state(3, opt2, model2)
    assert torch.equal(named["state"]["body.0.weight"]["exp_avg"], opt.state[model.body[0].weight]["exp_avg"])
    assert opt2.param_groups[0]["lr"] == 0.01
    train_step(model, opt)
    train_step(model2, opt2)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(RunError, match="no optimizer state at step 7"):
        run.load_optimizer_state(7)


def test_metrics_append_and_new_columns(tmp_path):
    run = make_run(tmp_path / "r")
    assert list(run.metrics().columns) == ["step"] and len(run.metrics()) == 0
    run.log_metrics({"step": 0, "train_loss": 2.0, "lr": 0.1})
    run.log_metrics(
        [{"step": 1, "train_loss": 1.5, "lr": 0.1}, {"step": 2, "train_loss": float("nan"), "lr": 0.1}]
    )
    run.log_metrics({"step": 3, "test_acc": torch.tensor(0.75), "train_loss": 1.0, "sharpness": 12.5})
    run.log_metrics({"step": 4, "train_loss": 0.1 + 0.2})  # exact float round trip
    df = run.metrics()
    assert list(df.columns) == ["step", "train_loss", "test_acc", "lr", "sharpness"]
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    assert math.isnan(df["train_loss"][2]) and df["train_loss"][4] == 0.1 + 0.2
    assert df["test_acc"].isna().tolist() == [True, True, True, False, True] and df["test_acc"][3] == 0.75
    assert isinstance(df, pd.DataFrame) and tmp_files(tmp_path) == []
    with pytest.raises(ValueError, match="needs a 'step'"):
        run.log_metrics({"train_loss": 1.0})
    with pytest.raises(ValueError, match="must be a scalar"):
        run.log_metrics({"step": 5, "w": torch.ones(3)})
    assert len(run.metrics()) == 5


def test_metrics_tolerate_a_torn_last_line(tmp_path):
    run = make_run(tmp_path / "r")
    run.log_metrics([{"step": i, "train_loss": 1.0 / (i + 1)} for i in range(3)])
    with open(run.metrics_path, "a") as f:
        f.write("3,0.2,extra,fields,here")  # a crash mid-append by a foreign writer
    assert run.metrics()["step"].tolist() == [0, 1, 2]


def test_create_refuses_to_clobber(tmp_path):
    path = tmp_path / "r"
    run = make_run(path)
    run.save_checkpoint(build(**MLP), 1)
    run.log_metrics({"step": 1, "train_loss": 0.5})
    with pytest.raises(RunError, match="already holds a run"):
        make_run(path)
    (path / "mine.txt").write_text("user file")
    run2 = make_run(path, overwrite=True, notes="second")
    assert run2.checkpoints() == [] and len(run2.metrics()) == 0 and Run.open(path).notes == "second"
    assert (path / "mine.txt").read_text() == "user file"
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(RunError, match="not a run folder; refusing"):
        make_run(other, overwrite=True)


def test_open_errors(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        Run.open(tmp_path / "missing")
    with pytest.raises(RunError, match="no run.json"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON") as e:
        Run.open(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "run.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(RunError, match="not a dynascope run"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"schema": "dynascope.run", "schema_version": 99}))
    with pytest.raises(RunError, match="schema_version 99"):
        Run.open(tmp_path)


def test_create_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="model config must be a dict with a string 'name'"):
        Run.create(tmp_path / "a", model={"width": 3}, dataset=DATASET)
    with pytest.raises(ValueError, match="dataset config"):
        Run.create(tmp_path / "a", model=MLP, dataset="xor")
    with pytest.raises(RunError, match="invalid lr_schedule"):
        Run.create(tmp_path / "a", model=MLP, dataset=DATASET, lr_schedule={"type": "cosine"})
    run = make_run(tmp_path / "b", optimizer=None)
    with pytest.raises(RunError, match="neither an lr_schedule nor an optimizer lr"):
        run.lr_at(0)
    with pytest.raises(RunError, match="has no checkpoints"):
        run.load_model()
    run.save_checkpoint(build(**MLP), 2)
    with pytest.raises(RunError, match=r"no checkpoint at step 3; steps: \[2\]"):
        run.load_model(3)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        run.save_checkpoint(build(**MLP), -1)


def test_load_dataset_uses_datasets_registry(tmp_path):
    run = make_run(tmp_path / "r")
    data = run.load_dataset()
    x, y = data.train
    assert x.shape == (16, 2) and y.shape == (16,)
    assert build(**MLP)(x).shape == (16, 2)


def _log_rows(path: str, worker: int, n: int) -> None:
    run = Run.open(path)
    for i in range(n):
        row = {"step": worker * 1000 + i, "train_loss": float(i)}
        if worker == 1 and i >= n // 2:
            row[f"extra_{i % 3}"] = 1.0  # forces atomic header-widening rewrites mid-stream
        run.log_metrics(row)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_concurrent_metric_writers_lose_no_rows(tmp_path):
    run = make_run(tmp_path / "r")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_log_rows, args=(str(run.path), w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    df = run.metrics()
    assert sorted(df["step"].tolist()) == sorted(w * 1000 + i for w in range(3) for i in range(25))
    assert {"extra_0", "extra_1", "extra_2"} <= set(df.columns) and tmp_files(tmp_path) == []


# ----------------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("sweep", [False, True])
def test_checkpoint_architecture_differing_from_run_json_warns_and_is_recorded(tmp_path, sweep):
    import warnings

    from dynascope import probes
    from dynascope.models import save_checkpoint

    run = make_run(tmp_path / "r", extra={"sweep_variable": "width"} if sweep else None)
    run.save_checkpoint(run.build_model(), 0)
    wider = build("mlp", in_dim=2, width=9, depth=1, out_dim=2)  # not what run.json says
    save_checkpoint(wider, run.checkpoint_path(5), metadata={"step": 5, "model_config": model_config(wider)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = run.load_model(0)  # run.json's architecture: silent
    assert same.dynascope_config_source == "run.json"
    if sweep:  # a sweep run's checkpoints differ by design
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = run.load_model(5)
    else:
        with pytest.warns(UserWarning, match=r"step 5 holds a different architecture than run.json") as rec:
            model = run.load_model(5)
        assert "'width': 9" in str(rec[0].message) and "'width': 6" in str(rec[0].message)
    assert model.dynascope_config_source == "checkpoint" and model_config(model)["width"] == 9
    x, y = run.load_dataset().train
    r = probes.hessian_trace(model, (x, y), n_matvecs=6)
    assert r.meta["model_config_source"] == "checkpoint" and r.meta["model_config"]["width"] == 9


def test_run_index_reads_each_header_once_and_follows_the_folder(tmp_path, monkeypatch):
    """Lookups of every step (``Run.checkpoint``, the runner's cache key) read each safetensors header once
    per process (a count, not a time); an added, rewritten, removed or same-tick file is seen."""
    from dynascope import runner
    from dynascope.models import run_index

    reads: list[str] = []
    real = run_index.read_safetensors_metadata
    counted = lambda p: reads.append(Path(p).name) or real(p)  # noqa: E731
    monkeypatch.setattr(run_index, "read_safetensors_metadata", counted)
    run = make_run(tmp_path / "r")
    model = run.build_model()
    n = 30
    for step in range(n):
        run.save_checkpoint(model, step)
    run_index.clear_run_indexes()
    for _ in range(2):  # a sweep over all steps, twice, through a fresh Run each time
        again = Run.open(run.path)
        for step in again.steps():
            assert again.checkpoint(step).step == step
            runner.plan(again, "hessian_trace", step=step)  # the cache key: checkpoint + model_config_at
    assert len(reads) == n and len(set(reads)) == n  # ≤ 2 per checkpoint is the target; one is what it takes
    run.save_checkpoint(model, n, metrics={"train_loss": 1.0})  # added
    run.save_checkpoint(model, 3, metrics={"train_loss": 2.0})  # rewritten (atomic replace)
    assert again.steps() == list(range(n + 1)) and again.checkpoint(3).metrics == {"train_loss": 2.0}
    assert sorted(reads[n:]) == ["step_000003.safetensors", f"step_{n:06d}.safetensors"]
    run.checkpoint_path(5).unlink()  # removed
    assert 5 not in again.steps()
    with pytest.raises(RunError, match="no checkpoint at step 5"):
        again.checkpoint(5)
    # a coarse file-system clock: a file added within the folder's mtime tick leaves the stamp unchanged
    folder = run.checkpoint_dir
    before = os.stat(folder).st_mtime_ns
    run.save_checkpoint(model, n + 1)
    os.utime(folder, ns=(before, before))
    assert again.checkpoint(n + 1).step == n + 1 and n + 1 in again.steps()
    assert len(reads) == n + 3
