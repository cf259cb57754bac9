"""The runner: one checkpoint loop, one get-or-compute path, a cache key holding every ingredient."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import DATASET, MODEL, STEPS, make_run

import dynascope
from dynascope import probes, runner
from dynascope.models import CheckpointError, CheckpointFile, Run
from dynascope.store import ResultStore, result_key


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return make_run(tmp_path_factory.mktemp("runner") / "run")


@pytest.fixture()
def bare(run: Run, tmp_path: Path) -> Path:
    """The run's step-8 checkpoint copied out of the run folder (a bare checkpoint)."""
    path = tmp_path / "model.safetensors"
    shutil.copy(run.checkpoint_path(8), path)
    return path


def _key(target, probe: str = "hessian_trace", **kwargs) -> str:
    p = runner.plan(target, probe, **kwargs)
    return result_key(p.probe, p.checkpoint_hash, p.key)


# ------------------------------------------------------------------------------------------ stale cache
def test_bare_checkpoint_recomputes_for_another_dataset_config(bare: Path) -> None:
    """The repro: a different dataset config must not return the result cached for the first one."""
    params = {"n_matvecs": 6}
    full = CheckpointFile(bare, model_config=MODEL, dataset_config=DATASET)
    r1, cached1 = runner.run_probe(full, "hessian_trace", params=params)
    again, cached_again = runner.run_probe(full, "hessian_trace", params=params)
    assert (cached1, cached_again) == (False, True) and again.estimate == r1.estimate
    small = CheckpointFile(bare, model_config=MODEL, dataset_config={**DATASET, "n_train": 12})
    r2, cached2 = runner.run_probe(small, "hessian_trace", params=params)
    assert not cached2
    x, y = small.load_dataset().train
    assert len(x) == 12
    direct = probes.hessian_trace(small.load_model(), (x, y), n_matvecs=6, loss="auto")
    assert r2.estimate == pytest.approx(direct.estimate, rel=1e-6)
    assert r2.meta["n_samples"] == 12 and r1.meta["n_samples"] == DATASET["n_train"]
    assert len(ResultStore(bare.parent).list("hessian_trace")) == 2


def test_bad_model_config_gives_its_error_not_the_cached_value(bare: Path) -> None:
    good = CheckpointFile(bare, model_config=MODEL, dataset_config=DATASET)
    runner.run_probe(good, "hessian_trace", params={"n_matvecs": 6})
    wrong = CheckpointFile(bare, model_config={**MODEL, "width": 7}, dataset_config=DATASET)
    assert runner.cached_result(wrong, "hessian_trace", params={"n_matvecs": 6}) is None
    with pytest.raises(CheckpointError, match=r"shape mismatch.*checkpoint \[5\] vs model \[7\]"):
        runner.run_probe(wrong, "hessian_trace", params={"n_matvecs": 6})


def test_checkpoint_file_needs_its_configs(bare: Path) -> None:
    with pytest.raises(ValueError, match="needs a dataset config"):
        CheckpointFile(bare, model_config=MODEL)
    with pytest.raises(ValueError, match='needs a "name"'):
        CheckpointFile(bare, model_config={"width": 5}, dataset_config=DATASET)
    f = CheckpointFile(bare, dataset_config=DATASET)  # the model config from the file's metadata
    assert f.model_config_at()["width"] == MODEL["width"] and f.steps() == [8]
    with pytest.raises(ValueError, match="is step 8, not 4"):
        f.checkpoint(4)


