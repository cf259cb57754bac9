"""The app's defaults are right for the run: probes use the data the run was trained on (the whole
split up to a budget, else a class-stratified subset), and page settings do not carry over between runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_app import _app, _select, _texts, make_tiny_run

from dynascope.models import Run, build
from dynascope.runner import plan, probe_data, stratified_indices
from dynascope.store import ResultStore

WIDE = {"name": "gaussian_mixture", "n_classes": 50, "dim": 2, "n_train": 2100, "n_test": 100, "seed": 0}


def _wide_run(path: Path) -> Run:
    """50 classes, 2100 training samples (over the app's 2048-sample budget); untrained checkpoints."""
    model = build(name="mlp", in_dim=2, width=8, depth=1, out_dim=50, seed=0)
    run = Run.create(path, model=model, dataset=WIDE, loss="cross_entropy", seed=0)
    for step in (0, 1):
        run.save_checkpoint(model, step)
    return run


def test_stratified_indices_keep_every_class_in_file_order() -> None:
    y = torch.tensor([0] * 10 + [1] * 3 + [2] + [0] * 5)
    idx = stratified_indices(y, 6)
    assert idx.tolist() == [0, 1, 2, 3, 10, 13]  # every class, then proportional; file order kept
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 97, (2822,), generator=g)
    idx = stratified_indices(labels, 2048)
    assert len(idx) == 2048 and bool((idx.diff() > 0).all())
    assert set(labels[idx].tolist()) == set(labels.tolist())  # every class present
    counts = torch.bincount(labels[idx], minlength=97).float()
    full = torch.bincount(labels, minlength=97).float() * 2048 / 2822
    assert float((counts - full).abs().max()) <= 2.0  # proportions kept up to rounding
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 2, 2, 1, 0, 0]), 3).float()
    assert stratified_indices(onehot, 3).tolist() == [0, 3, 4]
    assert stratified_indices(torch.randn(10, 1), 4).tolist() == [0, 3, 6, 9]  # regression: spread


def test_stratified_subset_has_its_own_cache_key(tmp_path: Path) -> None:
    run = _wide_run(tmp_path / "wide")
    x, y = probe_data(run, max_samples=100, sample="stratified")
    assert len(y) == 100 and len(y.unique()) == 50
    first = plan(run, "neural_collapse", step=1, max_samples=100)
    strat = plan(run, "neural_collapse", step=1, max_samples=100, sample="stratified")
    assert "sample" not in first.key and strat.key["sample"] == "stratified"
    assert (
        plan(run, "neural_collapse", step=1, sample="stratified").key
        == plan(run, "neural_collapse", step=1).key
    )
    with pytest.raises(ValueError, match="sample must be one of"):
        probe_data(run, max_samples=10, sample="random")


