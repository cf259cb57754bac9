"""Notebook API: dynascope.open_run frames, cached probes, Result.figure()/save()."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_cli import STEPS, make_run

import dynascope
from dynascope.models import RunError
from dynascope.probes.results import Result


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory):
    return dynascope.open_run(make_run(tmp_path_factory.mktemp("nb") / "run").path)


def test_open_run_frames(view) -> None:
    ck = view.checkpoints
    assert list(ck["step"]) == list(STEPS) and {"epoch", "file", "train_loss"} <= set(ck.columns)
    assert list(view.metrics["step"]) == list(STEPS)
    assert ck["train_loss"].tolist() == pytest.approx(view.metrics["train_loss"].tolist())
    assert view.steps == list(STEPS) and "mlp on xor" in repr(view)
    with pytest.raises(RunError, match="not a run folder"):
        dynascope.open_run(view.path / "checkpoints")


def test_probe_is_cached_and_results_frame(view) -> None:
    first = view.probe("hessian_eigenvalues", step=4, k=2)
    assert len(view.store.list("hessian_eigenvalues")) == 1
    again = view.probe("hessian_eigenvalues", step=4, k=2)
    assert len(view.store.list("hessian_eigenvalues")) == 1  # not recomputed
    torch.testing.assert_close(again.values, first.values.double())
    view.sweep("hessian_trace", n_matvecs=6, progress=False)
    frame = view.results
    assert isinstance(frame, pd.DataFrame)
    assert sorted(frame.loc[frame.probe == "hessian_trace", "step"]) == list(STEPS)
    traj = view.trajectory("hessian_trace")  # tidy: one row per step and quantity
    assert list(traj.columns) == ["step", "quantity", "index", "value"]
    assert sorted(set(traj["step"])) == list(STEPS) and {"estimate", "stderr"} <= set(traj["quantity"])
    eig = view.trajectory("hessian_eigenvalues")
    lam1 = eig[(eig.quantity == "values") & (eig["index"] == 1)]["value"]
    assert lam1.iloc[0] == pytest.approx(float(first.values[0]))
    assert list(view.figure("hessian_trace").data[0].x) == list(STEPS)  # every checkpoint on the x axis
    ((step, cached),) = view.cached("hessian_eigenvalues")
    assert step == 4 and isinstance(cached, Result)


def test_result_figure_and_save(view, tmp_path: Path) -> None:
    res = view.probe("hessian_eigenvalues", step=8, k=2)
    fig = res.figure()
    assert fig.data[-1].y == pytest.approx(res.values.tolist())
    for suffix in ("json", "csv", "parquet", "html"):
        res.save(tmp_path / f"r.{suffix}")
    assert json.loads((tmp_path / "r.json").read_text())["values"] == pytest.approx(res.values.tolist())
    assert pd.read_csv(tmp_path / "r.csv")["eigenvalue"].tolist() == pytest.approx(res.values.tolist())
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 2
    assert "plotly" in (tmp_path / "r.html").read_text().lower()
    with pytest.raises(ValueError, match="cannot save a result as '.txt'"):
        res.save(tmp_path / "r.txt")


@dataclass(frozen=True, kw_only=True)
class _Curve(Result):
    grid: torch.Tensor
    value: torch.Tensor
    scale: float


@dataclass(frozen=True, kw_only=True)
class _Scalars(Result):
    alpha: float
    beta: float
    label: str


def test_generic_figure_fallback() -> None:
    curve = _Curve(grid=torch.tensor([0.0, 1.0, 2.0]), value=torch.tensor([3.0, 1.0, 2.0]), scale=2.0,
                   meta={"probe": "curve"})  # fmt: skip
    fig = curve.figure()
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["value"].x) == [0.0, 1.0, 2.0] and list(by_name["value"].y) == [3.0, 1.0, 2.0]
    assert fig.layout.title.text == "curve" and fig.layout.xaxis.title.text == "grid"
    bars = _Scalars(alpha=0.5, beta=-1.0, label="x").figure(title="t")
    assert list(bars.data[0].x) == ["alpha", "beta"] and list(bars.data[0].y) == [0.5, -1.0]


def test_import_is_cheap_and_fresh_process_decodes_results(view) -> None:
    view.probe("hessian_eigenvalues", step=0, k=2)
    script = textwrap.dedent(f"""
        import sys
        import dynascope
        assert "torch" not in sys.modules and "pandas" not in sys.modules, "import dynascope is not lazy"
        run = dynascope.open_run({str(view.path)!r})
        print(type(run.cached("hessian_eigenvalues", step=0)[0][1]).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "HessianEigenResult"
