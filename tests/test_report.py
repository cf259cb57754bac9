"""``dynascope report``: one self-contained HTML page of everything computed for a run plus SVG/CSV files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
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
    rep = build_report(run, tmp_path / "report.html", svg=False)  # static SVG: the slow demo-report test
    text = (tmp_path / "report.html").read_text()
    assert {"training loss", "hessian_eigenvalues", "neural_collapse"} <= set(rep.figures)
    # interactive figures, plotly.js loaded once from the files folder (not inlined: the page stays small)
    assert text.count('class="plotly-graph-div"') == len(rep.figures)
    assert text.count("plotly.min.js") == 1 and (rep.files_dir / "plotly.min.js").is_file()
    assert len(text) < 200_000
    ckpts = pd.read_csv(rep.files_dir / "checkpoints.csv")  # every checkpoint with the hash the store keys on
    assert [file_sha256(c.path) for c in run.checkpoints()] == ckpts["sha256"].tolist()
    assert "train split, 32 samples (first)" in text and "train split, 30 samples (stratified)" in text
    import torch

    assert f"torch {torch.__version__}" in text
    assert "class='verdict" in text or "Detector not applicable" in text  # the detector's verdict, or why not
    assert text.index("Detector") < text.index("<h2>") if "Detector" in text else True
    csvs = {p.name for p in rep.files_dir.glob("*.csv")}
    assert {"checkpoints.csv", "metrics.csv", "hessian_eigenvalues.csv", "neural_collapse.csv"} <= csvs
    eig = pd.read_csv(rep.files_dir / "hessian_eigenvalues.csv")  # tidy, parameters in the sidecar
    assert {"step", "quantity", "index", "value", "setting"} <= set(eig.columns) and "params" not in eig
    assert (rep.files_dir / "hessian_eigenvalues.params.json").is_file()


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
    assert "Report ready: " in _texts(at.caption) and "hessian_eigenvalues" in _texts(at.caption)
    payload = at.session_state["runs_report_payload"]
    assert payload[0] == str(run_with_results.path) and payload[2].count(b"<figure>") >= 3
    names = zipfile.ZipFile(io.BytesIO(payload[3])).namelist()
    assert "tiny_report.html" in names and any(n.endswith("hessian_eigenvalues.csv") for n in names)


# ------------------------------------------------------------------------------------------ demo reports
MAX_BYTES, MAX_SCREENS, SCREEN_PX = 3_000_000, 25, 1000


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every demo, with what a researcher computes walking the pages (``DYNASCOPE_TEST_DEMOS``: reuse a
    folder of demos built before)."""
    import os

    from report_demo import fill_like_the_pages

    from dynascope.recipes.demos import ensure_demos

    given = os.environ.get("DYNASCOPE_TEST_DEMOS")
    root = Path(given) if given else tmp_path_factory.mktemp("demos")
    for name, run in ensure_demos(root, progress=False).items():
        full = name in ("edge_of_stability", "neural_collapse")
        fill_like_the_pages(run, landscape=full, only=None if full else ("hessian_eigenvalues",))
    return root


def _page_height(html_path: Path) -> int:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1280, "height": SCREEN_PX})
        page.goto(html_path.as_uri())
        height = int(page.evaluate("document.documentElement.scrollHeight"))
        b.close()
    return height


@pytest.mark.slow
@pytest.mark.parametrize("name", ["double_descent", "neural_collapse", "edge_of_stability", "grokking"])
def test_demo_report_is_a_short_document(demo_root: Path, name: str, tmp_path: Path) -> None:
    """≤ 3 MB with its files and ≤ 25 screens; the verdict on the first screen; every probe drawn over
    its checkpoints; no raw table inline (the numbers are CSV files beside it)."""
    out = tmp_path / f"{name}.html"
    rep = build_report(demo_root / name, out, svg=CHROMIUM.exists())
    size = out.stat().st_size + sum(p.stat().st_size for p in rep.files_dir.iterdir())
    text = out.read_text()
    print(f"{name}: {size / 1e6:.2f} MB, {len(rep.figures)} figures, {len(rep.tables)} CSV tables")
    assert size <= MAX_BYTES
    assert text.count("<tr>") <= 120  # compact tables only
    if name in ("edge_of_stability", "double_descent", "grokking"):
        assert text.index("class='verdict") < text.index("<h2>")  # verdict before the first section
    if CHROMIUM.exists():  # static figures inline, no plotly.js: small and printable
        assert text.count("<figure><svg") == len(rep.figures) and "plotly.min.js" not in text
        assert len(list(rep.files_dir.glob("*.svg"))) == len(rep.figures)
        screens = _page_height(out) / SCREEN_PX
        print(f"{name}: {screens:.1f} screens")
        assert screens <= MAX_SCREENS


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_pdf(run_with_results, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import stat

    out = tmp_path / "r.html"
    assert main(["report", str(run_with_results.path), "--out", str(out), "--pdf"]) == 0
    pdf = tmp_path / "r.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and "PDF" in capsys.readouterr().out
    assert stat.S_IMODE(pdf.stat().st_mode) == 0o644 and stat.S_IMODE(out.stat().st_mode) == 0o644
    css = out.read_text()
    assert "@media print" in css and "@page" in css  # the browser's "Save as PDF" gets the same layout


def test_report_draws_a_multi_checkpoint_probe_whole(run_with_results, tmp_path: Path) -> None:
    """``ntk_trajectory`` is one result over several checkpoints (no step): drawn as it is, not dropped."""
    runner.run_probe(run_with_results, "ntk_trajectory", steps=[0, 20], max_samples=12)
    rep = build_report(run_with_results, tmp_path / "r.html", svg=False)
    assert "ntk_trajectory" in rep.figures and "ntk_trajectory" in rep.tables
    assert "Checkpoints [0, 20]." in (tmp_path / "r.html").read_text()