def test_small_run_defaults_to_all_of_its_training_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_run(tmp_path / "tiny")
    at = _app(tmp_path, monkeypatch, "neural_collapse")
    assert at.number_input(key="nc_max_samples").value == 0  # 0 = all
    assert "Using all 48 train samples (the data the run was trained on)." in _texts(at.caption)
    at.multiselect(key=f"nc_steps_{tmp_path / 'tiny'}").set_value([0, 20]).run()
    at.button(key="nc_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    stored = ResultStore(tmp_path / "tiny").list("neural_collapse")
    assert len(stored) == 2 and all(s.params["max_samples"] is None for s in stored)


def test_large_run_defaults_to_a_stratified_subset_with_every_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wide_run(tmp_path / "wide")
    at = _app(tmp_path, monkeypatch, "neural_collapse")
    assert at.number_input(key="nc_max_samples").value == 2048
    assert at.radio(key="nc_sample").value == "stratified"
    assert "class-stratified subset: 2048 of 2100 train samples, every class kept" in _texts(at.caption)
    at.button(key="nc_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    stored = ResultStore(tmp_path / "wide").list("neural_collapse")
    assert stored and all(
        s.params["sample"] == "stratified" and s.params["max_samples"] == 2048 for s in stored
    )
    assert len(stored[0].result.to_frame()) >= 50  # every class has a row in the per-class detail


def test_page_settings_are_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tiny_run(tmp_path / "a")
    make_tiny_run(tmp_path / "b", seed=1)
    at = _app(tmp_path, monkeypatch, "neural_collapse")
    _select(at, "a")
    at.number_input(key="nc_max_samples").set_value(16).run()
    assert at.number_input(key="nc_max_samples").value == 16
    _select(at, "b")
    assert at.number_input(key="nc_max_samples").value == 0  # b's default, not a's setting


def _dd_run(path: Path) -> Run:
    run = Run.create(
        path,
        model={"name": "random_features", "in_dim": 4, "n_features": 10, "out_dim": 1},
        dataset={"name": "teacher_student", "dim": 4, "n_train": 10, "n_test": 20},
        extra={"sweep_variable": "n_features", "interpolation_threshold": 10},
    )
    ps = [2, 5, 8, 10, 12, 20, 40, 100]
    mse = [1.0, 0.8, 2.0, 30.0, 3.0, 0.9, 0.6, 0.5]
    run.log_metrics(
        [
            {"step": p, "n_features": p, "test_mse": m, "train_mse": max(1e-30, 1 - p / 10)}
            for p, m in zip(ps, mse)
        ]
    )
    run.save_checkpoint(build("random_features", in_dim=4, n_features=10, out_dim=1), 10)
    return run


def _values(v: object) -> list:
    """A Plotly array as a list (typed arrays ``{"dtype", "bdata"}`` decoded)."""
    import base64

    import numpy as np

    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)


def _plotly_spec(at, index: int = 0) -> dict:
    import json

    return json.loads(at.get("plotly_chart")[index].proto.spec)


def test_double_descent_defaults_to_test_error_on_a_log_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dd_run(tmp_path / "dd")
    at = _app(tmp_path, monkeypatch, "double_descent")
    assert not at.error, _texts(at.error)
    spec = _plotly_spec(at)
    assert spec["layout"]["yaxis"]["type"] == "log"  # both descents show, not only the peak
    names = [t.get("name") for t in spec["data"]]
    assert "test_mse" in names and "train_mse" not in names
    assert spec["layout"]["yaxis"]["title"]["text"] == "test_mse"
    test = next(t for t in spec["data"] if t.get("name") == "test_mse")
    ys, xs = _values(test["y"]), _values(test["x"])
    peak_x = xs[ys.index(max(ys))]
    assert peak_x == 10  # the peak sits at p = n
    at.toggle(key="dd_train").set_value(True).run()
    spec = _plotly_spec(at)
    assert "train_mse" in [t.get("name") for t in spec["data"]]
    assert spec["layout"]["yaxis"]["title"]["text"] == "test_mse and train_mse"  # names what it shows
    at.toggle(key="dd_logy").set_value(False).run()
    assert _plotly_spec(at)["layout"]["yaxis"].get("type", "linear") == "linear"


def test_mode_connectivity_trains_a_seed_twin_and_defaults_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynascope.recipes import RECIPES

    tiny = {"trials": 1, "n_train": 20, "p_grid": [5, 10, 20, 40]}
    RECIPES["double_descent"].run(tmp_path / "dd", small=True, progress=False, **tiny)
    at = _app(tmp_path, monkeypatch, "mode_connectivity")
    assert "No second run of this recipe yet" in _texts(at.markdown)
    at.button(key="lmc_twin_start").click().run()
    from lib import twins  # the module the app imported (same server-wide job registry)

    job = twins.job_for(Run.open(tmp_path / "dd"))
    assert job is not None and job.out == tmp_path / "dd-seed1"
    job.thread.join(timeout=120)
    assert job.done and job.error is None, job.error
    at.run()
    assert not at.exception and not at.error, _texts(at.error)
    b = at.selectbox(key="lmc_run_b")
    assert Path(b.value) == tmp_path / "dd-seed1"  # the default pair: two different runs
    twin = Run.open(tmp_path / "dd-seed1")
    assert twin.config["seed"] == 1 and twin.steps() == Run.open(tmp_path / "dd").steps()
    assert "Seed twin `dd-seed1` trained in" in _texts(at.caption)


def test_demo_banner_reports_the_real_duration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from streamlit.testing.v1 import AppTest
    from test_app import APP

    import dynascope.recipes.demos as demos_mod

    def fake_ensure(root, *, progress=None, names=None):
        progress("tiny-demo", 1, 1, {})
        make_tiny_run(Path(root) / "tiny-demo", steps=(0, 5))
        return {}

    monkeypatch.setattr(demos_mod, "DEMOS", (demos_mod.DemoSpec("tiny-demo", "grokking", "A tiny demo"),))
    monkeypatch.setattr(demos_mod, "ensure_demos", fake_ensure)
    monkeypatch.setattr(demos_mod, "demo_complete", lambda path, s: Run.is_run(path))
    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "1")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    from lib import demos

    job = demos.job_for(tmp_path)
    job.thread.join(timeout=60)
    assert job.finished_after is not None
    at.run()
    first = _texts(at.success)
    assert f"generated in {job.finished_after:.0f} s" in first
    time.sleep(1.2)
    at.run()
    assert _texts(at.success) == first  # the banner does not keep counting after the demos finished


