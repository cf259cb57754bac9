"""Browser checks (Playwright + Debian chromium) of the research workflows, with numbers read from the page:
an Adam EoS run's headline is λ_max(P⁻¹H)/(38/η); Compare runs overlays two EoS runs as λ_max·η/2 (and the
Adam run as its preconditioned ratio); Mode connectivity trains a seed twin and shows the barrier before
and after weight matching; the report button writes a file with every computed figure.

The runs are small real recipe runs made once per module: ``edge_of_stability`` at η = 0.5 and 0.25 (200 GD
steps on the 1000 digits, λ_max logged every 50 steps) and ``edge_of_stability_adam`` (300 full-batch Adam
steps, optimizer state at steps 100, 200, 300). The tests run in file order: the Adam run's sharpness
(first test) and its seed twin's path (third) are what the overlay and the report then show.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app_e2e import E2E_MARKS, _no_errors, _open_run, _settle, _shot

pytestmark = E2E_MARKS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from dynascope.recipes import RECIPES

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("e2e-research")
    for name, lr in (("eos-lr0.5", 0.5), ("eos-lr0.25", 0.25)):
        RECIPES["edge_of_stability"].run(
            root / name, small=True, progress=False, lr=lr, steps=200, checkpoint_every=50
        )
    RECIPES["edge_of_stability_adam"].run(
        root / "adam", small=True, progress=False, steps=300, checkpoint_every=100
    )
    return root


def _metric(page, label: str) -> tuple[str, float]:
    """The label and value of the first metric whose label contains ``label``."""
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    box.wait_for(timeout=60_000)
    return (
        box.locator('[data-testid="stMetricLabel"]').inner_text(),
        float(box.locator('[data-testid="stMetricValue"]').inner_text()),
    )


def _traces(page, key: str) -> list[dict]:
    plot = page.locator(f".st-key-chart_{key} .js-plotly-plot")
    plot.wait_for(timeout=60_000)
    return plot.evaluate(
        "el => el._fullData.map(t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || [])}))"
    )


def _click_and_settle(page, button: str, timeout: float = 600_000) -> None:
    page.get_by_role("button", name=button).click()
    page.wait_for_timeout(500)
    _settle(page, timeout=timeout)


def test_adam_eos_headline_is_the_preconditioned_ratio(root: Path, server: str, browser) -> None:
    from dynascope.models import Run
    from dynascope.store import ResultStore

    page = _open_run(browser, server, "adam", "Edge of stability")
    _no_errors(page, "Edge of stability")
    assert page.get_by_text("Using all 1000 train samples (the data the run was trained on).").count() == 1
    if page.get_by_role("button", name="Compute sharpness").count():  # else the recipe filed its λ_max
        _click_and_settle(page, "Compute sharpness")
    _no_errors(page, "Edge of stability")
    label, value = _metric(page, "λ_max(P⁻¹H) / threshold")
    assert "38/η" in label and "(step 300)" in label, label
    stored = {
        s.step: s.result
        for s in ResultStore(root / "adam").list("sharpness")
        if s.result.preconditioned_lambda_max
    }
    assert sorted(stored) == [100, 200, 300]  # every checkpoint with optimizer state (step 0 has none)
    last = stored[300]
    assert last.preconditioned_threshold == pytest.approx(38 / 1e-3)
    assert value == pytest.approx(last.preconditioned_lambda_max / (38 / 1e-3), abs=1e-3)
    assert 0.85 <= value <= 1.2  # λ_max(P⁻¹H) has reached its threshold: Adam at the edge of stability
    _, plain = _metric(page, "plain GD ratio")
    assert plain == pytest.approx(last.lambda_max * 1e-3 / 2, rel=1e-2)  # λ_max(H) far below 2/η
    traces = {t["name"]: t for t in _traces(page, "eos_sharpness")}
    assert traces["λ_max(P⁻¹H) (preconditioned)"]["x"] == [100, 200, 300]
    assert traces["preconditioned threshold"]["y"] == pytest.approx([38_000.0] * 3)
    assert len(Run.open(root / "adam").steps()) == 4
    _shot(page, "research_eos_adam")
    page.close()


def test_compare_runs_overlays_two_eos_runs_in_units_of_the_edge(root: Path, server: str, browser) -> None:
    from dynascope.models import Run
    from dynascope.store import ResultStore

    page = _open_run(browser, server, "eos-lr0.5", "Compare runs")
    _no_errors(page, "Compare runs")
    traces = {t["name"]: t for t in _traces(page, "cmp_overlay")}
    for name in ("eos-lr0.5", "eos-lr0.25"):  # λ_max·η/2 from the sharpness each run logged
        logged = Run.open(root / name).metrics().dropna(subset=["sharpness_ratio"])
        assert traces[name]["x"] == logged["step"].tolist()
        assert traces[name]["y"] == pytest.approx(logged["sharpness_ratio"].tolist(), rel=1e-9)
    assert 0.9 <= traces["eos-lr0.5"]["y"][-1] <= 1.2  # η = 0.5 has reached its edge 2/η = 4 ...
    assert traces["eos-lr0.25"]["y"][-1] < traces["eos-lr0.5"]["y"][-1]  # ... η = 0.25 (2/η = 8) not yet
    edge = next(t for t in traces.values() if str(t["name"]).startswith("edge of stability"))
    assert set(edge["y"]) == {1.0}
    stored = {s.step: s.result for s in ResultStore(root / "adam").list("sharpness")}
    if stored:  # the first test computed the Adam run's sharpness: its ratio is the preconditioned one
        assert traces["adam"]["y"] == pytest.approx([stored[s].preconditioned_ratio for s in sorted(stored)])
    _shot(page, "research_compare_eos")
    page.close()


def test_mode_connectivity_seed_twin_barrier_before_and_after_alignment(
    root: Path, server: str, browser
) -> None:
    from dynascope.models import Run
    from dynascope.store import ResultStore

    page = _open_run(browser, server, "adam", "Mode connectivity")
    _no_errors(page, "Mode connectivity")
    assert page.get_by_text("No second run of this recipe yet.").count() == 1
    page.get_by_role("button", name="Train a seed twin").click()
    # the twin trains in the background (a progress bar); when it is done the page reruns and B is the twin
    page.locator('[data-testid="stCaptionContainer"]', has_text="trained in").wait_for(timeout=600_000)
    _settle(page)
    twin = Run.open(root / "adam-seed1")
    assert twin.config["seed"] == 1 and twin.steps() == [0, 100, 200, 300]
    shown = page.get_by_role("combobox", name="Run B").evaluate(
        "el => [el.value || '', el.getAttribute('aria-label') || '', el.closest('[data-testid=stSelectbox]')"
        ".textContent].join(' ')"
    )
    assert "adam-seed1" in shown, shown  # B defaults to the seed twin, not to the GD runs of the same shape
    _click_and_settle(page, "Compute the path")
    _no_errors(page, "Mode connectivity")
    _, after = _metric(page, "Loss barrier (weight matching)")
    _, before = _metric(page, "Loss barrier (no alignment)")
    assert before > after >= 0 and before > 0.05, (before, after)  # a real barrier, lowered by alignment
    stored = [s.result for s in ResultStore(root / "adam").list("lmc_barrier")]
    assert len(stored) == 1
    assert before == pytest.approx(stored[0].barrier_unaligned, rel=1e-3)
    assert after == pytest.approx(stored[0].barrier, rel=1e-3)
    _shot(page, "research_mode_connectivity_twin")
    page.close()


def test_report_button_writes_every_computed_figure(root: Path, server: str, browser, tmp_path: Path) -> None:
    from dynascope import runner
    from dynascope.models import Run
    from dynascope.store import ResultStore

    if not ResultStore(root / "adam").list():  # run alone: compute one probe (the others do it in order)
        runner.run_probe(Run.open(root / "adam"), "sharpness", step=300, params={"k": 1, "lr": 1e-3})
    page = _open_run(browser, server, "adam", None, accept_downloads=True)
    _click_and_settle(page, "Build the report", timeout=300_000)
    _no_errors(page, "Runs")
    with page.expect_download(timeout=60_000) as info:
        page.get_by_role("button", name="Report (HTML)").click()
    path = tmp_path / "report.html"
    info.value.save_as(path)
    text = path.read_text()
    probes = sorted({s.probe for s in ResultStore(root / "adam").list()})
    expected = 1 + len(probes)  # the training loss curve, then one figure per computed probe
    # figures are static SVG when Chromium can draw them, interactive Plotly otherwise (dynascope/report.py)
    assert text.count("<figure><svg") + text.count('class="plotly-graph-div"') == expected
    for probe in probes:
        assert f"<h3>{probe}</h3>" in text
    assert page.get_by_text(f"Report ready: {expected} figures").count() == 1
    _shot(page, "research_report")
    page.close()
