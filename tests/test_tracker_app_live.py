"""A run tracked with dynascope.Tracker, open in the app while it trains: a writer process trains a small
model with the Tracker (checkpoints every 5 steps, λ_max every 10) while the Runs page is open in a real
headless Chromium; the page's live view shows new checkpoints and metrics rows without a reload."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_app_e2e import E2E_MARKS, REPO, _open_app, _shot, app_server
from test_app_e2e_live import _metric

from dynascope.tracker import run_status

pytestmark = E2E_MARKS

STEPS = 60
# trains to step 10, waits for the test's "go" file (the page is open), then trains on slowly
WRITER = textwrap.dedent(
    f"""
    import sys, time
    from pathlib import Path
    import torch, dynascope
    from dynascope.models import build
    torch.manual_seed(0)
    model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    go = Path(sys.argv[2])
    with dynascope.Tracker(sys.argv[1], model, data=(x, y), loss="cross_entropy", optimizer=opt,
                           schedule="linear", checkpoint_every=5, probes={{"lambda_max": 10}},
                           budget=None, heartbeat_s=0.5) as tr:
        tr.step(0)
        for s in range(1, {STEPS} + 1):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            tr.step(s, metrics={{"train_loss": loss.item()}})
            if s == 10:
                tr.flush()
                deadline = time.monotonic() + 120
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            if s > 10:
                time.sleep(0.3)
    """
)


def test_runs_page_follows_a_tracked_training_run(tmp_path: Path, browser) -> None:
    runs, go = tmp_path / "runs", tmp_path / "go"
    run_path = runs / "tracked"
    runs.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_path), str(go)], cwd=REPO,
                              stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (run_status(run_path) or {}).get("step") != 10:  # trained to step 10, rows flushed
            assert writer.poll() is None, writer.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer did not reach step 10 in time"
            time.sleep(0.2)
        with app_server(runs, tmp_path / "streamlit.log") as url:
            page = _open_app(browser, url)
            page.locator(".st-key-runs_live").wait_for(timeout=30_000)  # just written: followed by default
            assert _metric(page, "Latest checkpoint step") == "10"
            assert _metric(page, "Metric rows") == "11"  # rows 0..10 (the writer flushed at step 10)
            go.touch()
            seen_steps, seen_rows = {"10"}, {"11"}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                seen_steps.add(_metric(page, "Latest checkpoint step"))
                seen_rows.add(_metric(page, "Metric rows"))
                if str(STEPS) in seen_steps and str(STEPS + 1) in seen_rows:
                    break
                page.wait_for_timeout(500)
            assert writer.wait(timeout=60) == 0, writer.stderr.read().decode()[-3000:]
            assert str(STEPS) in seen_steps and str(STEPS + 1) in seen_rows, (seen_steps, seen_rows)
            # intermediate checkpoints and rows appeared as they were written, without a reload
            assert len({s for s in seen_steps if 10 < int(s) < STEPS}) >= 2, seen_steps
            assert len({r for r in seen_rows if 11 < int(r) < STEPS + 1}) >= 2, seen_rows
            assert _metric(page, "Checkpoints") == str(STEPS // 5 + 1)
            _shot(page, "runs_live_tracked")
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    status = run_status(run_path)
    assert status["state"] == "finished" and status["step"] == STEPS
