"""``dynascope report``: one self-contained HTML page of everything computed for a run plus SVG/CSV files."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app import make_tiny_run

from dynascope import runner
from dynascope.cli import main
from dynascope.models.checkpoints import file_sha256
from dynascope.report import build_report

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_with_results(tmp_path_factory: pytest.TempPathFactory):
    run = make_tiny_run(tmp_path_factory.mktemp("rep") / "tiny", extra={"phenomenon": "edge_of_stability"})
    runner.sweep(run, "hessian_eigenvalues", [5, 20], params={"k": 2}, max_samples=32)
    runner.run_probe(run, "neural_collapse", step=20, sample="stratified", max_samples=30)
    return run


def test_report_holds_every_computed_figure_table_and_the_meta(run_with_results, tmp_path: Path) -> None:
    run = run_with_results
    rep = build_report(run, tmp_path / "report.html", svg=CHROMIUM.exists())
    text = (tmp_path / "report.html").read_text()
    assert text.count('class="plotly-graph-div"') == len(rep.figures) >= 3  # loss, 2 probes
    assert text.count("* plotly.js v") == 1  # plotly.js embedded once: the page opens offline
    assert "hessian_eigenvalues across checkpoints" in rep.figures and "neural_collapse" in rep.figures
    for c in run.checkpoints():  # every checkpoint with the hash the store keys on
        assert file_sha256(c.path) in text
    assert "train split, 32 samples (first)" in text and "train split, 30 samples (stratified)" in text
    import torch

    assert f"<td>{torch.__version__}</td>" in text
    assert "Detector evidence" in text  # a phenomenon run gets its detector's verdict (or why not)
    csvs = {p.name for p in rep.files_dir.glob("*.csv")}
    assert {
        "checkpoints.csv",
        "metrics.csv",
        "hessian_eigenvalues_results.csv",
        "neural_collapse_results.csv",
    } <= csvs
    if CHROMIUM.exists():
        assert len(list(rep.files_dir.glob("*.svg"))) == len(rep.figures)


def test_report_cli(run_with_results, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(run_with_results.path), "--out", str(out), "--no-svg"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(out)]) != 0
    assert "is not a run folder" in capsys.readouterr().err


def test_runs_page_builds_the_report_in_one_click(run_with_results, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import zipfile

    from test_app import _app, _texts

    at = _app(run_with_results.path.parent, monkeypatch)
    at.button(key="runs_report_build").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert "Report ready: " in _texts(at.caption) and "hessian_eigenvalues across checkpoints" in _texts(
        at.caption
    )
    payload = at.session_state["runs_report_payload"]
    assert payload[0] == str(run_with_results.path) and payload[2].count(b'class="plotly-graph-div"') >= 3
    names = zipfile.ZipFile(io.BytesIO(payload[3])).namelist()
    assert "tiny_report.html" in names and any(n.endswith("hessian_eigenvalues_results.csv") for n in names)
