"""Browser checks (Playwright + Debian chromium) that the app's defaults give the right picture, with
numbers: the EoS headline on the run's own training data lies in the detector's band and matches the
sharpness logged in training; Neural collapse on a 97-class grokking run computes by default; the
double-descent default chart is test error on a linear axis with its peak at p = n.

The runs are small real recipe runs (EoS: 200 GD steps on the 1000 digits; grokking: 100 AdamW steps on
(a+b) mod 97; double descent: 2 trials of random features, n = 100), made once per module.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from test_app_e2e import E2E_MARKS, _no_errors, _open_run, _settle, _shot

pytestmark = E2E_MARKS
EOS_DEFAULTS = {"k": 1, "tol": 1e-3, "trace": False}  # the EoS page's parameters


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynascope import runner
    from dynascope.recipes import RECIPES

    root = tmp_path_factory.mktemp("e2e-defaults")
    eos = RECIPES["edge_of_stability"].run(root / "eos", small=True, progress=False, steps=200)
    # the page's default computation at the last checkpoint (all 1000 training samples, η from the run),
    # stored ahead so the browser test reads it; a page defaulting to other data would not find it
    last = eos.steps()[-1]
    runner.run_probe(eos, "sharpness", step=last, params={**EOS_DEFAULTS, "lr": 0.5})
    RECIPES["grokking"].run(root / "grok", small=True, progress=False, steps=100, n_checkpoints=3)
    RECIPES["double_descent"].run(
        root / "dd",
        small=True,
        progress=False,
        trials=2,
        n_train=100,
        p_grid=[20, 50, 90, 100, 110, 200, 400],
    )
    return root


def test_eos_headline_is_in_the_detector_band_on_the_training_data(root: Path, server: str, browser) -> None:
    from dynascope.models import Run
    from dynascope.recipes import detect_edge_of_stability

    page = _open_run(browser, server, "eos", "Edge of stability")
    _no_errors(page, "Edge of stability")
    assert page.get_by_text("Using all 1000 train samples (the data the run was trained on).").count() == 1
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="λ_max / (2/η)")
    metric.wait_for(timeout=30_000)
    ratio = float(metric.locator('[data-testid="stMetricValue"]').inner_text())
    lo, hi = inspect.signature(detect_edge_of_stability).parameters["band"].default
    assert lo <= ratio <= hi, (ratio, (lo, hi))
    logged = Run.open(root / "eos").metrics().dropna(subset=["sharpness_ratio"])
    assert ratio == pytest.approx(
        float(logged["sharpness_ratio"].iloc[-1]), rel=0.02
    )  # same data, same λ_max
    _shot(page, "defaults_edge_of_stability")
    page.close()


def test_neural_collapse_on_grokking_runs_by_default(server: str, browser) -> None:
    page = _open_run(browser, server, "grok", "Neural collapse")
    caption = page.get_by_text("class-stratified subset: 2048 of 4704 train samples, every class kept")
    assert caption.count() == 1, page.locator('[data-testid="stCaptionContainer"]').all_inner_texts()
    page.get_by_role("button", name="Compute NC1–NC4").click()
    page.wait_for_timeout(500)
    _settle(page, timeout=180_000)
    _no_errors(page, "Neural collapse")
    assert page.locator(".st-key-chart_nc_traj .js-plotly-plot").count() == 1
    assert page.locator(".st-key-chart_nc_detail .js-plotly-plot").count() == 1
    _shot(page, "defaults_neural_collapse_grokking")
    page.close()


def test_double_descent_default_is_test_error_with_its_peak_at_n(server: str, browser) -> None:
    page = _open_run(browser, server, "dd", "Double descent")
    _no_errors(page, "Double descent")
    plot = page.locator(".st-key-chart_dd_curve .js-plotly-plot")
    plot.wait_for(timeout=30_000)
    info = plot.evaluate(
        "el => ({type: el._fullLayout.yaxis.type, traces: el._fullData.map("
        "t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || [])}))})"
    )
    assert info["type"] == "log"  # both descents visible (the peak is 3 decades above the rest)
    names = [t["name"] for t in info["traces"]]
    assert "test_mse" in names and "train_mse" not in names, names
    test = next(t for t in info["traces"] if t["name"] == "test_mse")
    assert test["x"][test["y"].index(max(test["y"]))] == 100  # the peak at p = n = 100
    _shot(page, "defaults_double_descent")
    page.close()
