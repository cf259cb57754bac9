"""One result → its figure (:func:`draw`); one probe's ``{step: Result}`` → a figure with every step on
x (:func:`across_checkpoints`, else one panel per quantity: :func:`quantities_figure`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..results import Result
from . import collapse, connectivity, curvature, gradients, landscape, ntk
from .base import PALETTE, ExportError, finish, log_axis


def generic(result: Result, *, title: str | None = None) -> go.Figure:
    """Fallback for results without a drawer: plots :meth:`Result.to_frame`.

    One row: a bar per numeric column. Several rows: one line per numeric column against the first
    column when it is numeric and increasing (e.g. a grid), else against the row number.
    """
    frame = result.to_frame()
    numeric = [
        c for c in frame.columns
        if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
    ]  # fmt: skip
    name = str(result.meta.get("probe") or type(result).__name__)
    fig = go.Figure()
    if len(frame) <= 1:
        fig.add_trace(go.Bar(x=[str(c) for c in numeric], y=[frame[c].iloc[0] for c in numeric]))
        fig.update_layout(xaxis_title="quantity", yaxis_title="value")
    else:
        x_col = numeric[0] if numeric and frame[numeric[0]].is_monotonic_increasing else None
        x = frame[x_col].tolist() if x_col is not None else list(range(1, len(frame) + 1))
        for c in numeric:
            if c != x_col:
                fig.add_trace(go.Scatter(x=x, y=frame[c].tolist(), mode="lines+markers", name=str(c)))
        fig.update_layout(xaxis_title=str(x_col or "row"), yaxis_title="value")
    return finish(fig, title or name)


DRAWERS: dict[str, Callable[..., go.Figure]] = {
    "HessianEigenResult": curvature.hessian_eigenvalues,
    "LayerwiseHessianResult": curvature.layerwise_hessian,
    "BlockwiseSpectraResult": curvature.blockwise_spectra,
    "TraceResult": curvature.hessian_trace,
    "DensityResult": curvature.hessian_density,
    "SharpnessResult": curvature.sharpness,
    "AdaptiveSharpnessResult": curvature.adaptive_sharpness,
    "AverageSharpnessResult": curvature.average_sharpness,
    "SharpnessTrackResult": curvature.sharpness_track,
    "CoherenceResult": gradients.gradient_coherence,
    "NeuralCollapseResult": collapse.neural_collapse,
    "NeuralCollapseTrajectoryResult": collapse.nc_trajectory,
    "LMCResult": connectivity.lmc,
    "NTKResult": ntk.ntk,
    "NTKTrajectoryResult": ntk.ntk_trajectory,
    "HessianDiagonalResult": curvature.hessian_diagonal,
    "LandscapeResult": landscape.loss_landscape,
    "OpposingSignalsResult": landscape.opposing_signals,
}


def draw(result: Result, **kwargs: Any) -> go.Figure:
    """The figure of one result: its class's drawer (see :data:`DRAWERS`), else :func:`generic`."""
    for cls in type(result).__mro__:
        drawer = DRAWERS.get(cls.__name__)
        if drawer is not None:
            return drawer(result, **kwargs)
    return generic(result, **kwargs)


_MAX_VECTOR = 16  # vectors up to this length become one trajectory line per entry
_SKIP_SERIES = {"n_matvecs"}
#: Kept in tables but not drawn on the values' axis of a trajectory (residuals, standard errors).
_NOT_DRAWN = {"residuals", "stderr", "trace_stderr"}


def scalar_series(result: Any) -> dict[str, float]:
    """The plottable numbers of a result: finite scalars and short vectors (``name_1..name_k``)."""
    out: dict[str, float] = {}
    for name, value in result.to_dict().items():
        if name == "meta" or name in _SKIP_SERIES or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif (
            isinstance(value, list)
            and 0 < len(value) <= _MAX_VECTOR
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            for i, v in enumerate(value, 1):
                out[f"{name}_{i}"] = float(v)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def quantities_figure(results: Mapping[int, Any], *, x_title: str = "step", max_panels: int = 8) -> go.Figure:
    """Every plottable number of ``{step: Result}`` (:func:`scalar_series`) against the step: one panel per
    quantity, each on its own y axis (a short vector ``name_1..name_k``: one line per entry in the panel
    of ``name``); residuals and standard errors stay in the tables. At most ``max_panels`` panels."""
    steps = sorted(results)
    series: dict[str, dict[str, list[float | None]]] = {}
    for i, st in enumerate(steps):
        for name, v in scalar_series(results[st]).items():
            base, _, tail = name.rpartition("_")
            panel = base if tail.isdigit() and base else name
            if panel in _NOT_DRAWN or panel in _SKIP_SERIES:
                continue
            series.setdefault(panel, {}).setdefault(name, [None] * len(steps))[i] = v
    panels = list(series)[:max_panels]
    if not panels:
        raise ExportError("no numbers to plot across checkpoints")
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels,
                        vertical_spacing=min(0.08, 0.3 / len(panels)))  # fmt: skip
    for row, panel in enumerate(panels, 1):
        for j, (name, ys) in enumerate(series[panel].items()):
            fig.add_trace(
                go.Scatter(x=steps, y=ys, mode="lines+markers", name=name, line={"color": PALETTE[j % 8]},
                           showlegend=len(series[panel]) > 1),
                row=row, col=1,
            )  # fmt: skip
    fig.update_xaxes(title_text=x_title, row=len(panels), col=1)
    probe = next(iter(results.values())).meta.get("probe") or type(next(iter(results.values()))).__name__
    return finish(fig, f"{probe} across checkpoints", height=max(360, 110 + 200 * len(panels)))