# ------------------------------------------------------------------------------------------ the key
def test_key_changes_with_every_ingredient(run: Run, bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = CheckpointFile(bare, model_config=MODEL, dataset_config=DATASET)
    base = _key(target)
    changed = {
        "model spec": _key(CheckpointFile(bare, model_config={**MODEL, "seed": 1}, dataset_config=DATASET)),
        "data spec": _key(CheckpointFile(bare, model_config=MODEL, dataset_config={**DATASET, "seed": 1})),
        "max_samples": _key(target, max_samples=10),
        "split": _key(target, split="test"),
        "loss": _key(target, params={"loss": "mse"}),
        "params": _key(target, params={"n_matvecs": 61}),
        "dtype": _key(target, params={"dtype": torch.float64}),
        "device class": _key(target, device="cuda"),
        "checkpoint": _key(run, step=4),
    }
    monkeypatch.setitem(runner.PROBES, "hessian_trace",
                        dataclasses.replace(runner.PROBES["hessian_trace"], version=2))  # fmt: skip
    changed["version"] = _key(target)
    monkeypatch.undo()
    assert all(k != base for k in changed.values()), [n for n, k in changed.items() if k == base]
    assert len(set(changed.values())) == len(changed)
    # ... and stays equal when nothing that determines the number changes
    same = {
        "again": _key(target),
        "run folder, same checkpoint": _key(run, step=8),
        "defaults spelled out": _key(target, params={"n_matvecs": 60, "method": "auto", "seed": 0}),
        "loss spelled out": _key(target, params={"loss": "auto"}),
        "model defaults filled in": _key(
            CheckpointFile(bare, model_config={**MODEL, "activation": "relu"}, dataset_config=DATASET)
        ),
        "device index": _key(target, device="cpu"),
        "default dtype": _key(target, params={"dtype": torch.get_default_dtype()}),
    }
    # the run records loss="cross_entropy", the bare file "auto": only those differ
    assert same.pop("run folder, same checkpoint") == _key(
        CheckpointFile(bare, model_config=MODEL, dataset_config=DATASET, loss="cross_entropy")
    )
    assert all(k == base for k in same.values()), [n for n, k in same.items() if k != base]
    assert _key(target, device="cuda:0") == _key(target, device="cuda:1")


def test_stored_row_names_its_ingredients(run: Run, tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    runner.run_probe(run, "hessian_eigenvalues", step=4, params={"k": 2}, max_samples=16, store=store)
    (row,) = store.list("hessian_eigenvalues")
    assert row.step == 4 and row.checkpoint_hash == row.params["checkpoint_sha256"]
    assert row.params["k"] == 2 and row.params["loss"] == "cross_entropy" and row.params["max_samples"] == 16
    assert row.params["model_spec"]["width"] == MODEL["width"] and row.params["model_spec"]["activation"]
    assert row.params["data_spec"]["n_train"] == DATASET["n_train"] and row.params["split"] == "train"
    assert row.params["compute_dtype"] == "torch.float32" and row.params["device_class"] == "cpu"
    assert row.params["probe_version"] == 1


def test_unknown_or_reserved_params_are_refused(run: Run) -> None:
    with pytest.raises(ValueError, match="has no parameter"):
        runner.plan(run, "hessian_trace", params={"bogus": 1})
    with pytest.raises(ValueError, match="set by the runner"):
        runner.plan(run, "hessian_trace", params={"device": "cpu"})
    with pytest.raises(ValueError, match="takes steps="):
        runner.plan(run, "ntk_trajectory", step=0)
    with pytest.raises(ValueError, match="other="):
        runner.plan(run, "lmc_barrier", step=0)
    with pytest.raises(ValueError, match="no optimizer state"):
        runner.plan(run, "sharpness", step=0, params={"optimizer_state": True})


# ------------------------------------------------------------------------------------------ the loop
def test_sweep_calls_progress_once_per_checkpoint(run: Run, tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    calls: list[tuple] = []

    def progress(i, n, step, cached, seconds):
        assert seconds >= 0
        calls.append((i, n, step, cached))

    rows = runner.sweep(run, "hessian_trace", params={"n_matvecs": 4}, store=store, progress=progress)
    assert [(s, c) for s, _, c in rows] == [(s, False) for s in STEPS]
    assert calls == [(i + 1, 3, s, False) for i, s in enumerate(STEPS)]
    calls.clear()
    rows = runner.sweep(run, "hessian_trace", [8, 0], params={"n_matvecs": 4}, store=store, progress=progress)
    assert calls == [(1, 2, 8, True), (2, 2, 0, True)] and [s for s, _, _ in rows] == [8, 0]


def test_notebook_cli_and_runner_share_multi_checkpoint_results(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynascope.cli import main

    view = dynascope.open_run(run.path)
    traj = view.probe("ntk_trajectory", steps=[0, 4, 8], max_samples=12)
    assert list(traj.steps) == [0, 4, 8] and traj.kernel_distance[0] == pytest.approx(0.0, abs=1e-9)
    hit = runner.cached_result(run, "ntk_trajectory", steps=[0, 4, 8], max_samples=12,
                               params={"reduce_outputs": "trace", "centered": True})  # fmt: skip
    assert hit is not None and list(hit.label_alignment) == pytest.approx(list(traj.label_alignment))
    assert runner.cached_result(run, "ntk_trajectory", steps=[0, 8], max_samples=12) is None
    assert main(["probe", "ntk_trajectory", str(run.path), "--steps", "0,4,8", "--max-samples", "12"]) == 0
    assert "ntk_trajectory steps 0,4,8 (cached)" in capsys.readouterr().out
    (row,) = view.store.list("ntk_trajectory")
    assert row.step is None and len(row.params["checkpoint_sha256"]) == 3

    lmc = view.probe("lmc_barrier", step=0, other=(view, 8), n_points=3)
    argv = ["probe", "lmc_barrier", str(run.path), "--step", "0", "--other", str(run.path),
            "--param", "n_points=3", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["cached"] is True
        and out["steps"] == [0, 8]
        and out["result"]["losses"] == pytest.approx(list(lmc.losses))
    )
    code = main(["probe", "lmc_barrier", str(run.path), "--step", "0"])
    assert code == 2 and "--other" in capsys.readouterr().err
