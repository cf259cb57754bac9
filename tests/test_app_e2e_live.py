"""Live runs in the browser: a writer process appends checkpoints and metrics.csv rows to a run while
its Runs page is open; the page follows them (polling the run folder) without a reload."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_app_e2e import E2E_MARKS, REPO, _open_app, _shot, app_server

pytestmark = E2E_MARKS

WRITER = textwrap.dedent(
    """
    import sys, time
    from dynascope.models import Run
    run = Run.open(sys.argv[1])
    model = run.load_model(run.steps()[-1])
    for i in range(1, 7):
        time.sleep(1.5)
        step = 20 + 5 * i
        run.log_metrics([{"step": step, "train_loss": 1.0 / step, "test_loss": 1.2 / step, "lr": 0.2}])
        run.save_checkpoint(model, step)
    """
)


@pytest.fixture()
def live_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    from test_app import make_tiny_run

    make_tiny_run(tmp_path / "runs" / "live")
    with app_server(tmp_path / "runs", tmp_path / "streamlit.log") as url:
        yield url, tmp_path / "runs" / "live"


def _metric(page, label: str) -> str:
    box = page.locator('.st-key-runs_live [data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def test_runs_page_follows_a_run_being_written(live_server, browser) -> None:
    url, run_path = live_server
    page = _open_app(browser, url)
    page.locator(".st-key-runs_live").wait_for(timeout=30_000)  # just written: followed by default
    assert _metric(page, "Latest checkpoint step") == "20"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_path)], cwd=REPO)
    try:
        seen = {"20"}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen.add(_metric(page, "Latest checkpoint step"))
            if "50" in seen:
                break
            page.wait_for_timeout(500)
        assert writer.wait(timeout=60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert "50" in seen and len(seen) >= 3, seen  # intermediate steps appeared too, no reload
    page.wait_for_timeout(2500)
    assert _metric(page, "Checkpoints") == "10"  # 4 + 6 new
    assert int(_metric(page, "Metric rows")) == 21 + 6
    # the checkpoint and metrics tables below follow the folder too (no reload)
    assert page.get_by_text("Checkpoints (10)", exact=True).count() == 1
    assert page.get_by_text("Logged metrics (27 rows of", exact=False).count() == 1
    grids = page.locator('[data-testid="stDataFrame"] [role="grid"]')
    rows = [grids.nth(i).get_attribute("aria-rowcount") for i in range(2)]
    assert rows == [str(10 + 1), str(27 + 1)], rows  # header + one row per checkpoint / metrics row
    _shot(page, "runs_live")