def _sharpness_across(results: Mapping[int, Any]) -> go.Figure:
    frame = curvature.sharpness_frame(results)
    return curvature.sharpness_figure(frame, frame[["step", "lr", "two_over_lr"]].dropna())


#: Result class name → its figure of ``{step: Result}`` (one checkpoint per point or line); results of
#: other classes get :func:`quantities_figure`.
ACROSS: dict[str, Callable[[Mapping[int, Any]], go.Figure]] = {
    "HessianEigenResult": lambda rs: curvature.topk_figure(curvature.topk_frame(rs)),
    "DensityResult": lambda rs: curvature.density_figure(curvature.density_frame(rs), log_y=True),
    "TraceResult": lambda rs: curvature.trace_figure(curvature.trace_frame(rs)),
    "SharpnessResult": _sharpness_across,
    "NeuralCollapseResult": lambda rs: collapse.nc_figure(collapse.nc_frame(rs)),
    "CoherenceResult": lambda rs: gradients.coherence_figure(gradients.coherence_frame(rs)),
}


#: Figures across checkpoints whose x axis is not the step (a density's x is the eigenvalue).
_X_NOT_STEP = {"DensityResult"}


def across_checkpoints(results: Mapping[int, Any], *, x_title: str = "step") -> go.Figure:
    """The figure of one probe's ``{step: Result}``: every step on the x axis (see :data:`ACROSS`); on a
    log axis of step + 1 when the checkpoints are log-spaced (:func:`log_spaced`), so the early ones do
    not pile up at the left edge."""
    if not results:
        raise ExportError("no results to plot across checkpoints")
    first = next(iter(results.values()))
    name = next((c.__name__ for c in type(first).__mro__ if c.__name__ in ACROSS), None)
    fig = ACROSS[name](results) if name else quantities_figure(results, x_title=x_title)
    if x_title == "step" and name not in _X_NOT_STEP and log_spaced(list(results)):
        return log_steps(fig)
    return relabel_steps(fig, x_title)


def log_spaced(steps: Sequence[int]) -> bool:
    """Checkpoints spread over ≥ 2 decades with gaps that grow ≥ 10× (``checkpoint_steps="log"``), as
    opposed to evenly spaced ones, whose constant gaps read best on a linear axis."""
    s = sorted({int(v) for v in steps})
    if len(s) < 4 or (s[-1] + 1) / (s[0] + 1) < 100:
        return False
    gaps = np.diff(s)
    return bool(gaps[-1] >= 10 * gaps[0])


def log_steps(fig: go.Figure) -> go.Figure:
    """Every trace's x (a step) drawn at step + 1 on a decade-ticked log axis titled so; hover texts
    still name the step."""
    for trace in fig.data:
        if getattr(trace, "x", None) is None:
            continue
        x = np.asarray(trace.x, dtype=float)
        hover = trace.hovertemplate or "step %{x}<br>%{y:.6g}<extra></extra>"
        if trace.text is None and "%{x}" in hover:
            trace.update(text=[f"{v:g}" for v in x], hovertemplate=hover.replace("%{x}", "%{text}"))
        trace.update(x=x + 1)
    log_axis(fig, "x")
    return fig.for_each_xaxis(lambda ax: ax.update(title_text="step + 1 (log)") if ax.title.text else None)


def relabel_steps(fig: go.Figure, x_title: str) -> go.Figure:
    """Name what the checkpoints' steps are when they are not training steps (a double-descent sweep keeps
    one checkpoint per model size at ``step = p``): the x titles become ``x_title`` and "over training"
    in the title becomes "against ``x_title``". ``x_title == "step"`` leaves the figure as it is."""
    if x_title == "step":
        return fig
    fig.for_each_xaxis(lambda ax: ax.update(title_text=x_title) if ax.title.text else None)
    text = fig.layout.title.text or ""
    return fig.update_layout(title={"text": text.replace("over training", f"against {x_title}")})
