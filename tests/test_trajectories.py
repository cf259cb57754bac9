"""One trajectory view: a probe swept over checkpoints is drawn over every step in the notebook figure, the
CLI export and the report; the tidy table and its sidecar; settings without the checkpoint's identity."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pandas as pd
import pytest
from test_app import make_tiny_run

import dynascope
from dynascope import runner
from dynascope.cli import main
from dynascope.store import ResultStore
from dynascope.trajectories import setting_id, settings

STEPS = [0, 5, 10, 20]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    run = make_tiny_run(tmp_path_factory.mktemp("traj") / "tiny", steps=tuple(STEPS))
    runner.sweep(run, "hessian_eigenvalues", STEPS, params={"k": 2}, max_samples=32)
    runner.sweep(run, "hessian_trace", STEPS, params={"n_matvecs": 6, "seed": 0}, max_samples=32)
    runner.run_probe(run, "hessian_eigenvalues", step=20, params={"k": 3}, max_samples=32)  # a 2nd setting
    return run


def _xs(fig) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in t.x) for t in fig.data if t.x is not None and len(t.x) > 1}


def test_notebook_figure_draws_every_checkpoint(swept) -> None:
    view = dynascope.open_run(swept.path)
    fig = view.figure("hessian_eigenvalues")
    assert _xs(fig) == {tuple(STEPS)}  # λ₁, λ₂ over the 4 steps (not one checkpoint on an axis from −1 to 1)
    assert "1 of 2 settings" in fig.layout.title.text
    assert _xs(view.figure("hessian_trace")) == {tuple(STEPS)}


def test_cli_export_figure_draws_every_checkpoint(swept, tmp_path: Path, monkeypatch) -> None:
    import dynascope.probes.figures as figures

    drawn = []
    monkeypatch.setattr(figures, "write_figure", lambda fig, out, fmt: drawn.append(fig) or Path(out))
    out = tmp_path / "e.png"
    assert main(["export", str(swept.path), "--probe", "hessian_eigenvalues", "--out", str(out)]) == 0
    (fig,) = drawn
    assert _xs(fig) == {tuple(STEPS)}


def test_report_draws_every_checkpoint(swept, tmp_path: Path, monkeypatch) -> None:
    from dynascope import report

    drawn = {}
    real = getattr(report, "_render", None)
    assert real is not None, "the report draws its figures through report._render"

    def spy(fig, **kwargs):
        drawn[fig.layout.title.text] = fig
        return real(fig, **kwargs)

    monkeypatch.setattr(report, "_render", spy)
    rep = report.build_report(swept, tmp_path / "r.html", svg=False)
    assert {"hessian_eigenvalues", "hessian_trace"} <= set(rep.figures)
    eig = next(f for t, f in drawn.items() if "eigenvalues" in t.lower())
    assert _xs(eig) == {tuple(STEPS)}


def test_tidy_csv_with_params_sidecar_mode_0644(swept, tmp_path: Path) -> None:
    out = tmp_path / "eig.csv"
    assert main(["export", str(swept.path), "--probe", "hessian_eigenvalues", "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["step", "setting", "quantity", "index", "value"]
    assert "params" not in frame.columns and "checkpoint_hash" not in frame.columns
    lam1 = frame[(frame.quantity == "values") & (frame["index"] == 1)]
    assert sorted(lam1.step) == sorted([*STEPS, 20])  # k=2 at every step, k=3 at step 20
    side = json.loads((tmp_path / "eig.params.json").read_text())
    assert set(side["settings"]) == set(frame.setting)
    widest = max(side["settings"].values(), key=lambda s: len(s["checkpoints"]))
    assert widest["params"]["k"] == 2 and list(widest["checkpoints"]) == [str(s) for s in STEPS]
    for path in (out, tmp_path / "eig.params.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_settings_leave_out_the_checkpoint_identity(swept) -> None:
    store = ResultStore(swept.path)
    rows = store.list("hessian_eigenvalues")
    assert len({json.dumps(r.params, sort_keys=True) for r in rows}) == 5  # each checkpoint keyed apart
    found = settings(store, "hessian_eigenvalues")
    assert [len(t.results) for t in found] == [4, 1] and found[0].params["k"] == 2
    assert "checkpoint_sha256" not in found[0].params
    assert setting_id({**rows[0].params, "lr": 0.1}) == setting_id({**rows[0].params, "lr": 0.2})


def test_export_help_lists_every_format(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for fmt in ("csv", "parquet", "json", "html", "png", "svg", "pdf"):
        assert fmt in text


def test_tidy_frame_rows_of_scalars_vectors_and_grids() -> None:
    from dataclasses import dataclass

    import torch

    from dynascope.probes.results import Result
    from dynascope.trajectories import tidy_frame

    @dataclass(frozen=True, kw_only=True)
    class Grid(Result):
        barrier: float
        alphas: torch.Tensor
        loss: torch.Tensor
        align: str

    r = Grid(
        barrier=0.5, alphas=torch.tensor([0.0, 1.0]), loss=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), align="x"
    )
    f = tidy_frame({7: r})
    assert set(f.quantity) == {"barrier", "alphas", "loss[1]", "loss[2]"} and set(f.step) == {7}
    assert f[f.quantity == "loss[2]"].set_index("index")["value"].to_dict() == {1: 3.0, 2: 4.0}
    assert pd.isna(f[f.quantity == "barrier"]["index"].iloc[0])


def test_a_sweep_run_names_its_steps(tmp_path: Path) -> None:
    """A double-descent run keeps one checkpoint per model size at step = p: its figures say so."""
    import pandas as pd

    from dynascope.probes import figures

    frame = pd.DataFrame({"step": [10, 300], "index": [1, 1], "eigenvalue": [1.0, 2.0], "residual": 0.0,
                          "converged": True})  # fmt: skip
    fig = figures.relabel_steps(figures.topk_figure(frame), "n_features (checkpoint step)")
    assert fig.layout.xaxis.title.text == "n_features (checkpoint step)"
    assert "over training" not in fig.layout.title.text


def test_cli_and_notebook_sample_reuse_the_apps_stratified_results(swept, capsys) -> None:
    """The app's default on large splits is a class-stratified subset: the CLI (--sample) and the notebook
    (sample=) ask for the same key, so they find its results instead of computing them again."""
    app_result, _ = runner.run_probe(swept, "hessian_trace", step=5, params={"n_matvecs": 6, "seed": 0},
                                     max_samples=12, sample="stratified")  # fmt: skip
    argv = ["probe", "hessian_trace", str(swept.path), "--step", "5", "--max-samples", "12", "--sample",
            "stratified", "--param", "n_matvecs=6", "--param", "seed=0"]  # fmt: skip
    assert main(argv) == 0
    assert "(cached)" in capsys.readouterr().out
    view = dynascope.open_run(swept.path)
    again = view.probe("hessian_trace", step=5, max_samples=12, sample="stratified", n_matvecs=6, seed=0)
    assert again.estimate == app_result.estimate
    assert len(ResultStore(swept.path).list("hessian_trace")) == len(STEPS) + 1  # nothing computed twice


def test_export_of_a_multi_checkpoint_probe(swept, tmp_path: Path) -> None:
    """``ntk_trajectory`` keeps one result for its checkpoints (no step): exported whole, not refused."""
    runner.run_probe(swept, "ntk_trajectory", steps=[0, 20], max_samples=12)
    out = tmp_path / "ntk.csv"
    assert main(["export", str(swept.path), "--probe", "ntk_trajectory", "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert {"kernel_distance", "label_alignment"} <= set(frame.quantity)
    assert (
        main(["export", str(swept.path), "--probe", "ntk_trajectory", "--out", str(tmp_path / "n.html")]) == 0
    )
