"""Streamlit AppTest tests of every page of the workbench (no browser; see test_app_e2e.py for that)."""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from dynascope.models import Run, build, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "main.py"
sys.path.insert(0, str(REPO / "app"))  # the app's helpers import as ``lib.*``

MODEL = {"name": "mlp", "in_dim": 2, "width": 8, "depth": 1, "out_dim": 3}
DATASET = {"name": "gaussian_mixture", "n_classes": 3, "dim": 2, "n_train": 48, "n_test": 48, "seed": 0}


def make_tiny_run(
    path: Path,
    *,
    steps: tuple[int, ...] = (0, 5, 10, 20),
    optimizer: str = "sgd",
    lr: float = 0.2,
    seed: int = 0,
    extra: dict | None = None,
) -> Run:
    """A small trained run: MLP 2-8-3 on a 3-class Gaussian mixture, full-batch GD (or Adam).

    Checkpoints (with optimizer state) at ``steps``; metrics.csv every step with train/test loss and
    accuracy and the learning rate.
    """
    from dynascope.datasets import load

    torch.manual_seed(seed)
    ds = load(**DATASET)
    (x, y), (xt, yt) = ds.train, ds.test
    model = build(**{**MODEL, "seed": seed})
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    run = Run.create(
        path,
        model=model,
        dataset=DATASET,
        optimizer=opt,
        loss="cross_entropy",
        seed=seed,
        notes="tiny test run",
        extra=extra or {},
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    rows = []
    for step in range(max(steps) + 1):
        with torch.no_grad():
            out, out_t = model(x), model(xt)
            row = {
                "step": step,
                "train_loss": float(loss_fn(out, y)),
                "train_acc": float((out.argmax(1) == y).float().mean()),
                "test_loss": float(loss_fn(out_t, yt)),
                "test_acc": float((out_t.argmax(1) == yt).float().mean()),
                "lr": lr,
            }
        rows.append(row)
        if step in steps:
            run.save_checkpoint(
                model,
                step,
                optimizer=opt if step > 0 else None,
                metrics={k: v for k, v in row.items() if k != "step"},
            )
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    run.log_metrics(rows)
    return run


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_tiny_run(root / "tiny-gd")
    make_tiny_run(root / "tiny-adam", optimizer="adam", lr=0.05, seed=1)
    return root


# ----------------------------------------------------------------------------------------------- helpers
def _app(runs_root: Path, monkeypatch: pytest.MonkeyPatch, page: str | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(runs_root))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, at.exception
    return at


def _select(at, run_name: str):
    """Pick a run in the sidebar selector (as a user would; call right after the first run)."""
    box = at.selectbox(key="dynascope_sidebar_run")
    match = [o for o in box.options if Path(o).name == run_name or o.endswith(run_name)]
    assert match, box.options
    box.set_value(str(Path(match[0]))).run()
    assert not at.exception, at.exception
    return at


def _button(at, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, [b.label for b in at.button]
    return found[0]


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def _checkpoint_table(at):
    """The Runs page's checkpoint table (the first table with an 'optimizer state' column)."""
    for d in at.dataframe:
        if "optimizer state" in d.value.columns:
            return d.value
    raise AssertionError("no checkpoint table on the page")


def _charts(at) -> int:
    return len(at.get("plotly_chart"))


def _downloads(at) -> list[str]:
    return [d.label for d in at.get("download_button")]


@pytest.fixture()
def fresh_root(tmp_path: Path) -> Path:
    """A runs folder with one tiny GD run whose result store starts empty."""
    make_tiny_run(tmp_path / "tiny")
    return tmp_path


# ----------------------------------------------------------------------------------------------- Runs page
def test_runs_page_lists_runs_checkpoints_and_lr(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_root, monkeypatch)
    assert at.title[0].value == "Runs"
    picker = at.selectbox(key="runs_page_pick")
    assert sorted(Path(o).name for o in picker.options) == ["tiny-adam", "tiny-gd"]
    picker.set_value(str(runs_root / "tiny-gd")).run()
    assert not at.exception
    assert "Run `tiny-gd`" in _texts(at.subheader)
    table = _checkpoint_table(at)
    assert table["step"].tolist() == [0, 5, 10, 20]
    assert table["lr"].tolist() == pytest.approx([0.2] * 4)
    assert {"train_loss", "test_acc", "optimizer state"} <= set(table.columns)
    assert table["optimizer state"].tolist() == [False, True, True, True]
    # every page now works on this run (the sidebar selector reads the same session key)
    assert Path(at.session_state["dynascope_run_path"]).name == "tiny-gd"


def test_open_run_from_disk_and_bad_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = make_tiny_run(tmp_path / "elsewhere" / "my-run", steps=(0, 3))
    empty_root = tmp_path / "runs"
    empty_root.mkdir()
    at = _app(empty_root, monkeypatch)
    assert "No run folders" in _texts(at.info)
    at.text_input(key="runs_path").set_value(str(tmp_path / "nope"))
    _button(at, "Open").click().run()
    assert not at.exception
    assert "does not exist" in _texts(at.error)
    at.text_input(key="runs_path").set_value(str(elsewhere.path))
    _button(at, "Open").click().run()
    assert not at.exception and not at.error
    assert _checkpoint_table(at)["step"].tolist() == [0, 3]


def _upload(at, files: list[tuple[str, bytes]], *, name: str = "up", model_json: str | None = None):
    at.selectbox(key="up_dataset").set_value("gaussian_mixture").run()
    at.file_uploader(key="up_files").set_value([(n, b, "application/octet-stream") for n, b in files])
    cfg = {k: v for k, v in MODEL.items() if k != "name"}
    at.text_area(key="up_model_json_mlp").set_value(model_json or json.dumps(cfg))
    data_cfg = {k: v for k, v in DATASET.items() if k != "name"}
    at.text_area(key="up_data_json_gaussian_mixture").set_value(json.dumps(data_cfg))
    at.text_input(key="up_name").set_value(name)
    _button(at, "Create run from upload").click().run()
    assert not at.exception, at.exception
    return at


def test_upload_checkpoints_in_three_formats_becomes_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build(**MODEL)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pt, st_file = tmp_path / "w.pt", tmp_path / "step_7.safetensors"
    save_checkpoint(model, pt, metadata={"step": 3, "metrics": {"train_loss": 0.5}})
    save_checkpoint(model, st_file)
    ckpt = tmp_path / "epoch=1-step=12.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 12, "epoch": 1}, ckpt)
    root = tmp_path / "runs"
    root.mkdir()
    at = _app(root, monkeypatch)
    files = [(p.name, p.read_bytes()) for p in (pt, st_file, ckpt)]
    _upload(at, files, name="three formats")
    assert not at.error, _texts(at.error)
    assert "Created run `uploads/three_formats` with 3 checkpoint(s) (steps [3, 7, 12])" in _texts(at.success)
    run = Run.open(root / "uploads" / "three_formats")
    assert run.steps() == [3, 7, 12]
    assert run.checkpoint(3).metrics == {"train_loss": 0.5}
    loaded = run.load_model(12)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k])
    assert _checkpoint_table(at)["step"].tolist() == [3, 7, 12]