def _eos_like_run(path: Path, lr: float) -> Run:
    """An EoS-style run at step size ``lr``: logged λ_max rising to 2/η and hovering there."""
    model = build(name="mlp", in_dim=2, width=8, depth=1, out_dim=3, seed=0)
    run = Run.create(
        path, model=model, dataset={"name": "gaussian_mixture", "n_classes": 3, "dim": 2, "n_train": 48},
        optimizer={"name": "sgd", "lr": lr}, extra={"phenomenon": "edge_of_stability"},
    )  # fmt: skip
    edge = 2.0 / lr
    run.log_metrics(
        [
            {"step": s, "train_loss": 1.0 / (s + 1), "lr": lr, "sharpness": edge * min(1.0, 0.5 + s / 20)}
            for s in range(0, 40, 5)
        ]
    )
    run.save_checkpoint(model, 0)
    return run


def test_compare_runs_overlays_eos_runs_in_units_of_the_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _eos_like_run(tmp_path / "eos-lr0.5", 0.5)
    _eos_like_run(tmp_path / "eos-lr0.25", 0.25)
    make_tiny_run(tmp_path / "other")
    at = _app(tmp_path, monkeypatch)
    _select(at, "eos-lr0.5")
    at.switch_page("views/compare.py").run()
    assert not at.exception and not at.error, _texts(at.error)
    assert sorted(Path(p).name for p in at.multiselect(key="cmp_runs").value) == ["eos-lr0.25", "eos-lr0.5"]
    spec = _plotly_spec(at)
    traces = {t["name"]: t for t in spec["data"]}
    assert {"eos-lr0.5", "eos-lr0.25"} <= set(traces)
    for name in ("eos-lr0.5", "eos-lr0.25"):  # λ_max·η/2 reaches 1 (the edge) for both step sizes
        assert max(_values(traces[name]["y"])) == pytest.approx(1.0)
    assert spec["layout"]["yaxis"]["title"]["text"] == "λ_max·η/2"


def test_compare_runs_overlays_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tiny_run(tmp_path / "a")
    make_tiny_run(tmp_path / "b", seed=1)
    at = _app(tmp_path, monkeypatch)
    at.switch_page("views/compare.py").run()
    assert not at.exception and not at.error, _texts(at.error)
    assert _box(at, "y-axis").value == "test_acc" and _box(at, "x-axis").value == "step"
    names = [t["name"] for t in _plotly_spec(at)["data"]]
    assert names == ["a", "b"]


def _box(at, label: str):
    return next(s for s in at.selectbox if s.label == label)


def test_compare_runs_keeps_no_stale_axes_and_refuses_mixed_step_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_run(tmp_path / "a")
    make_tiny_run(tmp_path / "b", seed=1)
    _dd_run(tmp_path / "dd")
    at = _app(tmp_path, monkeypatch)
    at.switch_page("views/compare.py").run()
    a, b, dd = (str(tmp_path / n) for n in ("a", "b", "dd"))
    at.multiselect(key="cmp_runs").set_value([a, b]).run()
    _box(at, "x-axis").set_value("train_loss").run()
    at.multiselect(key="cmp_runs").set_value([a]).run()
    assert _box(at, "x-axis").value == "step"  # another set of runs starts from its own default
    at.multiselect(key="cmp_runs").set_value([a, dd]).run()
    assert "different things on their step axis" in _texts(at.warning)  # p is not a training step
    assert not at.get("plotly_chart")


def test_runs_page_follows_a_recently_written_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    run = make_tiny_run(tmp_path / "live")
    at = _app(tmp_path, monkeypatch)
    assert at.toggle(key=f"runs_follow_{run.path}").value is True  # written just now: followed
    labels = [m.label for m in at.metric]
    assert "Latest checkpoint step" in labels and "Metric rows" in labels
    old = run.path.parent / "old"
    make_tiny_run(old)
    past = os.stat(old / "run.json").st_mtime - 3600
    for f in [old / "run.json", old / "metrics.csv", old / "checkpoints", *(old / "checkpoints").iterdir()]:
        os.utime(f, (past, past))
    at.run()
    _select(at, "old")
    assert at.toggle(key=f"runs_follow_{old}").value is False  # a finished run is not polled


