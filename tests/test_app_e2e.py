"""End-to-end tests of the workbench in a real headless Chromium (Debian ``chromium`` + Playwright).

The test starts ``streamlit run app/main.py`` on 127.0.0.1 with ``DYNASCOPE_RUNS_DIR`` pointing at a
temporary folder holding two tiny prepared runs, waits for ``/_stcore/health`` and for the page's
``data-test-script-state="notRunning"``, then drives the app like a user. Element screenshots of every
page go to ``artifacts/screenshots/`` (gitignored) for a reviewer to look at.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = [
    ("Hessian", "hessian"),
    ("Edge of stability", "edge_of_stability"),
    ("Gradients", "gradients"),
    ("Grokking", "grokking"),
    ("Double descent", "double_descent"),
    ("Neural collapse", "neural_collapse"),
    ("Mode connectivity", "mode_connectivity"),
    ("Landscape", "landscape"),
    ("Compare runs", "compare"),
]

E2E_MARKS = [  # every browser test module: pytestmark = E2E_MARKS
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium); CI always runs this",
    ),
]
pytestmark = E2E_MARKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the app at {url} did not become healthy within {timeout:.0f} s")


@contextmanager
def app_server(runs_dir: Path, log_path: Path) -> Iterator[str]:
    """``streamlit run app/main.py`` on a free loopback port over ``runs_dir`` (demos off): its URL."""
    env = {
        **os.environ,
        "DYNASCOPE_RUNS_DIR": str(runs_dir),
        "DYNASCOPE_DEMOS": "0",
        "BROWSER_PATH": str(CHROMIUM),
    }
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py"),
             "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def chromium() -> Iterator:
    """Debian's headless Chromium driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny prepared runs (the ``server`` fixture of conftest.py serves the module's ``root``)."""
    from test_app import make_tiny_run

    root = tmp_path_factory.mktemp("e2e-runs")
    make_tiny_run(root / "tiny-gd")
    make_tiny_run(root / "tiny-gd-seed1", seed=1)
    return root


def _settle(page, timeout: float = 60_000) -> None:
    """Wait until the script has finished running (and has started at least once)."""
    page.wait_for_selector('[data-test-script-state="notRunning"]', timeout=timeout)
    page.wait_for_timeout(300)  # let the last deltas render
    page.wait_for_selector('[data-test-script-state="notRunning"]', timeout=timeout)


def _goto_page(page, title: str) -> None:
    # the label's exact text: a link's icon renders as text too (the Hessian page's icon is "landscape")
    links = page.locator('[data-testid="stSidebarNav"] a')
    links.filter(has=page.get_by_text(title, exact=True)).first.click()
    page.wait_for_selector(f'h1:has-text("{title}")', timeout=60_000)
    _settle(page)


def _open_app(browser, url: str, height: int = 1800, **kwargs):
    """A new page (1400 px wide) on the app at ``url``, once its first page (Runs) has rendered."""
    page = browser.new_page(viewport={"width": 1400, "height": height}, **kwargs)
    page.goto(url)
    page.wait_for_selector('h1:has-text("Runs")', timeout=90_000)
    _settle(page)
    return page


def _open_run(browser, server: str, run: str, title: str | None, **kwargs):
    """A new page on the app, ``run`` selected on the Runs page, then the page ``title`` (if any) opened."""
    page = _open_app(browser, server, height=2000, **kwargs)
    page.get_by_role("combobox", name="Run folder").click()
    page.get_by_role("option", name=run, exact=True).click()
    _settle(page)
    if title is not None:
        _goto_page(page, title)
    return page


def _no_errors(page, title: str) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, f"{title} raised"
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0, f"{title} showed an error"


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator('[data-testid="stMain"]').screenshot(path=str(SHOTS / f"{name}.png"))


def test_select_run_hessian_chart_and_csv_download(server: str, browser, tmp_path: Path) -> None:
    page = _open_app(browser, server, accept_downloads=True)
    # select the run on the Runs page
    page.get_by_role("combobox", name="Run folder").click()
    page.get_by_role("option", name="tiny-gd-seed1", exact=True).click()
    _settle(page)
    page.locator('h3:has-text("tiny-gd-seed1")').wait_for(timeout=30_000)
    assert page.locator('[data-testid="stDataFrame"]').count() >= 1  # the checkpoints table
    _shot(page, "runs")
    # run a Hessian probe
    _goto_page(page, "Hessian")
    page.get_by_role("button", name="Compute top-k eigenvalues").click()
    chart = page.locator(".st-key-chart_hess_topk .js-plotly-plot")
    chart.wait_for(state="visible", timeout=120_000)
    _settle(page)
    assert page.locator(".st-key-chart_hess_topk .js-plotly-plot .scatterlayer .trace").count() >= 1
    _shot(page, "hessian_topk")
    # download the data as CSV and check the header
    with page.expect_download(timeout=30_000) as info:
        page.locator(".st-key-chart_hess_topk").get_by_role("button", name="CSV").click()
    path = tmp_path / "topk.csv"
    info.value.save_as(path)
    header = path.read_text().splitlines()[0]
    assert header == "step,index,eigenvalue,residual,converged"
    assert len(path.read_text().splitlines()) > 1
    # the result is cached: a reload of the page shows the chart without a compute button
    _goto_page(page, "Runs")
    _goto_page(page, "Hessian")
    page.locator(".st-key-chart_hess_topk .js-plotly-plot").wait_for(state="visible", timeout=30_000)
    assert page.get_by_role("button", name="Compute top-k eigenvalues").count() == 0
    page.close()


def test_every_page_renders_and_computes(server: str, browser) -> None:
    page = _open_app(browser, server)
    for title, name in PAGES:
        _goto_page(page, title)
        primary = page.locator('[data-testid="stBaseButton-primary"]:visible')
        if primary.count():  # compute the page's probe (tiny run: seconds)
            primary.first.click()
            page.wait_for_timeout(500)
            _settle(page, timeout=120_000)
        assert page.locator('[data-testid="stException"]').count() == 0, f"{title} raised"
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0, f"{title} showed an error"
        assert page.locator(".js-plotly-plot").count() >= 1, f"{title} shows no chart"
        _shot(page, name)
    page.close()


def test_landscape_surface_with_trajectory_and_opposing_signals(server: str, browser) -> None:
    page = _open_app(browser, server, height=2400)
    _goto_page(page, "Landscape")
    page.get_by_role("tab", name="Loss surface").click()
    page.get_by_role("button", name="Compute the trajectory plane").click()
    chart = page.locator(".st-key-chart_land_surface .js-plotly-plot")
    chart.wait_for(state="visible", timeout=120_000)
    _settle(page)
    plot = ".st-key-chart_land_surface .js-plotly-plot"
    types = page.evaluate(f"document.querySelector('{plot}').data.map(t => t.type)")
    assert types == ["contour", "scatter", "scatter"]  # the surface, the centre, the trajectory
    n_points = page.evaluate(f"document.querySelector('{plot}')._fullData[2]._length")
    assert n_points == 4  # the default checkpoint selection
    assert page.locator(f"{plot} .scatterlayer .trace").count() == 2
    assert page.get_by_text("Variance of the checkpoint offsets explained").count() == 1
    _shot(page, "landscape_surface")
    page.get_by_role("tab", name="Opposing signals").click()
    page.get_by_role("button", name="Find opposing signals").click()
    page.locator(".st-key-chart_land_opp .js-plotly-plot").wait_for(state="visible", timeout=120_000)
    _settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.get_by_text("examples selected").count() == 1
    _shot(page, "landscape_opposing")
    page.close()


def test_upload_corrupt_checkpoint_shows_error(server: str, browser) -> None:
    page = _open_app(browser, server, height=1000)
    page.locator('[data-testid="stExpander"] summary', has_text="Upload checkpoints").click()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[
            {"name": "broken.pt", "mimeType": "application/octet-stream", "buffer": b"not a checkpoint" * 8}
        ]
    )
    page.locator('[data-testid="stFileChip"]', has_text="broken.pt").wait_for(timeout=30_000)
    page.get_by_role("button", name="Create run from upload").click()
    alert = page.locator('[data-testid="stAlert"]', has_text="broken.pt")
    alert.first.wait_for(timeout=60_000)
    _settle(page)
    text = alert.first.inner_text()
    assert "not imported" in text and "not a valid torch checkpoint" in text
    assert page.locator('[data-testid="stAlertContentError"]', has_text="broken.pt").count() == 1
    assert page.locator('[data-testid="stException"]').count() == 0
    # the app keeps running: navigation still works
    _goto_page(page, "Hessian")
    _shot(page, "upload_error_then_hessian")
    page.close()
