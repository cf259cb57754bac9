"""Full-page Chromium screenshots of every app page (and of a run report), for looking at them one by one:

    python tests/screenshots.py RUNS_DIR OUT_DIR [REPORT.html ...]

Starts the app over ``RUNS_DIR`` (demos off), opens each page with the run it is about selected, waits
for the script to finish and saves ``OUT_DIR/<page>.png``; prints each page's height in screens."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from test_app_e2e import _no_errors, _open_run, _settle, app_server, chromium

#: (page title, run folder name or None for the one selected by default, file name)
PAGES = [
    ("Runs", "edge_of_stability", "runs"),
    ("Compare runs", "edge_of_stability", "compare"),
    ("Hessian", "edge_of_stability", "hessian"),
    ("Landscape", "edge_of_stability", "landscape"),
    ("Edge of stability", "edge_of_stability", "edge_of_stability"),
    ("Gradients", "edge_of_stability", "gradients"),
    ("Grokking", "grokking", "grokking"),
    ("Double descent", "double_descent", "double_descent"),
    ("LR transfer", "edge_of_stability", "lr_transfer"),
    ("Neural collapse", "neural_collapse", "neural_collapse"),
    ("Mode connectivity", "grokking", "mode_connectivity"),
    ("Hessian", "double_descent", "hessian_double_descent"),  # steps are model sizes
    ("Gradients", "neural_collapse", "gradients_neural_collapse"),  # negative noise-scale estimates
]
SCREEN_PX = 1000


def main(argv: list[str]) -> int:
    runs, out = Path(argv[0]), Path(argv[1])
    only = {n for n in (os.environ.get("PAGES") or "").split(",") if n}
    out.mkdir(parents=True, exist_ok=True)
    with app_server(runs, out / "streamlit.log") as url, chromium() as browser:
        for title, run, name in PAGES:
            if only and name not in only:
                continue
            page = _open_run(browser, url, run, None)
            if title != "Runs":
                links = page.locator('[data-testid="stSidebarNav"] a')
                links.filter(has=page.get_by_text(title, exact=True)).first.click()
                page.wait_for_timeout(1500)
            _settle(page, timeout=180_000)
            try:
                _no_errors(page, title)
                ok = "ok"
            except AssertionError as exc:
                ok = f"ERROR: {exc}"
            height = page.evaluate("document.documentElement.scrollHeight")
            page.screenshot(path=str(out / f"{name}.png"), full_page=True)
            print(f"{title:<20} {run:<20} {height / SCREEN_PX:5.1f} screens  {ok}", flush=True)
            page.close()
        for report in argv[2:]:
            page = browser.new_page(viewport={"width": 1280, "height": SCREEN_PX})
            page.goto(Path(report).resolve().as_uri())
            page.wait_for_timeout(1000)
            height = page.evaluate("document.documentElement.scrollHeight")
            page.screenshot(path=str(out / f"report_{Path(report).stem}.png"), full_page=True)
            print(f"report {report}: {height / SCREEN_PX:.1f} screens", flush=True)
            page.close()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main(sys.argv[1:]))