class _NotAllowed:  # a class outside torch's weights_only allowlist
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_upload_refuses_unsafe_pickle_and_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build(**MODEL)
    unsafe = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "extra": _NotAllowed()}, unsafe)
    root = tmp_path / "runs"
    root.mkdir()
    at = _app(root, monkeypatch)
    _upload(at, [("evil.pt", unsafe.getvalue()), ("garbage.ckpt", b"\x00garbage" * 20)], name="bad")
    errors_text = _texts(at.error)
    assert "**evil.pt** was not imported. Refused an unsafe checkpoint" in errors_text
    assert "_NotAllowed" in errors_text and "arbitrary code" in errors_text
    assert (
        "**garbage.ckpt** was not imported" in errors_text
        and "not a valid lightning checkpoint" in errors_text
    )
    assert "No run was created" in _texts(at.warning)
    assert not (root / "uploads" / "bad").exists()
    # the app keeps running: another page still works
    at.switch_page("views/hessian.py").run()
    assert not at.exception and "No run selected" in _texts(at.info)


def test_upload_bad_model_config_is_a_readable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    at = _app(root, monkeypatch)
    good = io.BytesIO()
    torch.save(build(**MODEL).state_dict(), good)
    _upload(at, [("w.pt", good.getvalue())], model_json='{"in_dim": 2, "width": ')
    assert "Importing the upload failed" in _texts(at.error) and "not valid JSON" in _texts(at.error)
    _upload(
        at,
        [("w.pt", good.getvalue())],
        model_json='{"in_dim": 2, "width": 8, "depth": 1, "out_dim": 3, "x": 1}',
    )
    assert "unknown config keys ['x']" in _texts(at.error)
    _upload(at, [("w.pt", good.getvalue())], model_json='{"in_dim": 2, "width": 9, "depth": 1, "out_dim": 3}')
    assert "**w.pt** was not imported" in _texts(at.error) and "shape" in _texts(at.error)