def test_eos_page_draws_the_preconditioned_series_of_an_adam_recipe_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Adam EoS recipe run has optimizer state at every checkpoint after step 0; by default the page
    selects those checkpoints and draws λ_max(P⁻¹H) at each of them against the 38/η line."""
    from dynascope.recipes import RECIPES

    run = RECIPES["edge_of_stability_adam"].run(
        tmp_path / "adam", small=True, progress=False, steps=40, checkpoint_every=10, width=16, depth=1
    )
    at = _app(tmp_path, monkeypatch)
    _select(at, "adam")
    at.switch_page("views/edge_of_stability.py").run()
    assert not at.exception, at.exception
    with_state = [s for s in run.steps() if run.load_optimizer_state(s)["state"]]
    assert with_state == [10, 20, 30, 40]
    assert at.multiselect(key=f"eos_steps_{run.path}").value == with_state  # step 0 has no preconditioner
    assert at.toggle(key="eos_pre").value is True
    assert at.number_input(key="eos_max_samples").value == 0  # all 1000 training samples
    if [b for b in at.button if b.key == "eos_run"]:  # what the recipe filed (its λ_max) needs nothing more
        at.button(key="eos_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    traces = {t["name"]: t for t in _plotly_spec(at, 0)["data"]}
    pre = _values(traces["λ_max(P⁻¹H) (preconditioned)"]["y"])
    assert len(pre) == len(with_state) and all(v > 0 for v in pre)
    assert _values(traces["preconditioned threshold"]["y"]) == pytest.approx([38_000.0] * len(with_state))
    stored = [s for s in ResultStore(run.path).list("sharpness") if s.step in with_state]
    assert sorted(s.step for s in stored) == with_state
    drawn = [s.result.preconditioned_lambda_max for s in sorted(stored, key=lambda s: s.step)]
    assert drawn == pytest.approx(pre)  # the page draws the stored values
    last = max(stored, key=lambda s: s.step).result
    head = at.metric[0]
    assert head.label.startswith("λ_max(P⁻¹H) / threshold 38/η") and "(step 40)" in head.label
    assert float(head.value) == pytest.approx(last.preconditioned_ratio, abs=1e-3)


def test_demos_built_by_dynascope_app_show_their_status_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dynascope app`` starts the demo build in its own process before Streamlit: the app starts no thread
    of its own, shows the progress from ``.demos_status.json`` and, once done, the measured duration."""
    import json
    import os
    import time

    import dynascope.recipes.demos as demos_mod
    from dynascope.cli import DEMOS_BUILDER_ENV

    monkeypatch.setattr(demos_mod, "DEMOS", (demos_mod.DemoSpec("tiny-demo", "grokking", "A tiny demo"),))
    monkeypatch.setattr(demos_mod, "demo_complete", lambda path, s: Run.is_run(path))
    monkeypatch.setattr(demos_mod, "ensure_demos", lambda *a, **k: pytest.fail("the app built the demos"))
    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "1")
    monkeypatch.setenv(DEMOS_BUILDER_ENV, "process")
    status = {
        "pid": os.getpid(), "started": time.time() - 42, "names": ["tiny-demo"],
        "titles": {"tiny-demo": "Tiny"}, "progress": {"tiny-demo": [3, 10]}, "finished": [], "error": None,
        "done": False, "finished_after": None,
    }  # fmt: skip
    demos_mod.status_path(tmp_path).write_text(json.dumps(status))
    from streamlit.testing.v1 import AppTest
    from test_app import APP

    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and not at.error, _texts(at.error)
    from lib import demos

    job = demos.job_for(tmp_path)
    assert job.external and job.thread is None and not job.done
    texts = _texts(at.markdown)
    import re

    so_far = re.search(r"(\d+) s so far", texts)
    assert "Preparing the built-in demo runs" in texts and so_far and 42 <= int(so_far.group(1)) <= 100
    make_tiny_run(tmp_path / "tiny-demo", steps=(0, 5))
    status.update(finished=["tiny-demo"], done=True, finished_after=123.4, progress={"tiny-demo": [10, 10]})
    demos_mod.status_path(tmp_path).write_text(json.dumps(status))
    at.run()
    at.run()
    assert not at.exception, at.exception
    assert "generated in 123 s" in _texts(at.success)


