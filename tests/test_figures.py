"""The one figures module: every Result class has a drawer, one template, decade log ticks, file formats."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

import dynascope.probes as probes
from dynascope.probes import figures
from dynascope.probes.results import Result


def _result_classes() -> list[type]:
    out = []
    for name in probes.__all__:
        obj = getattr(probes, name)
        if isinstance(obj, type) and issubclass(obj, Result) and obj is not Result:
            out.append(obj)
    return out


def test_every_public_result_has_a_drawer() -> None:
    classes = _result_classes()
    assert len(classes) >= 12
    missing = [c.__name__ for c in classes if not any(k.__name__ in figures.DRAWERS for k in c.__mro__)]
    assert not missing, f"results drawn only by the generic fallback: {missing}"
    assert set(figures.DRAWERS) <= {c.__name__ for c in classes}, "a drawer for a class that does not exist"


def test_figure_delegates_and_uses_the_template() -> None:
    res = probes.hessian_eigenvalues(
        torch.nn.Linear(3, 2).double(),
        (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2).double()),
        k=2,
    )
    fig = res.figure(title="t")
    assert fig.layout.template.layout.colorway == figures.PALETTE  # the dynascope template, not plotly's
    assert fig.layout.title.text == "t"
    assert list(fig.data[-1].y) == pytest.approx(res.values.tolist())


def test_log_axes_tick_decades_only() -> None:
    fig = figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[1e-3, 10])))
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1
    assert fig.layout.yaxis.exponentformat == "power"
    frame = figures.nc_frame({})
    nc = figures.nc_figure(frame)
    assert nc.layout.yaxis.dtick == 1 and nc.layout.yaxis4.dtick is None  # NC4 is a fraction: linear


def test_quantities_figure_keeps_residuals_off_the_value_axis(tmp_path: Path) -> None:
    from dynascope.store import ResultStore

    store = ResultStore(tmp_path)
    model = torch.nn.Linear(3, 2).double()
    data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2).double())
    for step in (0, 1):
        store.put(
            "hessian_eigenvalues",
            f"h{step}",
            {"k": 2},
            probes.hessian_eigenvalues(model, data, k=2),
            step=step,
        )
    results = {s.step: s.result for s in store.list("hessian_eigenvalues")}
    fig = figures.quantities_figure(results)
    names = {t.name for t in fig.data}
    assert {"values_1", "values_2"} <= names and all(list(t.x) == [0, 1] for t in fig.data)
    assert not any(n.startswith(("residuals", "stderr")) for n in names)


def test_write_figure_formats(tmp_path: Path) -> None:
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    out = figures.write_figure(fig, tmp_path / "f.html")
    assert "plotly" in out.read_text()[:20000].lower()
    with pytest.raises(figures.ExportError, match="cannot write a figure as 'gif'"):
        figures.write_figure(fig, tmp_path / "f.gif")
    with pytest.raises(figures.ExportError, match="image format"):
        figures.figure_image(fig, "bmp")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium for kaleido")
@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_vector_formats(tmp_path: Path, fmt: str) -> None:
    out = figures.write_figure(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), tmp_path / f"f.{fmt}")
    head = out.read_bytes()[:200]
    assert (b"<svg" in head) if fmt == "svg" else head.startswith(b"%PDF")


def test_log_axis_within_one_decade_keeps_real_value_ticks() -> None:
    """Decade ticks only where the data spans decades; a loss from 0.05 to 0.5 has one decade tick (0.1),
    so it gets round value ticks instead (a bare axis, or Plotly's 2–9 digit labels, otherwise)."""
    narrow = figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[0.05, 0.5])))
    assert narrow.layout.yaxis.type == "log" and narrow.layout.yaxis.dtick is None
    assert list(narrow.layout.yaxis.tickvals) == [0.05, 0.1, 0.2, 0.5]
    assert list(narrow.layout.yaxis.ticktext) == ["0.05", "0.1", "0.2", "0.5"]
    few = figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[20, 55])))
    assert list(few.layout.yaxis.tickvals) == [20, 30, 40, 50]
    wide = figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[1e-30, 0.5])))
    assert wide.layout.yaxis.dtick == 4  # 30 decades: every 4th labelled, 8 labels (not 31 stacked)
    assert figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[1e-5, 0.5]))).layout.yaxis.dtick == 1


@pytest.mark.parametrize("lo", [1e-3, 1e-12, 1e-30, 1e-200])
def test_log_axes_print_at_most_eight_labels(lo: float) -> None:
    fig = figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[lo, 3.0])))
    dtick = fig.layout.yaxis.dtick
    labels = len(range(math.floor(math.log10(lo)), 1, dtick))
    assert labels <= figures.MAX_LOG_LABELS


def test_log_axis_over_a_range_without_round_values_still_has_labelled_ticks() -> None:
    """A loss from 1.0895 to 1.1 holds no 1–9 × 10ᵏ value: the ticks are multiples of a round step."""
    flat = figures.log_axis(go.Figure(go.Scatter(x=[1, 2, 3], y=[1.1, 1.095, 1.0895])))
    assert list(flat.layout.yaxis.tickvals) == [1.09, 1.095, 1.1]
    assert list(flat.layout.yaxis.ticktext) == ["1.09", "1.095", "1.1"]
    tiny = figures.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[0.31234, 0.31251])))
    ticks = list(tiny.layout.yaxis.tickvals)
    assert 3 <= len(ticks) <= 5 and all(0.31234 <= t <= 0.31251 for t in ticks), ticks


def test_log_spaced_checkpoints_are_drawn_on_a_log_step_axis() -> None:
    """Log-spaced checkpoints (0, 1, 3, …, 3000) go on a log axis of step + 1 with the steps kept in the
    hover text; evenly spaced ones (every 50 steps) and densities (x = eigenvalue) stay linear."""
    from dynascope.probes.figures.across import log_spaced

    model = torch.nn.Linear(3, 2).double()
    data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2).double())
    res = probes.hessian_eigenvalues(model, data, k=2)
    log_steps, even = [0, 1, 3, 10, 30, 100, 300, 1000, 3000], [0, 50, 100, 150, 200, 250]
    assert log_spaced(log_steps) and not log_spaced(even) and not log_spaced([0, 1, 2, 3])
    fig = figures.across_checkpoints(dict.fromkeys(log_steps, res))
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "step + 1 (log)"
    assert all(list(t.x) == [s + 1 for s in log_steps] for t in fig.data)
    assert list(fig.data[0].text) == [str(s) for s in log_steps] and "%{text}" in fig.data[0].hovertemplate
    linear = figures.across_checkpoints(dict.fromkeys(even, res))
    assert linear.layout.xaxis.type != "log" and all(list(t.x) == even for t in linear.data)