# ----------------------------------------------------------------------------------------------- probe pages
def test_no_run_selected_pages_show_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for page in ("hessian", "edge_of_stability", "gradients", "grokking", "double_descent",
                 "neural_collapse", "mode_connectivity"):  # fmt: skip
        at = _app(tmp_path, monkeypatch, page)
        assert "No run selected" in _texts(at.info), page


def test_hessian_topk_computes_once_then_comes_from_the_store(
    fresh_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynascope.store import ResultStore

    at = _app(fresh_root, monkeypatch, "hessian")
    assert "0 of 4 checkpoint(s) already in the result store" in _texts(at.caption)
    at.multiselect(key=f"hess_steps_{fresh_root / 'tiny'}").set_value([5, 20])
    at.number_input(key="hess_max_samples").set_value(32)
    at.number_input(key="hess_k").set_value(2).run()
    assert _charts(at) == 0
    at.button(key="hess_topk_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert "Hessian top-k (Lanczos): 2 computed, 0 from the result store" in [s.label for s in at.status]
    assert _charts(at) == 1
    assert _downloads(at) == ["CSV", "Parquet", "JSON", "HTML", "PNG", "SVG", "PDF"]
    stored = ResultStore(fresh_root / "tiny").list("hessian_eigenvalues")
    assert sorted(s.step for s in stored) == [5, 20]
    assert all(s.params["k"] == 2 and s.params["max_samples"] == 32 for s in stored)
    # the stored values are the exact top eigenvalues of the dense Hessian of the mean loss
    run = Run.open(fresh_root / "tiny")
    from dynascope.runner import probe_data

    x, y = probe_data(run, max_samples=32)
    model = run.load_model(20).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        out, i = {}, 0
        for k, p in params.items():
            out[k] = theta[i : i + p.numel()].view_as(p)
            i += p.numel()
        logits = torch.func.functional_call(model, out, (x.double(),))
        return torch.nn.functional.cross_entropy(logits, y)

    dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)[:2]
    got = next(s.result for s in stored if s.step == 20).values
    assert torch.allclose(got.double(), dense, rtol=1e-3, atol=1e-6)

    # a new session: the same selection comes from the store, nothing to compute, no button
    at2 = _app(fresh_root, monkeypatch, "hessian")
    at2.multiselect(key=f"hess_steps_{fresh_root / 'tiny'}").set_value([5, 20])
    at2.number_input(key="hess_max_samples").set_value(32)
    at2.number_input(key="hess_k").set_value(2).run()
    assert "All 2 selected checkpoint(s) are in the result store; nothing to compute." in _texts(at2.caption)
    assert "hess_topk_run" not in [b.key for b in at2.button]
    assert _charts(at2) == 1


def test_hessian_density_layers_and_trace_tabs(fresh_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(fresh_root, monkeypatch, "hessian")
    at.multiselect(key=f"hess_steps_{fresh_root / 'tiny'}").set_value([0, 20])
    at.number_input(key="hess_max_samples").set_value(32)
    at.number_input(key="hess_probes").set_value(2)
    at.number_input(key="hess_lsteps").set_value(10)
    at.number_input(key="hess_trace_mv").set_value(12).run()
    assert at.radio(key="hess_trace_method").options == ["auto", "hutch++", "hutchinson", "krylov++"]
    assert at.radio(key="hess_trace_method").value == "auto"  # the default chooses from the first sketch
    at.radio(key="hess_trace_method").set_value("krylov++").run()
    for key in ("hess_density_run", "hess_layers_run", "hess_blocks_run", "hess_trace_run"):
        at.button(key=key).click().run()
        assert not at.exception and not at.error, (key, _texts(at.error))
    assert _charts(at) == 4
    layer_table = at.dataframe[0].value
    assert {"layer", "n_params", "lambda_1", "trace"} <= set(layer_table.columns)
    assert layer_table["n_params"].sum() == 8 * 2 + 8 + 3 * 8 + 3
    block_table = at.dataframe[1].value
    assert list(block_table["n_params"]) == list(layer_table["n_params"])  # the same blocks, one per layer
    assert (block_table["lambda_max"] >= block_table["lambda_min"]).all()
    assert block_table["mean_js"].between(0, math.log(2)).all()
    from dynascope.store import ResultStore

    (stored,) = ResultStore(fresh_root / "tiny").list("blockwise_spectra")
    assert f"{stored.result.heterogeneity:.3g} nats" in " ".join(m.value for m in at.markdown)
    at.toggle(key="hess_density_log").set_value(False).run()  # display option: no recompute
    assert not at.exception and _charts(at) == 4 and not [b for b in at.button if b.key == "hess_density_run"]


def test_edge_of_stability_adam_run_has_preconditioned_sharpness(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(runs_root, monkeypatch)
    _select(at, "tiny-adam")
    at.switch_page("views/edge_of_stability.py").run()
    assert at.toggle(key="eos_pre").value is True
    at.multiselect(key=f"eos_steps_{runs_root / 'tiny-adam'}").set_value([5, 20])
    at.number_input(key="eos_max_samples").set_value(32).run()
    at.button(key="eos_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert _charts(at) == 2  # sharpness vs 2/η, loss curve
    from dynascope.store import ResultStore

    stored = [
        s for s in ResultStore(runs_root / "tiny-adam").list("sharpness") if s.params.get("max_samples") == 32
    ]
    assert sorted(s.step for s in stored) == [5, 20]
    for s in stored:
        assert s.params["lr"] == pytest.approx(0.05) and s.params["optimizer_state"]
        assert s.result.two_over_lr == pytest.approx(40.0)
        assert s.result.preconditioned_lambda_max is not None and s.result.preconditioned_lambda_max > 0
    assert any(m.label.startswith("λ_max / (2/η)") for m in at.metric)
    # the headline is the ratio that applies to Adam: λ_max(P⁻¹H) over its threshold
    last = max(stored, key=lambda s: s.step).result
    assert at.metric[0].label.startswith("λ_max(P⁻¹H) / threshold")
    assert float(at.metric[0].value) == pytest.approx(last.preconditioned_ratio, rel=1e-3, abs=1e-3)
    assert "38/η" in _texts(at.caption)


def test_edge_of_stability_gd_run_uses_the_schedule(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_root, monkeypatch)
    _select(at, "tiny-gd")
    at.switch_page("views/edge_of_stability.py").run()
    assert at.toggle(key="eos_pre").value is False and at.toggle(key="eos_pre").disabled
    at.multiselect(key=f"eos_steps_{runs_root / 'tiny-gd'}").set_value([20])
    at.number_input(key="eos_max_samples").set_value(32).run()
    at.button(key="eos_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    ratio = next(m for m in at.metric if m.label.startswith("λ_max / (2/η)"))
    from dynascope.store import ResultStore

    hit = [
        s for s in ResultStore(runs_root / "tiny-gd").list("sharpness") if s.params.get("max_samples") == 32
    ]
    assert len(hit) == 1 and hit[0].result.two_over_lr == pytest.approx(10.0)
    assert float(ratio.value) == pytest.approx(hit[0].result.lambda_max / 10.0, rel=1e-3)


def test_grokking_curves_and_ntk_dynamics(fresh_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(fresh_root, monkeypatch, "grokking")
    assert _charts(at) == 2  # training curves + (weight-norm only) dynamics
    at.multiselect(key=f"grok_steps_{fresh_root / 'tiny'}").set_value([10, 20])
    at.number_input(key="grok_max_samples").set_value(24).run()
    assert "The first checkpoint (step 0) is included" in _texts(at.caption)
    at.button(key="grok_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    at.run()
    assert "NTK trajectory loaded from the result store." in _texts(at.caption)
    from dynascope.store import ResultStore

    (stored,) = ResultStore(fresh_root / "tiny").list("ntk_trajectory")
    traj = stored.result
    assert list(traj.steps) == [0, 10, 20] and traj.kernel_distance[0] == pytest.approx(0.0, abs=1e-9)
    assert all(0 <= a <= 1 for a in traj.label_alignment)


def test_neural_collapse_and_gradients_pages(fresh_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(fresh_root, monkeypatch, "neural_collapse")
    at.multiselect(key=f"nc_steps_{fresh_root / 'tiny'}").set_value([0, 20])
    at.number_input(key="nc_max_samples").set_value(48).run()
    at.button(key="nc_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert _charts(at) == 2  # NC1–NC4 over checkpoints + per-class detail
    at.switch_page("views/gradients.py").run()
    at.multiselect(key=f"grad_steps_{fresh_root / 'tiny'}").set_value([0, 20])
    at.number_input(key="grad_max_samples").set_value(48).run()
    at.button(key="grad_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert _charts(at) == 2
    detail = at.dataframe[0].value
    assert detail["group"].tolist()[0] == "all" and len(detail) == 1 + 3  # all + 3 classes


def test_mode_connectivity_between_two_runs(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(runs_root, monkeypatch)
    _select(at, "tiny-gd")
    at.switch_page("views/mode_connectivity.py").run()
    assert Path(at.selectbox(key="lmc_run_b").value).name == "tiny-adam"  # same architecture, another run
    at.number_input(key="lmc_points").set_value(5)
    at.number_input(key="lmc_max_samples").set_value(48).run()
    at.button(key="lmc_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    labels = [m.label for m in at.metric]
    assert "Loss barrier (weight matching)" in labels and "Loss barrier (no alignment)" in labels
    assert _charts(at) == 2  # path + layer-wise barriers
    at.run()
    assert "Loaded from the result store." in _texts(at.caption)
    # the same checkpoint twice is refused with a readable error
    at.selectbox(key="lmc_run_b").set_value(str(runs_root / "tiny-gd")).run()
    at.selectbox(key=f"lmc_step_b_{runs_root / 'tiny-gd'}").set_value(20).run()
    assert "A and B are the same file" in _texts(at.error) and not at.exception


def test_double_descent_page_marks_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run.create(
        tmp_path / "dd",
        model={"name": "random_features", "in_dim": 4, "n_features": 10, "out_dim": 1},
        dataset={"name": "teacher_student", "dim": 4, "n_train": 10, "n_test": 20},
        extra={"sweep_variable": "n_features", "interpolation_threshold": 10},
    )
    ps = [2, 5, 8, 10, 12, 20, 40, 100]
    mse = [1.0, 0.8, 2.0, 30.0, 3.0, 0.9, 0.6, 0.5]
    run.log_metrics(
        [{"step": p, "n_features": p, "test_mse": m, "train_mse": max(0.0, 1 - p / 10), "cond": 10.0 + m}
         for p, m in zip(ps, mse)]
    )  # fmt: skip
    run.save_checkpoint(build("random_features", in_dim=4, n_features=10, out_dim=1), 10)
    at = _app(tmp_path, monkeypatch, "double_descent")
    assert not at.error, _texts(at.error)
    assert at.selectbox(key="dd_x").value == "n_features" and at.selectbox(key="dd_y").value == "test_mse"
    assert "Interpolation threshold marked at n_features = 10." in _texts(at.caption)
    assert _charts(at) == 2  # test error + condition number
    assert "Double descent detected" in _texts(at.success)


# ----------------------------------------------------------------------------------------------- first start
def test_first_start_generates_the_demos_with_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    import dynascope.recipes.demos as demos_mod

    spec = demos_mod.DemoSpec("tiny-demo", "grokking", "A tiny demo")
    calls: list[tuple] = []

    def fake_ensure(root, *, progress=None, names=None):
        for step in (0, 5, 10):
            progress("tiny-demo", step, 10, {})
            calls.append(step)
        make_tiny_run(Path(root) / "tiny-demo", steps=(0, 5))
        return {}

    monkeypatch.setattr(demos_mod, "DEMOS", (spec,))
    monkeypatch.setattr(demos_mod, "ensure_demos", fake_ensure)
    monkeypatch.setattr(demos_mod, "demo_complete", lambda path, s: Run.is_run(path))
    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "1")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and not at.error, _texts(at.error)
    from lib import demos

    job = demos.job_for(tmp_path)
    assert job is not None and job.names == ["tiny-demo"]
    job.thread.join(timeout=60)
    assert job.done and job.error is None and calls == [0, 5, 10] and job.progress["tiny-demo"] == (10, 10)
    at.run()
    assert not at.exception and not at.error, _texts(at.error)
    assert "Demo runs ready" in _texts(at.success)
    assert _checkpoint_table(at)["step"].tolist() == [0, 5]  # the new demo is listed and selected
    at.run()  # one job per runs folder: no second generation
    assert calls == [0, 5, 10]


# ------------------------------------------------------------------------------------------ helpers (no UI)
def test_png_support_says_how_to_enable_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lib import downloads

    monkeypatch.setattr(downloads, "BROWSER_CANDIDATES", ())
    monkeypatch.setattr(downloads.shutil, "which", lambda name: None)
    env = {"BROWSER_PATH": str(tmp_path / "missing-chrome")}
    ok, reason = downloads.png_support(env)
    assert not ok and "apt-get install chromium" in reason and "BROWSER_PATH" in reason
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setattr(downloads, "BROWSER_CANDIDATES", (str(fake),))
    env = {}
    assert downloads.png_support(env) == (True, f"rendered with {fake}") and env["BROWSER_PATH"] == str(fake)


def test_download_payloads() -> None:
    import pandas as pd
    import plotly.graph_objects as go
    from lib import downloads

    frame = pd.DataFrame({"step": [1, 2], "value": [0.5, float("nan")], "vec": [[1, 2], [3]]})
    assert downloads.frame_csv(frame).decode().splitlines()[0] == "step,value,vec"
    back = pd.read_parquet(io.BytesIO(downloads.frame_parquet(frame)))
    assert back["step"].tolist() == [1, 2] and json.loads(back["vec"][0]) == [1, 2]
    payload = json.loads(downloads.frame_json(frame, {"meta": {"probe": "x"}}))
    assert payload["data"][1]["value"] is None and payload["meta"] == {"probe": "x"}
    html = downloads.figure_html(go.Figure(go.Scatter(x=[1], y=[2])))
    assert html.lower().startswith("<!doctype html>") and len(html) > 1_000_000  # plotly.js embedded
    assert '<script src="http' not in html  # opens offline
    assert downloads.slug("runs/a b:c") == "runs_a_b_c"


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists() and not os.environ.get("CI"),
    reason="PNG export needs /usr/bin/chromium",
)
def test_png_export_renders_with_the_system_chromium() -> None:
    import plotly.graph_objects as go
    from lib import downloads

    png = downloads.figure_png(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), scale=1.0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_upload_helpers() -> None:
    from lib import uploads

    assert uploads.step_from_name("epoch=3-step=200.ckpt") == 200
    assert uploads.step_from_name("step_000123.safetensors") == 123
    assert uploads.step_from_name("model-7.pt") == 7 and uploads.step_from_name("final.pt") is None
    assert uploads.parse_json_object("", "cfg") == {}
    with pytest.raises(ValueError, match="cfg is not valid JSON"):
        uploads.parse_json_object("{", "cfg")
    with pytest.raises(ValueError, match="must be a JSON object"):
        uploads.parse_json_object("[1]", "cfg")
    assert uploads.safe_name("../../etc/passwd") == "passwd" and uploads.safe_name("a b") == "a_b"


def test_schedule_line_and_interpolation_threshold(tmp_path: Path) -> None:
    import pandas as pd

    from dynascope.probes import figures
    from dynascope.recipes import interpolation_threshold

    sched = figures.schedule_frame(lambda s: 0.1 if s < 50 else 0.05, 100, n=11)
    assert sched["step"].tolist() == list(range(0, 101, 10))
    assert sched["two_over_lr"].tolist() == pytest.approx([20.0] * 5 + [40.0] * 6)
    run = make_tiny_run(tmp_path / "r", steps=(0, 1))
    metrics = pd.DataFrame({"width": [1, 2, 4, 8, 8], "train_error": [0.5, 0.1, 0.0, 0.0, 0.002]})
    assert interpolation_threshold(run, metrics, "width") == 4.0
    assert interpolation_threshold(run, metrics.assign(train_error=0.3), "width") is None
    assert interpolation_threshold(run, metrics, "n_features") == 48.0  # p = n_train


def test_unexpected_errors_show_a_traceback_expander() -> None:
    from streamlit.testing.v1 import AppTest

    script = (
        "import sys; sys.path.insert(0, {app!r})\n"
        "from lib.errors import guard\n"
        "import streamlit as st\n"
        "with guard('Bad input'):\n    raise ValueError('width must be positive')\n"
        "with guard('Bug'):\n    raise RuntimeError('boom')\n"
        "st.write('still running')\n"
    ).format(app=str(REPO / "app"))
    at = AppTest.from_string(script).run()
    assert [e.value for e in at.error] == [
        "**Bad input failed.** width must be positive",
        "**Bug failed.** boom",
    ]
    assert len(at.expander) == 1 and "RuntimeError: boom" in at.expander[0].code[0].value
    assert at.markdown[-1].value == "still running"


def test_phenomenon_page_offers_a_matching_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Grokking page on a double-descent run points at the grokking run and switches to it."""
    make_tiny_run(tmp_path / "a-dd", steps=(0, 5), extra={"phenomenon": "double_descent"})
    make_tiny_run(tmp_path / "b-grok", steps=(0, 5), extra={"phenomenon": "grokking"})
    at = _app(tmp_path, monkeypatch, page="grokking")
    assert any("not a grokking run" in i.value for i in at.info), [i.value for i in at.info]
    _button(at, "Switch to `b-grok`").click().run()
    assert not at.exception, at.exception
    assert Path(at.session_state["dynascope_run_path"]).name == "b-grok"
    assert not any("not a grokking run" in i.value for i in at.info)


def test_app_and_notebook_share_multi_checkpoint_and_preconditioned_results(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preconditioned sharpness, the NTK trajectory and LMC are runner probes: what one front end
    computed, the other reads from the result store (the second side may not compute)."""
    from lib import compute

    import dynascope
    from dynascope import runner

    adam, gd = Run.open(runs_root / "tiny-adam"), Run.open(runs_root / "tiny-gd")
    view = dynascope.open_run(adam.path)
    real_compute = runner.compute

    def forbid(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the result store")

    # notebook → app: λ_max(P⁻¹H) from the saved Adam state, η from the schedule
    nb = view.probe("sharpness", step=10, lr=0.05, k=1, tol=1e-3, trace=False, optimizer_state=True,
                    max_samples=24)  # fmt: skip
    assert nb.preconditioned_lambda_max is not None and nb.preconditioned_lambda_max > 0
    monkeypatch.setattr(runner, "compute", forbid)
    app = compute.sharpness_results(adam, [10], params={"k": 1, "tol": 1e-3, "trace": False}, split="train",
                                    max_samples=24, preconditioned=True, compute_missing=True)  # fmt: skip
    assert app[10].preconditioned_lambda_max == nb.preconditioned_lambda_max
    plain = compute.sharpness_results(adam, [10], params={"k": 1, "tol": 1e-3, "trace": False}, split="train",
                                      max_samples=24, preconditioned=False)  # fmt: skip
    assert plain == {}  # without the optimizer state it is another key

    # app → notebook: NTK trajectory over three checkpoints, LMC between two runs
    monkeypatch.setattr(runner, "compute", real_compute)
    ntk = {"steps": [0, 5, 10], "params": {"reduce_outputs": "trace", "centered": True}, "split": "test",
           "max_samples": 16}  # fmt: skip
    assert compute.stored(adam, "ntk_trajectory", **ntk) is None
    traj = compute.compute_stored(adam, "ntk_trajectory", label="NTK trajectory", **ntk)
    options = {"n_points": 5, "align": "weights", "layerwise": True, "compare_unaligned": True}
    lmc = {"step": 20, "other": (adam, 20), "split": "train", "max_samples": 48, "params": options}
    path = compute.compute_stored(gd, "lmc_barrier", label="linear path", **lmc)
    monkeypatch.setattr(runner, "compute", forbid)
    again = view.probe("ntk_trajectory", steps=[0, 5, 10], split="test", max_samples=16)
    assert list(again.label_alignment) == list(traj.label_alignment)
    nb_path = dynascope.open_run(gd.path).probe(
        "lmc_barrier", step=20, other=(view, 20), n_points=5, align="weights", layerwise=True, max_samples=48
    )
    assert nb_path.barrier == path.barrier and list(nb_path.losses) == list(path.losses)


# ----------------------------------------------------------------------------------------- hardening
def test_upload_long_names_nonfinite_steps_duplicate_names_and_size_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lib import uploads

    from dynascope.models import CheckpointMetadataError

    model = build(**MODEL)
    sd = model.state_dict()

    def torch_bytes(meta: dict | None) -> bytes:
        buf = io.BytesIO()
        torch.save({"state_dict": sd, "dynascope_metadata": json.dumps(meta)} if meta else sd, buf)
        return buf.getvalue()

    long_name = "x" * 300 + "_step_9.pt"  # over the file system's 255-byte name limit
    files = [
        (long_name, torch_bytes(None)),
        ("dup.pt", torch_bytes({"step": 1})),
        ("dup.pt", torch_bytes({"step": 2})),
        ("nan.pt", torch_bytes({"step": float("nan")})),
        ("inf_epoch.pt", torch_bytes({"step": 4, "epoch": float("inf")})),
        ("big.pt", b"\0" * 40_000),
    ]
    monkeypatch.setenv("DYNASCOPE_MAX_UPLOAD_MB", "0.03")  # ~31 KB per file
    report = uploads.import_checkpoints(
        files, runs_root=tmp_path, run_name="r" * 300, model_name="mlp", model_config=MODEL,
        dataset_name=DATASET["name"], dataset_config={k: v for k, v in DATASET.items() if k != "name"},
    )  # fmt: skip
    assert report.steps == {long_name: 9, "dup.pt": 1, "dup.pt (2)": 2}
    assert sorted(report.errors) == ["big.pt", "inf_epoch.pt", "nan.pt"]
    nan_err = report.errors["nan.pt"]
    assert (
        isinstance(nan_err, CheckpointMetadataError)
        and "'nan.pt'" in str(nan_err)
        and "'step'" in str(nan_err)
    )
    assert "'epoch'" in str(report.errors["inf_epoch.pt"]) and "'inf_epoch.pt'" in str(
        report.errors["inf_epoch.pt"]
    )
    assert "0.0381 MB is over the upload limit of 0.03 MB per file" in str(report.errors["big.pt"])
    assert report.run is not None and report.run.steps() == [1, 2, 9]
    assert len(report.run.path.name) <= uploads.MAX_NAME_CHARS


def test_safe_names_are_short_and_distinct() -> None:
    from lib import uploads

    a, b = uploads.safe_name("a" * 300 + "1.safetensors"), uploads.safe_name("a" * 300 + "2.safetensors")
    assert a != b and len(a) <= uploads.MAX_NAME_CHARS and a.endswith(".safetensors")
    assert uploads.safe_name("short.pt") == "short.pt"
    assert uploads.distinct_names(["a", "b", "a", "a"]) == ["a", "b", "a (2)", "a (3)"]
    assert uploads.step_from_name("step_" + "9" * 30 + ".pt") is None  # not a step: over 2**63


def test_streamlit_config_binds_localhost_with_xsrf_and_dynascope_app_passes_it() -> None:
    import argparse
    import subprocess

    from lib import uploads

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from dynascope.cli import APP_SERVER_OPTIONS, app_command

    cfg = tomllib.loads((REPO / "app" / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1" and cfg["server"]["enableXsrfProtection"] is True
    assert cfg["server"]["maxUploadSize"] == uploads.MAX_UPLOAD_MB
    # `streamlit run app/main.py` reads it from any working directory (the script's own .streamlit) ...
    code = "from streamlit import config; config._main_script_path = sys.argv[1]; " \
           "config.get_config_options(force_reparse=True); " \
           "print(config.get_option('server.address'), config.get_option('server.enableXsrfProtection'), " \
           "config.get_option('server.maxUploadSize'))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", "import sys; " + code, str(APP)], cwd="/",
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.stdout.split() == ["127.0.0.1", "True", str(uploads.MAX_UPLOAD_MB)], out.stderr
    # ... and `dynascope app`, started anywhere, passes the same settings explicitly
    args = argparse.Namespace(port=8501, address="127.0.0.1", headless=True)
    cmd = app_command(args)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--server.address"] == "127.0.0.1"
    for section, values in cfg.items():
        for key, value in values.items():
            if key != "address":
                assert flags[f"--{section}.{key}"] == str(value).lower(), key
    assert set(APP_SERVER_OPTIONS) == {f"{s}.{k}" for s, v in cfg.items() for k in v if k != "address"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, proc, timeout: float = 90.0) -> str:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = log.read_text() if log.exists() else ""
        if text in out:
            return out
        assert proc.poll() is None, out
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log.read_text()!r}")


@pytest.mark.slow
def test_streamlit_run_outside_the_repository_listens_on_loopback_only(tmp_path: Path) -> None:
    import subprocess

    port = _free_port()
    log = tmp_path / "st.log"
    env = {**os.environ, "DYNASCOPE_DEMOS": "0", "DYNASCOPE_RUNS_DIR": str(tmp_path / "runs")}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless",
                                 "true", "--server.port", str(port)], cwd=tmp_path, env=env, stdout=f,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out = _wait_for(log, "server started on", proc)
        assert f"server started on 127.0.0.1:{port}" in out, out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_app_refuses_a_non_loopback_address_unless_chosen(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    monkeypatch.delenv("DYNASCOPE_ALLOW_REMOTE", raising=False)
    config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert "refuses to serve there" in " ".join(e.value for e in at.error)
        assert not at.selectbox and not at.button
        monkeypatch.setenv("DYNASCOPE_ALLOW_REMOTE", "1")
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.error and not at.exception
    finally:
        config.set_option("server.address", None)


@pytest.mark.slow
def test_dynascope_app_passes_sigterm_to_its_server(tmp_path: Path) -> None:
    import signal
    import subprocess

    import psutil

    port = _free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "DYNASCOPE_DEMOS": "0"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dynascope", "app", "--headless", "--port", str(port),
                                 "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, env=env, stdout=f,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for(log, "server started on", proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [c.cmdline() for c in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