def test_dynascope_app_starts_the_demo_build_before_streamlit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import os
    import subprocess

    from dynascope import cli
    from dynascope.recipes import demos as demos_mod

    started, launched = [], []
    monkeypatch.setattr(cli, "start_demo_build", lambda root: started.append(root))
    monkeypatch.setattr(cli.subprocess, "Popen", lambda cmd, env: launched.append((started[:], env)))
    monkeypatch.setattr(cli, "wait_forwarding_signals", lambda server, others: 0)
    monkeypatch.delenv("DYNASCOPE_DEMOS", raising=False)
    assert cli.main(["app", "--runs-dir", str(tmp_path / "runs"), "--headless"]) == 0
    ((before, env),) = launched
    assert before == [(tmp_path / "runs").resolve()]  # the build started before Streamlit
    assert env["DYNASCOPE_DEMOS_BUILDER"] == "process" and env["DYNASCOPE_RUNS_DIR"] == str(before[0])
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    assert cli.main(["app", "--runs-dir", str(tmp_path / "runs"), "--headless"]) == 0
    assert len(started) == 1 and "DYNASCOPE_DEMOS_BUILDER" not in launched[1][1]
    # the real background process: another live build of the folder -> it leaves at once
    monkeypatch.undo()
    root = tmp_path / "busy"
    root.mkdir()
    demos_mod.status_path(root).write_text(json.dumps({"pid": os.getpid(), "done": False, "started": 0}))
    proc = cli.start_demo_build(root)
    assert proc.wait(timeout=120) == 0
    assert "already running" in (root / ".demos.log").read_text()
    assert isinstance(proc, subprocess.Popen)


def test_compare_runs_puts_an_adam_eos_run_in_units_of_its_own_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that logged no sharpness (an Adam EoS run) is drawn from its result store as λ_max(P⁻¹H)
    over its threshold, next to a GD run's λ_max·η/2: both at 1 on the edge."""
    from dynascope import runner

    _eos_like_run(tmp_path / "eos-lr0.5", 0.5)
    adam = make_tiny_run(
        tmp_path / "adam", optimizer="adam", lr=0.05, extra={"phenomenon": "edge_of_stability"}
    )
    for step in (5, 20):
        runner.run_probe(adam, "sharpness", step=step, params={"k": 1, "lr": 0.05, "optimizer_state": True})
    stored = {s.step: s.result for s in ResultStore(adam.path).list("sharpness")}
    at = _app(tmp_path, monkeypatch)
    _select(at, "eos-lr0.5")
    at.switch_page("views/compare.py").run()
    assert not at.exception and not at.error, _texts(at.error)
    spec = _plotly_spec(at)
    traces = {t["name"]: t for t in spec["data"]}
    assert _values(traces["adam"]["x"]) == [5, 20]
    assert _values(traces["adam"]["y"]) == pytest.approx(
        [stored[5].preconditioned_ratio, stored[20].preconditioned_ratio]
    )
    assert spec["layout"]["yaxis"]["title"]["text"] == "λ_max / threshold (GD: λ_max·η/2)"
    assert "adam: λ_max(P⁻¹H) over its threshold" in _texts(at.caption)


def test_lr_transfer_page_without_a_sweep_says_how_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_run(tmp_path / "a")
    at = _app(tmp_path, monkeypatch, "lr_transfer")
    assert not at.exception and not at.error, _texts(at.error)  # not a red "failed" box
    assert "holds no learning-rate sweep" in _texts(at.info)
    assert "dynascope recipe lr_transfer --out" in at.code[0].value


def test_a_demo_still_being_built_is_not_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dynascope.recipes import demos as demos_mod

    spec = demos_mod.DemoSpec("dd", "double_descent", "a demo")
    monkeypatch.setattr(demos_mod, "DEMOS", (spec,))
    make_tiny_run(tmp_path / "dd", steps=(0, 5))  # 12/15 model sizes, say: not complete
    make_tiny_run(tmp_path / "mine")
    at = _app(tmp_path, monkeypatch)
    assert not at.exception and not at.error, _texts(at.error)
    options = [Path(str(o)).name for o in at.selectbox(key="dynascope_sidebar_run").options]
    assert "dd" not in " ".join(options) and any("mine" in o for o in options)


def test_stratified_caption_counts_the_classes_a_small_subset_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_run(tmp_path / "a")  # 3 classes
    at = _app(tmp_path, monkeypatch, "hessian")
    at.number_input(key="hess_max_samples").set_value(2)
    at.radio(key="hess_sample").set_value("stratified").run()
    assert "2 of the 3 classes kept, one sample each" in _texts(at.caption)  # not "every class kept"
    at.number_input(key="hess_max_samples").set_value(6).run()
    assert "every class kept" in _texts(at.caption)
