"""Every figure dynascope draws, in one module: ``Result.figure()``, the app's pages and the CLI exports.

Results are plain data; the functions here draw them. Three groups:

* one result → a figure: :func:`draw` (``Result.figure()`` is a thin delegate) picks the drawer
  registered for the result's class (walking its bases), else :func:`generic`;
* ``{step: Result}`` → a tidy frame (``*_frame``, what downloads hold) → a figure across checkpoints
  (``*_figure``), used by the app and reports;
* any probe's ``{step: Result}`` → :func:`across_checkpoints` (the figure above for its class, else one
  panel per quantity: :func:`quantities_figure`); :mod:`dynascope.trajectories` feeds it from a result
  store for the notebook, the CLI export and the report.

All figures use the ``"dynascope"`` Plotly template (:data:`TEMPLATE`): white background, one
colour-blind-safe palette (Okabe–Ito), readable font sizes, legends above the plot area, and log axes
ticked at decades only (:func:`log_axis`). Notebooks can make it their default with
:func:`use_paper_template`. :func:`write_html` / :func:`write_png` / :func:`write_figure` save figures
(HTML embeds plotly.js; PNG/SVG/PDF go through kaleido and a Chrome/Chromium browser).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .collapse import NC_FIELDS
from .results import Result, atomic_write_bytes

TEMPLATE = "dynascope"
#: Okabe & Ito (2008) colour-blind-safe palette, black last.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_AXIS = {
    "showline": True,
    "linecolor": "#444",
    "ticks": "outside",
    "showgrid": True,
    "gridcolor": "#ececec",
    "zeroline": False,
    "automargin": True,
    "title": {"font": {"size": 15}},
}
pio.templates[TEMPLATE] = go.layout.Template(
    layout={
        "font": {"family": "Helvetica, Arial, sans-serif", "size": 14, "color": "#222"},
        "colorway": list(PALETTE),
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "xaxis": _AXIS,
        "yaxis": _AXIS,
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0},
        "title": {"font": {"size": 17}, "x": 0, "xanchor": "left", "y": 0.98, "yanchor": "top"},
        "margin": {"l": 70, "r": 24, "t": 96, "b": 60},
        "hoverlabel": {"font": {"size": 13}},
    }
)


def use_paper_template() -> None:
    """Make the dynascope template Plotly's default (for figures a notebook draws itself)."""
    pio.templates.default = TEMPLATE


def _axis_values(fig: go.Figure, axis: str, where: Mapping[str, Any]) -> np.ndarray:
    """The positive finite values the traces put on ``axis`` ("x" or "y"); with ``row``/``col`` in
    ``where``, only those of that subplot."""
    ref = None
    if "row" in where and "col" in where:
        try:
            sub = fig.get_subplot(where["row"], where["col"])
            ref = getattr(sub, f"{axis}axis").plotly_name.replace("axis", "")  # "yaxis2" -> "y2"
        except Exception:  # noqa: BLE001 - not a subplot grid: every trace counts
            ref = None
    out: list[float] = []
    for trace in fig.data:
        if ref is not None and (getattr(trace, f"{axis}axis", None) or axis) != ref:
            continue
        values = getattr(trace, axis, None)
        if values is None:
            continue
        try:
            arr = np.asarray(values, dtype=float).ravel()
        except (TypeError, ValueError):
            continue
        out.extend(arr[np.isfinite(arr) & (arr > 0)].tolist())
    return np.asarray(out, dtype=float)


def _log_ticks(vmin: float, vmax: float) -> list[float]:
    """Round tick values in range: 1, 2, 5 × 10ᵏ; all of 1–9 × 10ᵏ when that gives fewer than three;
    for a range narrower than that (a loss from 1.09 to 1.10), multiples of a round step (1, 2 or 5 ×
    10ᵏ, at most five ticks)."""
    lo, hi = math.floor(math.log10(vmin)) - 1, math.ceil(math.log10(vmax)) + 1
    for mantissas in ((1, 2, 5), tuple(range(1, 10))):
        ticks = [
            float(f"{m * 10.0**k:.12g}")
            for k in range(lo, hi + 1)
            for m in mantissas
            if vmin / 1.05 <= m * 10.0**k <= vmax * 1.05
        ]
        if len(ticks) >= 3:
            return ticks
    if vmax > vmin:
        base = 10.0 ** math.floor(math.log10((vmax - vmin) / 4))
        step = next(m * base for m in (1, 2, 5, 10) if (vmax - vmin) / (m * base) <= 5)
        first, last = math.ceil(vmin / step), math.floor(vmax / step)
        linear = [float(f"{j * step:.12g}") for j in range(first, last + 1)]
        if len(linear) > len(ticks):
            return linear
    return ticks


#: A log axis over more decades than this labels every 2nd (3rd, …) decade: stacked labels read as noise.
MAX_LOG_LABELS = 8


def log_axis(fig: go.Figure, axis: str = "y", **where: Any) -> go.Figure:
    """A log axis ticked at decades only (10⁻³, 10⁻², …; every k-th decade when the data spans more than
    :data:`MAX_LOG_LABELS` of them), never the 2–9 minor labels. When the data
    holds fewer than three decade ticks (it spans about two decades or less), the ticks are round values
    (0.1, 0.2, 0.5, 1) labelled in full, where decades alone would leave the axis bare."""
    update = fig.update_yaxes if axis == "y" else fig.update_xaxes
    values = _axis_values(fig, axis, where)
    every = 1
    if len(values):
        vmin, vmax = float(values.min()), float(values.max())
        decades = math.floor(math.log10(vmax)) - math.ceil(math.log10(vmin)) + 1
        if decades < 3:
            ticks = _log_ticks(vmin, vmax)
            update(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks], **where)
            return fig
        every = math.ceil(decades / MAX_LOG_LABELS)
    update(type="log", dtick=every, exponentformat="power", showexponent="all", **where)
    return fig


def _finish(fig: go.Figure, title: str, **layout: Any) -> go.Figure:
    """Title and template; with subplot titles the legend goes above them (it would cover them)."""
    fig.update_layout(title={"text": title}, template=TEMPLATE, **layout)
    if fig.layout.annotations and "legend" not in layout and len(fig.data) > 1:
        fig.update_layout(legend={"y": 1.06}, margin={"t": 120})
    return fig


def _num(v: Any) -> float:
    """A float (NaN for None / non-numbers)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _list(v: Any) -> list[float]:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return [_num(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


# =============================================================================== one result
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
    return _finish(fig, title or name)


def hessian_eigenvalues(result: Any, *, title: str | None = None) -> go.Figure:
    """Stem plot of the eigenvalues (unconverged ones as crosses), residuals in the hover text."""
    vals, res = _list(result.values), _list(result.residuals)
    conv = [bool(c) for c in _list(result.converged)]
    idx = list(range(1, len(vals) + 1))
    fig = go.Figure()
    for i, v in zip(idx, vals):
        fig.add_trace(go.Scatter(x=[i, i], y=[0, v], mode="lines", line={"color": "#999"}, showlegend=False))
    fig.add_trace(
        go.Scatter(
            x=idx,
            y=vals,
            mode="markers",
            marker={"size": 10, "symbol": ["circle" if c else "x" for c in conv], "color": PALETTE[0]},
            text=[f"residual {r:.2e}, {'converged' if c else 'NOT converged'}" for r, c in zip(res, conv)],
            name="eigenvalue",
        )
    )
    op = result.meta.get("operator", "hessian")
    fig.update_layout(xaxis_title="index i", yaxis_title="eigenvalue λ_i")
    return _finish(fig, title or f"Top eigenvalues of the {op} ({result.meta.get('reduction', '')})")


def layerwise_hessian(result: Any, *, value: str = "lambda_1", title: str | None = None) -> go.Figure:
    """Bar chart of one column of ``to_frame()`` per layer (``trace`` gets ±2 s.e. error bars)."""
    frame = result.to_frame()
    if value not in frame.columns:
        raise ValueError(f"value must be one of {list(frame.columns[2:])}; got {value!r}")
    err = {"type": "data", "array": (2 * frame["trace_stderr"]).tolist()} if value == "trace" else None
    fig = go.Figure(go.Bar(x=frame["layer"], y=frame[value], error_y=err, name=value))
    fig.update_layout(xaxis_title="layer", yaxis_title=value)
    op = result.meta.get("operator", "hessian")
    return _finish(fig, title or f"{value} per layer ({op} diagonal blocks)")


def hessian_trace(result: Any, *, title: str | None = None) -> go.Figure:
    """Running estimate over the stochastic samples with the final ±2 s.e. band."""
    s = np.asarray(_list(result.samples), dtype=np.float64)
    running = (result.lowrank_trace + np.cumsum(s) / np.arange(1, s.size + 1)).tolist()
    lo, hi = result.estimate - 2 * result.stderr, result.estimate + 2 * result.stderr
    fig = go.Figure(
        go.Scatter(x=list(range(1, s.size + 1)), y=running, mode="lines+markers", name="running estimate")
    )
    fig.add_hrect(y0=lo, y1=hi, fillcolor=PALETTE[4], opacity=0.2, line_width=0, annotation_text="±2 s.e.")
    fig.add_hline(y=result.estimate, line_dash="dash")
    fig.update_layout(xaxis_title="stochastic samples", yaxis_title="trace estimate")
    head = (
        f"Trace ({result.method}, {result.n_matvecs} products): {result.estimate:.6g} ± {result.stderr:.2g}"
    )
    return _finish(fig, title or head)


#: A log density axis shows this many decades below the peak: Gaussian tails between isolated eigenvalues
#: fall to 1e-300, which would read as structure.
DENSITY_DECADES = 6


def _density_floor(y: Sequence[float]) -> list[float]:
    """Densities clipped from below at ``peak · 10^−DENSITY_DECADES`` (the bottom of a log axis)."""
    arr = np.asarray(y, dtype=np.float64)
    peak = float(np.nanmax(arr)) if arr.size and np.isfinite(arr).any() else 1.0
    return np.maximum(arr, peak * 10.0**-DENSITY_DECADES).tolist()


def hessian_density(result: Any, *, log_y: bool = False, title: str | None = None) -> go.Figure:
    """The SLQ density (optional log y-axis, which shows the bulk and the outliers at once)."""
    y = _list(result.density)
    if log_y:
        y = _density_floor(y)
    fig = go.Figure(go.Scatter(x=_list(result.grid), y=y, mode="lines", name="density"))
    fig.update_layout(
        xaxis_title="log₁₀ |eigenvalue|" if result.log_scale else "eigenvalue", yaxis_title="density"
    )
    if log_y:
        log_axis(fig)
    scale = "decades" if result.log_scale else "λ units"
    return _finish(fig, title or f"Spectral density (SLQ, σ = {result.sigma:.3g} {scale})")


def sharpness(result: Any) -> go.Figure:
    """Top-k eigenvalues (and the batch λ_max distribution) against the 2/η threshold."""
    fig = go.Figure()
    fig.add_scatter(
        x=[f"λ{i + 1}" for i in range(len(result.eigenvalues))],
        y=_list(result.eigenvalues),
        mode="markers",
        marker={"size": 10},
        name="full-batch eigenvalues",
    )
    if result.batch_lambdas:
        fig.add_box(
            y=result.batch_lambdas,
            x=["batch λ_max"] * len(result.batch_lambdas),
            name=f"b={result.batch_size}",
        )
    if result.two_over_lr is not None:
        fig.add_hline(y=result.two_over_lr, line_dash="dash", annotation_text="2/η")
    title = f"λ_max = {result.lambda_max:.4g}"
    if result.trace is not None:
        title += f", tr(H) = {result.trace:.4g}"
    if result.ratio is not None:
        title += f", λ_max/(2/η) = {result.ratio:.3g}"
    fig.update_layout(yaxis_title="Hessian eigenvalue")
    return _finish(fig, title)


def adaptive_sharpness(result: Any) -> go.Figure:
    """The worst-case loss increase after each ascent step."""
    steps = list(range(1, len(result.step_values) + 1))
    fig = go.Figure(go.Scatter(x=steps, y=result.step_values, mode="lines+markers"))
    fig.update_layout(xaxis_title="ascent step", yaxis_title="L(w+ε) − L(w)")
    return _finish(fig, f"Adaptive sharpness (ρ={result.rho}, η={result.eta}) = {result.sharpness:.4g}")


def average_sharpness(result: Any) -> go.Figure:
    """Histogram of the Monte Carlo loss increases."""
    fig = go.Figure(go.Histogram(x=result.samples))
    fig.update_layout(xaxis_title="L(w+ε) − L(w)", yaxis_title="count")
    head = f"Average-case sharpness (σ={result.sigma}) = {result.sharpness:.4g} ± {result.stderr:.2g}"
    return _finish(fig, head)


def sharpness_track(result: Any) -> go.Figure:
    """λ_max (and the other top-k) vs step with the 2/η line (left); training loss, log scale (right)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("sharpness vs 2/η", "training loss"))
    for j in range(1, result.k):
        fig.add_trace(
            go.Scatter(
                x=result.steps,
                y=[v[j] if j < len(v) else None for v in result.top_k],
                mode="lines",
                name=f"λ_{j + 1}",
                line={"width": 1},
                opacity=0.6,
            ),
            row=1,
            col=1,
        )
    fig.add_trace(go.Scatter(x=result.steps, y=result.lambda_max, mode="lines+markers", name="λ_max"), 1, 1)
    fig.add_trace(
        go.Scatter(x=result.steps, y=result.two_over_lr, mode="lines", name="2/η", line={"dash": "dash"}),
        1,
        1,
    )
    fig.add_trace(go.Scatter(x=result.steps, y=result.train_loss, mode="lines", name="train loss"), 1, 2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="Hessian eigenvalue", row=1, col=1)
    fig.update_yaxes(title_text=f"{result.loss} (dataset mean)", row=1, col=2)
    log_axis(fig, row=1, col=2)
    return _finish(fig, "Edge-of-stability tracker")


def gradient_coherence(result: Any) -> go.Figure:
    """Per-class coherence α (bars) with the dataset-wide α as a dashed line (labelled in the legend, where
    it cannot overlap a bar)."""
    fig = go.Figure()
    classes = [str(r["class"]) for r in result.per_class or []]
    if classes:
        fig.add_bar(x=classes, y=[r["alpha"] for r in result.per_class], name="α per class")
    fig.add_trace(
        go.Scatter(
            x=classes or ["all"], y=[result.alpha] * max(len(classes), 1),
            mode="lines" if classes else "markers", name=f"α (all) = {result.alpha:.3g}",
            line={"dash": "dash", "color": PALETTE[1]},
        )
    )  # fmt: skip
    fig.update_layout(xaxis_title="class", yaxis_title="α = E[g_i·g_j] / E[‖g_i‖²], i ≠ j")
    head = (
        f"Gradient coherence (i≠j pairs); m-coherence {result.m_coherence:.3g} at m={result.m}, "
        f"B_simple {result.noise_scale:.3g}"
    )
    return _finish(fig, head)


def neural_collapse(result: Any) -> go.Figure:
    """Bar chart of the NC metrics (left) and per-class mean norms against class size (right)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("collapse metrics", "class means"))
    fig.add_bar(x=list(NC_FIELDS), y=[getattr(result, f) for f in NC_FIELDS], name="metric", row=1, col=1)
    fig.add_scatter(
        x=result.class_sizes,
        y=result.class_mean_norms_uncentred,
        mode="markers+text",
        text=[str(c) for c in range(result.n_classes)],
        name="‖μ_c‖ vs n_c",
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="class size", row=1, col=2)
    fig.update_yaxes(title_text="‖μ_c‖", row=1, col=2)
    return _finish(fig, "Neural collapse", showlegend=False)


def nc_trajectory(result: Any) -> go.Figure:
    """NC1 (log scale), NC2, NC3 and NC4 against the checkpoint step."""
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=("NC1: Tr(Σ_W Σ_B⁺)/C", "NC2", "NC3: self-duality", "NC4: NCC agreement"),
    )
    fig.add_scatter(x=result.steps, y=result.nc1, name="nc1", row=1, col=1)
    for name in ("nc2_equinorm", "nc2_equiangular", "nc2_etf_distance"):
        fig.add_scatter(x=result.steps, y=getattr(result, name), name=name, row=1, col=2)
    fig.add_scatter(x=result.steps, y=result.nc3, name="nc3", row=2, col=1)
    fig.add_scatter(x=result.steps, y=result.nc4, name="nc4", row=2, col=2)
    log_axis(fig, row=1, col=1)
    fig.update_xaxes(title_text="step")
    return _finish(fig, "Neural collapse over training", height=620)


def lmc(result: Any) -> go.Figure:
    """Loss along the path (aligned and unaligned when both were computed); accuracy on a 2nd row."""
    rows = 2 if result.accuracies is not None else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True)
    label = f"aligned ({result.align})" if result.align else "no alignment"
    fig.add_scatter(x=result.alphas, y=result.losses, name=f"loss, {label}", row=1, col=1)
    if result.losses_unaligned is not None:
        fig.add_scatter(x=result.alphas, y=result.losses_unaligned, name="loss, no alignment", row=1, col=1)
    if result.accuracies is not None:
        fig.add_scatter(x=result.alphas, y=result.accuracies, name=f"accuracy, {label}", row=2, col=1)
        if result.accuracies_unaligned is not None:
            fig.add_scatter(
                x=result.alphas, y=result.accuracies_unaligned, name="accuracy, no alignment", row=2, col=1
            )
        fig.update_yaxes(title_text="accuracy", row=2, col=1)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_xaxes(title_text="α (0 = model A, 1 = model B)", row=rows, col=1)
    return _finish(fig, f"Linear mode connectivity — barrier {result.barrier:.4g}")


def lmc_layerwise(layers: pd.DataFrame) -> go.Figure:
    """Per layer group, when only that group is interpolated (``LMCResult.layerwise_frame()``): the
    barrier above the chord and, when present, the loss rise over model A (max_α L(α) − L(0))."""
    fig = go.Figure(go.Bar(x=layers["group"], y=layers["barrier"], name="barrier (above the chord)"))
    if "max_rise" in layers.columns and layers["max_rise"].notna().any():
        fig.add_trace(go.Bar(x=layers["group"], y=layers["max_rise"], name="loss rise over A"))
    fig.update_layout(xaxis_title="layer group", yaxis_title="loss", barmode="group")
    return _finish(fig, "Layer-wise loss barriers")


def ntk(result: Any) -> go.Figure:
    """Eigenvalue spectrum (log scale) and cumulative label energy of the top eigenvectors."""
    df = result.to_frame()
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("NTK eigenvalues", "Cumulative label energy (centered)")
    )
    fig.add_scatter(x=df["rank"], y=df["eigenvalue"], mode="lines+markers", name="λ_i", row=1, col=1)
    fig.add_scatter(
        x=df["rank"], y=df["cumulative_label_energy"], mode="lines+markers", name="Σ energy", row=1, col=2
    )
    fig.update_yaxes(title_text="eigenvalue", row=1, col=1)
    log_axis(fig, row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="fraction", row=1, col=2)
    fig.update_xaxes(title_text="rank")
    head = f"NTK: label alignment {result.label_alignment:.3f}, trace {result.trace:.3g}"
    return _finish(fig, head, showlegend=False)


def ntk_trajectory(result: Any) -> go.Figure:
    """Kernel distance, kernel velocity, label alignment and relative weight change against the step."""
    panels = [
        ("kernel_distance", "Kernel distance to init"),
        ("kernel_velocity", "Kernel velocity"),
        ("label_alignment", "Label alignment"),
        ("relative_param_change", "‖θ−θ₀‖/‖θ₀‖"),
    ]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels])
    for i, (name, title) in enumerate(panels):
        fig.add_scatter(
            x=result.steps,
            y=getattr(result, name),
            mode="lines+markers",
            name=title,
            row=i // 2 + 1,
            col=i % 2 + 1,
        )
    fig.update_xaxes(title_text="step")
    return _finish(fig, "NTK trajectory (lazy → rich)", showlegend=False, height=620)


#: Result class name → drawer. :func:`draw` walks the class's bases, so subclasses inherit a drawer.
def hessian_diagonal(result: Any, *, title: str | None = None) -> go.Figure:
    """Per parameter tensor: the mean diagonal entry ± 2 s.e. (left) and the spread of its entries as a box
    (quartiles, min and max; right)."""
    layers = result.layer_frame()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean diagonal entry ± 2 s.e.", "entries per tensor"))
    fig.add_trace(
        go.Bar(
            x=layers["parameter"],
            y=layers["mean"],
            name="mean",
            error_y={"type": "data", "array": (2 * layers["mean_stderr"]).tolist()},
        ),
        row=1,
        col=1,
    )
    for name, t in result.split().items():
        v = np.asarray(t.reshape(-1).tolist(), dtype=np.float64)
        q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
        fig.add_trace(
            go.Box(
                x=[name],
                q1=[q1],
                median=[med],
                q3=[q3],
                lowerfence=[v.min()],
                upperfence=[v.max()],
                name=name,
                marker_color=PALETTE[0],
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="parameter")
    fig.update_yaxes(title_text="diag entry", row=1, col=1)
    op = result.meta.get("operator", "hessian")
    head = f"Diagonal of the {op} ({result.method}, {result.n_matvecs} products)"
    return _finish(fig, title or head, showlegend=False)


def loss_landscape(
    result: Any, *, value: str = "loss", surface: bool = False, log: bool = True, title: str | None = None
) -> go.Figure:
    """A 1-D slice as a line, a 2-D slice as a contour map (``surface=True``: a 3-D surface) of ``value``
    (``"loss"`` or ``"accuracy"``; ``log``, the default: log₁₀ of the loss — on a linear colour scale the
    walls of the plane take every colour and the basin the trajectory lies in is one), with the checkpoint
    trajectory drawn on
    the plane when the result has one (hover: step, in-plane fraction)."""
    z = result.loss if value == "loss" else result.accuracy
    if z is None:
        raise ValueError(f"this landscape has no {value!r} values")
    Z = np.asarray(z.tolist(), dtype=np.float64)
    if log and value == "loss":
        Z = np.log10(np.maximum(Z, 1e-300))
    label = ("log₁₀ " if log and value == "loss" else "") + value
    kinds = list(result.kinds)
    fig = go.Figure()
    if len(result.coords) == 1:
        fig.add_trace(go.Scatter(x=result.coords[0], y=Z.tolist(), mode="lines+markers", name=label))
        fig.add_vline(x=0, line_dash="dot", line_color="#999")
        fig.update_layout(xaxis_title=f"a ({kinds[0]})", yaxis_title=label)
        return _finish(fig, title or f"{value} along {kinds[0]}")
    a, b = result.coords
    traj = result.trajectory_frame() if result.trajectory_coords is not None else None
    if surface:
        fig.add_trace(go.Surface(x=a, y=b, z=Z.T.tolist(), colorscale="Viridis", colorbar={"title": label}))
        if traj is not None:
            tz = traj["loss"].to_numpy(dtype=np.float64)
            tz = np.log10(np.maximum(tz, 1e-300)) if log and value == "loss" else tz
            fig.add_trace(
                go.Scatter3d(
                    x=traj["a"],
                    y=traj["b"],
                    z=tz,
                    mode="lines+markers",
                    name="trajectory",
                    text=[f"step {s}" for s in traj["step"]],
                    line={"color": PALETTE[1], "width": 5},
                    marker={"size": 3},
                )
            )
        fig.update_layout(
            scene={"xaxis_title": f"a ({kinds[0]})", "yaxis_title": f"b ({kinds[1]})", "zaxis_title": label}
        )
    else:
        fig.add_trace(
            go.Contour(
                x=a,
                y=b,
                z=Z.T.tolist(),
                colorscale="Viridis",
                colorbar={"title": label},
                contours={"coloring": "heatmap", "showlabels": True},
                name=label,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[0],
                y=[0],
                mode="markers",
                marker={"symbol": "x", "size": 12, "color": "white"},
                name="checkpoint",
            )
        )
        if traj is not None:
            fig.add_trace(
                go.Scatter(
                    x=traj["a"],
                    y=traj["b"],
                    mode="lines+markers",
                    name="trajectory",
                    line={"color": PALETTE[1]},
                    marker={"size": 7},
                    text=[
                        f"step {s}: loss {v:.4g}, {100 * f:.0f}% in plane"
                        for s, v, f in zip(traj["step"], traj["loss"], traj["in_plane"])
                    ],
                )
            )
        fig.update_layout(xaxis_title=f"a ({kinds[0]})", yaxis_title=f"b ({kinds[1]})")
    head = f"{value} on the plane of {kinds[0]} and {kinds[1]}"
    if result.explained_variance:
        head += (
            " (variance explained " + ", ".join(f"{100 * v:.1f}%" for v in result.explained_variance) + ")"
        )
    return _finish(fig, title or head)


def opposing_signals(
    result: Any, *, sharpness: pd.DataFrame | None = None, title: str | None = None
) -> go.Figure:
    """The groups' mean loss per checkpoint against the whole dataset's (top); each group's share of every
    step's loss change (middle); with ``sharpness`` (a frame with ``step`` and ``sharpness`` and optionally
    ``two_over_lr``), λ_max of the same run over the same steps (bottom)."""
    traj = result.trajectory_frame()
    rows = 3 if sharpness is not None else 2
    titles = ["mean loss", "share of each step's loss change"] + (
        ["sharpness λ_max"] if sharpness is not None else []
    )
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.08)
    fig.add_trace(
        go.Scatter(
            x=traj["step"], y=traj["mean_loss"], mode="lines", name="all examples", line={"color": PALETTE[7]}
        ),
        row=1,
        col=1,
    )
    steps = list(traj["step"])
    for g, name in enumerate(result.groups):
        color = PALETTE[g]
        n = len(result.groups[name])
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=traj[f"loss_{name}"],
                mode="lines+markers",
                marker={"size": 4},
                name=f"group {name} ({n})",
                line={"color": color},
            ),
            row=1,
            col=1,
        )
        share = _list(result.group_step_share[g])
        fig.add_trace(
            go.Bar(x=steps[1:], y=share, name=f"share {name}", marker_color=color, showlegend=False),
            row=2,
            col=1,
        )
    if sharpness is not None:
        fig.add_trace(
            go.Scatter(
                x=sharpness["step"],
                y=sharpness["sharpness"],
                mode="lines+markers",
                name="λ_max",
                line={"color": PALETTE[2]},
            ),
            row=3,
            col=1,
        )
        if "two_over_lr" in sharpness:
            fig.add_trace(
                go.Scatter(
                    x=sharpness["step"],
                    y=sharpness["two_over_lr"],
                    mode="lines",
                    name="2/η",
                    line={"dash": "dash", "color": "#666"},
                ),
                row=3,
                col=1,
            )
    if result.spike_index is not None:
        fig.add_vline(x=steps[result.spike_index], line_dash="dot", line_color="#999")
    fig.update_xaxes(title_text="step", row=rows, col=1)
    alt = "n/a" if result.alternation is None else f"{result.alternation:.2f}"
    head = (
        f"Opposing signals: {len(result.selected)} examples in {len(result.groups)} groups "
        f"(alternation {alt})"
    )
    return _finish(fig, title or head, barmode="relative", height=300 * rows)


DRAWERS: dict[str, Callable[..., go.Figure]] = {
    "HessianEigenResult": hessian_eigenvalues,
    "LayerwiseHessianResult": layerwise_hessian,
    "TraceResult": hessian_trace,
    "DensityResult": hessian_density,
    "SharpnessResult": sharpness,
    "AdaptiveSharpnessResult": adaptive_sharpness,
    "AverageSharpnessResult": average_sharpness,
    "SharpnessTrackResult": sharpness_track,
    "CoherenceResult": gradient_coherence,
    "NeuralCollapseResult": neural_collapse,
    "NeuralCollapseTrajectoryResult": nc_trajectory,
    "LMCResult": lmc,
    "NTKResult": ntk,
    "NTKTrajectoryResult": ntk_trajectory,
    "HessianDiagonalResult": hessian_diagonal,
    "LandscapeResult": loss_landscape,
    "OpposingSignalsResult": opposing_signals,
}


def draw(result: Result, **kwargs: Any) -> go.Figure:
    """The figure of one result: its class's drawer (see :data:`DRAWERS`), else :func:`generic`."""
    for cls in type(result).__mro__:
        drawer = DRAWERS.get(cls.__name__)
        if drawer is not None:
            return drawer(result, **kwargs)
    return generic(result, **kwargs)


# =============================================================================== across checkpoints
def topk_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, index, eigenvalue, residual, converged`` (one row per eigenvalue per checkpoint)."""
    rows = []
    for step, r in sorted(results.items()):
        vals, res = _list(r.values), _list(r.residuals)
        conv = r.converged.tolist() if hasattr(r.converged, "tolist") else list(r.converged)
        for i, v in enumerate(vals):
            rows.append(
                {
                    "step": step,
                    "index": i + 1,
                    "eigenvalue": v,
                    "residual": res[i] if i < len(res) else math.nan,
                    "converged": bool(conv[i]) if i < len(conv) else False,
                }
            )
    return pd.DataFrame(rows, columns=["step", "index", "eigenvalue", "residual", "converged"])


def topk_figure(frame: pd.DataFrame, *, log_y: bool = False) -> go.Figure:
    """λ_i vs step, one line per index; unconverged values drawn as crosses."""
    fig = go.Figure()
    for i, part in frame.groupby("index"):
        fig.add_trace(
            go.Scatter(
                x=part["step"],
                y=part["eigenvalue"],
                mode="lines+markers",
                name=f"λ_{i}",
                marker={"symbol": ["circle" if c else "x" for c in part["converged"]], "size": 8},
                customdata=part["residual"],
                hovertemplate="step %{x}<br>λ = %{y:.6g}<br>residual %{customdata:.2e}<extra></extra>",
            )
        )
    fig.update_layout(xaxis_title="step", yaxis_title="eigenvalue")
    if log_y:
        log_axis(fig)
    return _finish(fig, "Top Hessian eigenvalues over training (× = not converged)")


def density_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, x, density, sigma, log_scale`` (x: eigenvalue, or log10|λ| when the probe used a log grid)."""
    rows = []
    for step, r in sorted(results.items()):
        for x, d in zip(_list(r.grid), _list(r.density)):
            rows.append(
                {"step": step, "x": x, "density": d, "sigma": r.sigma, "log_scale": bool(r.log_scale)}
            )
    return pd.DataFrame(rows, columns=["step", "x", "density", "sigma", "log_scale"])


def density_figure(frame: pd.DataFrame, *, log_y: bool = False) -> go.Figure:
    """Spectral densities, one line per checkpoint; optional log y-axis (shows the bulk and the outliers)."""
    fig = go.Figure()
    log_x = bool(frame["log_scale"].any()) if len(frame) else False
    for step, part in frame.groupby("step"):
        y = _density_floor(part["density"]) if log_y else part["density"]
        fig.add_trace(go.Scatter(x=part["x"], y=y, mode="lines", name=f"step {step}"))
    lo, hi = (frame["sigma"].min(), frame["sigma"].max()) if len(frame) else (math.nan, math.nan)
    sigma = f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}–{hi:.3g}"  # one width per checkpoint
    fig.update_layout(xaxis_title="log₁₀ |eigenvalue|" if log_x else "eigenvalue", yaxis_title="density")
    if log_y:
        log_axis(fig)
    return _finish(fig, f"Hessian spectral density (SLQ, Gaussian broadening σ = {sigma})")


def trace_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, estimate, stderr, n_matvecs, method``."""
    rows = [
        {"step": s, "estimate": _num(r.estimate), "stderr": _num(r.stderr), "n_matvecs": r.n_matvecs,
         "method": r.method}
        for s, r in sorted(results.items())
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["step", "estimate", "stderr", "n_matvecs", "method"])


def trace_figure(frame: pd.DataFrame, *, z: float = 2.0) -> go.Figure:
    """tr(H) vs step with ±z·stderr error bars."""
    fig = go.Figure(
        go.Scatter(
            x=frame["step"],
            y=frame["estimate"],
            mode="lines+markers",
            name="tr(H)",
            error_y={"type": "data", "array": (z * frame["stderr"]).tolist(), "visible": True},
        )
    )
    fig.update_layout(xaxis_title="step", yaxis_title="trace")
    return _finish(fig, f"Hessian trace over training (error bars ±{z:g} standard errors)")


SHARPNESS_COLUMNS = (
    "lambda_max",
    "lr",
    "two_over_lr",
    "ratio",
    "trace",
    "trace_stderr",
    "loss_value",
    "preconditioned_lambda_max",
    "preconditioned_threshold",
    "preconditioned_ratio",
    "optimizer",
)


def sharpness_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """One row per checkpoint with λ_max, η, 2/η, their ratio, trace and the preconditioned values."""
    rows = []
    for s, r in sorted(results.items()):
        rows.append({"step": s, **{c: getattr(r, c, None) for c in SHARPNESS_COLUMNS}})
    return pd.DataFrame(rows, columns=["step", *SHARPNESS_COLUMNS])


def schedule_frame(lr_at: Callable[[int], float], max_step: int, n: int = 400) -> pd.DataFrame:
    """``step, lr, two_over_lr`` on up to ``n`` steps in ``[0, max_step]`` (the 2/η stability line)."""
    steps = np.unique(np.linspace(0, max(max_step, 0), num=min(n, max_step + 1)).round().astype(int))
    lrs = [lr_at(int(s)) for s in steps]
    return pd.DataFrame(
        {"step": steps, "lr": lrs, "two_over_lr": [2.0 / v if v and v > 0 else math.nan for v in lrs]}
    )


def sharpness_figure(
    frame: pd.DataFrame,
    schedule: pd.DataFrame | None,
    *,
    logged: pd.DataFrame | None = None,
    logged_name: str = "λ_max (logged in training)",
) -> go.Figure:
    """λ_max(H) vs step against the 2/η line (and ``logged``: ``step, value`` measured by the training
    loop). When the frame holds preconditioned values (adaptive optimizers) the figure has two panels
    on a shared step axis: λ_max(P⁻¹H) against its threshold (e.g. 38/η for Adam) on top — the quantity
    that governs the run's stability — and λ_max(H) against 2/η below (log y), each on its own scale."""
    pre = frame["preconditioned_lambda_max"].map(_num)
    two = bool(pre.notna().any())
    if two:
        fig = make_subplots(
            rows=2,
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.12,
            subplot_titles=("λ_max(P⁻¹H) vs its threshold (the run's optimizer)", "λ_max(H) vs 2/η"),
        )
        plain: dict[str, Any] = {"row": 2, "col": 1}
    else:
        fig, plain = go.Figure(), {}
    fig.add_trace(
        go.Scatter(x=frame["step"], y=frame["lambda_max"], mode="lines+markers", name="λ_max(H)"), **plain
    )
    if schedule is not None and len(schedule):
        fig.add_trace(
            go.Scatter(
                x=schedule["step"],
                y=schedule["two_over_lr"],
                mode="lines",
                name="2/η (schedule)",
                line={"dash": "dash", "color": "black"},
            ),
            **plain,
        )
    if logged is not None and len(logged):
        fig.add_trace(
            go.Scatter(
                x=logged["step"], y=logged["value"], mode="lines", name=logged_name, line={"width": 1}
            ),
            **plain,
        )
    if two:
        fig.add_trace(
            go.Scatter(x=frame["step"], y=pre, mode="lines+markers", name="λ_max(P⁻¹H) (preconditioned)"),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=frame["step"],
                y=frame["preconditioned_threshold"].map(_num),
                mode="lines",
                name="preconditioned threshold",
                line={"dash": "dot", "color": "black"},
            ),
            row=1,
            col=1,
        )
        fig.update_xaxes(title_text="step", row=2, col=1)
        fig.update_yaxes(title_text="λ_max(P⁻¹H)", row=1, col=1)
        fig.update_yaxes(title_text="λ_max(H)", title_standoff=14, automargin=True, row=2, col=1)
        log_axis(fig, row=2, col=1)  # λ_max(H) sits far below 2/η under an adaptive optimizer
        return _finish(fig, "Sharpness vs the stability threshold", height=640)
    fig.update_layout(xaxis_title="step", yaxis_title="eigenvalue")
    return _finish(fig, "Sharpness vs the stability threshold 2/η")


def loss_figure(metrics: pd.DataFrame, columns: Sequence[str] = ("train_loss", "test_loss")) -> go.Figure:
    """Loss curves from metrics.csv (log y)."""
    fig = go.Figure()
    for c in columns:
        if c in metrics.columns:
            fig.add_trace(go.Scatter(x=metrics["step"], y=metrics[c], mode="lines", name=c))
    fig.update_layout(xaxis_title="step", yaxis_title="loss")
    return _finish(log_axis(fig), "Loss")


def log_step(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with step ≥ 1 (a log axis cannot show step 0)."""
    return frame[frame["step"] >= 1] if "step" in frame.columns else frame


def grokking_figure(metrics: pd.DataFrame) -> go.Figure:
    """Train/test accuracy (left) and loss (right) vs step on a log axis; the training accuracy on the
    kept / flipped labels too when the run logged them (``train_acc_clean``, ``train_acc_flipped``)."""
    m = log_step(metrics)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "loss"))
    for c in ("train_acc", "test_acc", "train_acc_clean", "train_acc_flipped"):
        if c in m.columns:
            fig.add_trace(go.Scatter(x=m["step"], y=m[c], mode="lines", name=c), row=1, col=1)
    for c in ("train_loss", "test_loss"):
        if c in m.columns:
            fig.add_trace(go.Scatter(x=m["step"], y=m[c], mode="lines", name=c), row=1, col=2)
    log_axis(fig, "x", title_text="step (log)")
    log_axis(fig, row=1, col=2)
    return _finish(fig, "Generalisation over training")


def dynamics_frame(trajectory: Any | None, weight_norms: Mapping[int, float]) -> pd.DataFrame:
    """``step, label_alignment, kernel_distance, relative_param_change, weight_norm``."""
    rows: dict[int, dict[str, Any]] = {s: {"step": s, "weight_norm": w} for s, w in weight_norms.items()}
    if trajectory is not None:
        for i, s in enumerate(trajectory.steps):
            row = rows.setdefault(int(s), {"step": int(s)})
            for c in ("label_alignment", "kernel_distance", "relative_param_change"):
                row[c] = _num(getattr(trajectory, c)[i])
    cols = ["step", "label_alignment", "kernel_distance", "relative_param_change", "weight_norm"]
    return pd.DataFrame([rows[s] for s in sorted(rows)], columns=cols)


def dynamics_figure(frame: pd.DataFrame) -> go.Figure:
    """NTK label alignment, kernel distance to init and weight norm vs step (log axis)."""
    f = log_step(frame)
    panels = [
        ("label_alignment", "NTK label alignment"),
        ("kernel_distance", "kernel distance to init"),
        ("weight_norm", "weight norm ‖θ‖"),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    for j, (c, t) in enumerate(panels):
        part = f[["step", c]].dropna()
        fig.add_trace(go.Scatter(x=part["step"], y=part[c], mode="lines+markers", name=t), row=1, col=j + 1)
    log_axis(fig, "x", title_text="step (log)")
    return _finish(fig, "Function-space and weight dynamics", showlegend=False)


NC_COLUMNS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_etf_distance", "nc3", "nc4", "accuracy")


def nc_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step`` and the NC metrics, one row per checkpoint."""
    rows = [
        {"step": s, **{c: _num(getattr(r, c, None)) for c in NC_COLUMNS}} for s, r in sorted(results.items())
    ]
    return pd.DataFrame(rows, columns=["step", *NC_COLUMNS])


def nc_figure(frame: pd.DataFrame) -> go.Figure:
    """NC1 (within-class variability), NC2 (equinorm, equiangularity, ETF distance), NC3 (self-duality)
    on log axes, and NC4 (fraction of samples where the nearest class mean agrees with the network,
    → 1 under collapse) vs step."""
    panels = [
        ("NC1: Tr(Σ_W Σ_B⁺)/C", ["nc1"]),
        ("NC2: simplex ETF", ["nc2_equinorm", "nc2_equiangular", "nc2_etf_distance"]),
        ("NC3: ‖W/‖W‖ − M/‖M‖‖²", ["nc3"]),
        ("NC4: agreement with the nearest class mean", ["nc4"]),
    ]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for t, _ in panels])
    for j, (_, cols) in enumerate(panels):
        for c in cols:
            fig.add_trace(
                go.Scatter(x=frame["step"], y=frame[c], mode="lines+markers", name=c),
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    for j in range(3):
        log_axis(fig, row=j // 2 + 1, col=j % 2 + 1)
    fig.update_yaxes(range=[0, 1.05], row=2, col=2)
    fig.update_xaxes(title_text="step")
    return _finish(fig, "Neural collapse over training", height=640)


COHERENCE_COLUMNS = ("alpha", "alpha_with_self", "m_coherence", "noise_scale", "trace_cov", "grad_norm_sq")


def coherence_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step`` and the coherence statistics, one row per checkpoint."""
    rows = [
        {"step": s, **{c: _num(getattr(r, c, None)) for c in COHERENCE_COLUMNS}}
        for s, r in sorted(results.items())
    ]
    return pd.DataFrame(rows, columns=["step", *COHERENCE_COLUMNS])


def coherence_figure(frame: pd.DataFrame) -> go.Figure:
    """Gradient coherence α, the m-coherence 1 + (m−1)α and the simple noise scale B_simple = tr(Σ)/‖g‖²
    vs step, each on its own axis (α ~ 0.02 next to an m-coherence of 67 would read as 0). The noise scale
    is on a log axis when every value is positive; a negative estimate (the unbiased tr(Σ) estimate can
    fall below 0 when the mean gradient dominates) keeps a linear axis and says so."""
    panels = ("coherence α (i ≠ j)", "m-coherence 1 + (m−1)α", "noise scale tr(Σ)/‖g‖²")
    fig = make_subplots(rows=1, cols=3, subplot_titles=panels, horizontal_spacing=0.09)
    for j, c in enumerate(("alpha", "m_coherence", "noise_scale"), 1):
        fig.add_trace(
            go.Scatter(x=frame["step"], y=frame[c], mode="lines+markers", name=c,
                       line={"color": PALETTE[j - 1]}),
            row=1, col=j,
        )  # fmt: skip
    noise = pd.to_numeric(frame["noise_scale"], errors="coerce")
    if len(noise.dropna()) and (noise.dropna() > 0).all():
        log_axis(fig, row=1, col=3)
    elif len(noise.dropna()):
        fig.add_annotation(
            text=f"{int((noise <= 0).sum())} estimate(s) ≤ 0: linear axis",
            xref="x3 domain", yref="y3 domain", x=0.5, y=0.98, yanchor="top", showarrow=False,
            font={"size": 12, "color": "#666"},
        )  # fmt: skip
    fig.update_xaxes(title_text="step")
    return _finish(fig, "Gradient coherence and noise scale", showlegend=False)


def double_descent_figure(
    frame: pd.DataFrame,
    *,
    x: str,
    y: str,
    threshold: float | None,
    x_title: str,
    log_x: bool = True,
    log_y: bool = True,
    show_train: bool = True,
) -> go.Figure:
    """Test (and, with ``show_train``, train) error vs model size or epochs, with the interpolation
    threshold marked. The log y axis (default) shows both descents: the test-error peak at p ≈ n is
    ~1000× the error on either side, which a linear axis flattens to zero; train error falls to ~1e-30
    past the threshold. The y title names every curve drawn."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame[x], y=frame[y], mode="lines+markers", name=y))
    train = y.replace("test", "train")
    y_title = y
    if show_train and train != y and train in frame.columns:
        fig.add_trace(
            go.Scatter(x=frame[x], y=frame[train], mode="lines+markers", name=train, line={"dash": "dot"})
        )
        y_title = f"{y} and {train}"
    add_threshold(fig, threshold, frame[y])
    fig.update_layout(xaxis_title=x_title, yaxis_title=y_title)
    if log_x:
        log_axis(fig, "x")
    if log_y:
        log_axis(fig)
    return _finish(fig, "Double descent")


def condition_figure(
    frame: pd.DataFrame, *, x: str, y: str, threshold: float | None, log_x: bool = True
) -> go.Figure:
    """Condition number of the feature matrix vs ``x`` (log y), with the interpolation threshold marked."""
    fig = go.Figure(go.Scatter(x=frame[x], y=frame[y], mode="lines+markers", name=y))
    add_threshold(fig, threshold, frame[y])
    fig.update_layout(xaxis_title=x, yaxis_title="condition number")
    if log_x:
        log_axis(fig, "x")
    return _finish(log_axis(fig), "Condition number of the feature matrix")


def add_threshold(
    fig: go.Figure, threshold: float | None, values: Any, name: str = "interpolation threshold"
) -> None:
    """A dashed vertical line at ``x = threshold`` spanning ``values`` (a legend entry; works on log axes,
    where Plotly's annotated ``add_vline`` misplaces its label)."""
    if threshold is None or not math.isfinite(threshold):
        return
    v = pd.to_numeric(pd.Series(values), errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
    v = v[v > 0] if len(v[v > 0]) else v
    if not len(v):
        return
    fig.add_trace(
        go.Scatter(
            x=[threshold, threshold],
            y=[float(v.min()), float(v.max())],
            mode="lines",
            name=name,
            line={"dash": "dash", "color": PALETTE[1]},
            hoverinfo="name+x",
        )
    )


# =============================================================================== cached results
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


class ExportError(ValueError):
    """An export that cannot be made (missing results, unavailable renderer, bad format)."""


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
    return _finish(fig, f"{probe} across checkpoints", height=max(360, 110 + 200 * len(panels)))


def _sharpness_across(results: Mapping[int, Any]) -> go.Figure:
    frame = sharpness_frame(results)
    return sharpness_figure(frame, frame[["step", "lr", "two_over_lr"]].dropna())


#: Result class name → its figure of ``{step: Result}`` (one checkpoint per point or line); results of
#: other classes get :func:`quantities_figure`.
ACROSS: dict[str, Callable[[Mapping[int, Any]], go.Figure]] = {
    "HessianEigenResult": lambda rs: topk_figure(topk_frame(rs)),
    "DensityResult": lambda rs: density_figure(density_frame(rs), log_y=True),
    "TraceResult": lambda rs: trace_figure(trace_frame(rs)),
    "SharpnessResult": _sharpness_across,
    "NeuralCollapseResult": lambda rs: nc_figure(nc_frame(rs)),
    "CoherenceResult": lambda rs: coherence_figure(coherence_frame(rs)),
}


def across_checkpoints(results: Mapping[int, Any], *, x_title: str = "step") -> go.Figure:
    """The figure of one probe's ``{step: Result}``: every step on the x axis (see :data:`ACROSS`)."""
    if not results:
        raise ExportError("no results to plot across checkpoints")
    first = next(iter(results.values()))
    for cls in type(first).__mro__:
        if cls.__name__ in ACROSS:
            return relabel_steps(ACROSS[cls.__name__](results), x_title)
    return quantities_figure(results, x_title=x_title)


def relabel_steps(fig: go.Figure, x_title: str) -> go.Figure:
    """Name what the checkpoints' steps are when they are not training steps (a double-descent sweep keeps
    one checkpoint per model size at ``step = p``): the x titles become ``x_title`` and "over training"
    in the title becomes "against ``x_title``". ``x_title == "step"`` leaves the figure as it is."""
    if x_title == "step":
        return fig
    fig.for_each_xaxis(lambda ax: ax.update(title_text=x_title) if ax.title.text else None)
    text = fig.layout.title.text or ""
    return fig.update_layout(title={"text": text.replace("over training", f"against {x_title}")})


# =============================================================================== files
IMAGE_FORMATS = ("png", "svg", "pdf")


def write_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """A self-contained HTML page of a figure (plotly.js embedded: opens offline). Written atomically."""
    return atomic_write_bytes(Path(path), fig.to_html(include_plotlyjs=True, full_html=True).encode())


def figure_image(fig: go.Figure, fmt: str = "png", *, scale: float = 2.0) -> bytes:
    """PNG, SVG or PDF bytes rendered by kaleido (needs Chrome/Chromium; ``ExportError`` otherwise)."""
    if fmt not in IMAGE_FORMATS:
        raise ExportError(f"image format must be one of {IMAGE_FORMATS}; got {fmt!r}")
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ExportError(f"{fmt.upper()} export needs the 'kaleido' package (pip install kaleido)") from None
    try:
        return fig.to_image(format=fmt, scale=scale)
    except Exception as exc:  # noqa: BLE001 - kaleido/choreographer raise many types for a missing browser
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"{fmt.upper()} export failed: kaleido could not render with a Chrome/Chromium browser "
            f"({type(exc).__name__}: {first}); install chromium (or set BROWSER_PATH), or use HTML instead"
        ) from None


@contextlib.contextmanager
def image_server() -> Iterator[None]:
    """Keep one kaleido browser for the images rendered inside (a report's dozen SVGs: one Chromium start,
    not one per figure); without kaleido, or when it cannot start, a no-op (each figure starts its own)."""
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
    except Exception:  # noqa: BLE001 - figure_image reports a missing browser itself
        yield
        return
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


def write_png(fig: go.Figure, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """A PNG of a figure (kaleido + Chrome/Chromium). Written atomically."""
    return atomic_write_bytes(Path(path), figure_image(fig, "png", scale=scale))


def write_figure(fig: go.Figure, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a figure as ``fmt`` (default: by suffix): ``html``, ``png``, ``svg`` or ``pdf``."""
    suffix = fmt or Path(path).suffix.lower().lstrip(".")
    if suffix == "html":
        return write_html(fig, path)
    if suffix in IMAGE_FORMATS:
        return atomic_write_bytes(Path(path), figure_image(fig, suffix))
    raise ExportError(f"cannot write a figure as {suffix!r}; use .html, .png, .svg or .pdf")


# =============================================================================== run comparison
def overlay_figure(
    frames: Mapping[str, pd.DataFrame],
    *,
    x: str,
    y: str,
    y_title: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
    hline: float | None = None,
    hline_name: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Several runs on one chart: ``y`` against ``x`` per run (``frames``: run label → frame), in the
    palette's order, with an optional horizontal reference line (e.g. λ_max·η/2 = 1, the edge)."""
    fig = go.Figure()
    for name, frame in frames.items():
        part = frame[[x, y]].dropna()
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers", name=name, marker={"size": 5}))
    if hline is not None:
        xs = pd.concat([f[x] for f in frames.values()]) if frames else pd.Series([0, 1])
        fig.add_trace(
            go.Scatter(
                x=[xs.min(), xs.max()],
                y=[hline, hline],
                mode="lines",
                name=hline_name or f"{y} = {hline:g}",
                line={"dash": "dash", "color": "black"},
            )
        )
    fig.update_layout(xaxis_title=x, yaxis_title=y_title or y)
    if log_x:
        log_axis(fig, "x")
    if log_y:
        log_axis(fig)
    return _finish(fig, title or f"{y_title or y} across runs")


def _width_colours(widths: Sequence[Any]) -> dict[Any, str]:
    """One palette colour per width, narrowest first."""
    return {w: PALETTE[i % len(PALETTE)] for i, w in enumerate(sorted(widths))}


def lr_sweep_figure(sweep: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Final train loss against the learning rate η (log–log), one curve per ``width`` (one colour per
    width), the best η of each width ringed; diverged jobs (``inf``) are left out of the curves.
    ``sweep``: ``width``, ``lr``, ``final_train_loss`` (an ``lr_transfer`` run's ``lr_sweep.csv``)."""
    fig = go.Figure()
    colours = _width_colours(sweep["width"].unique())
    for w, c in colours.items():
        part = sweep[sweep["width"] == w].sort_values("lr")
        part = part[np.isfinite(part["final_train_loss"].astype(float))]
        fig.add_trace(
            go.Scatter(
                x=part["lr"], y=part["final_train_loss"], mode="lines+markers", name=f"width {w}",
                line={"color": c}, legendgroup=str(w),
            )
        )  # fmt: skip
        if len(part):
            best = part.loc[part["final_train_loss"].astype(float).idxmin()]
            fig.add_trace(
                go.Scatter(
                    x=[best["lr"]], y=[best["final_train_loss"]], mode="markers", showlegend=False,
                    marker={"size": 15, "color": "rgba(0,0,0,0)", "line": {"color": c, "width": 2}},
                    legendgroup=str(w), hovertemplate=f"width {w}: best η = %{{x:g}}<extra></extra>",
                )
            )  # fmt: skip
    fig.update_layout(xaxis_title="learning rate η", yaxis_title="final train loss")
    log_axis(fig, "x")
    log_axis(fig)
    return _finish(fig, title or "Final train loss vs learning rate, per width")


def width_sharpness_figure(
    trajectories: pd.DataFrame,
    *,
    y: str = "sharpness",
    two_over_lr: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """``y`` (default the η-unit sharpness) against the step, one curve per ``width`` (one colour per width),
    with the edge of stability ``2/η`` dashed. ``trajectories``: long form ``step``, ``width``, ``y``."""
    fig = go.Figure()
    for w, c in _width_colours(trajectories["width"].unique()).items():
        part = trajectories[trajectories["width"] == w].sort_values("step")[["step", y]].dropna()
        fig.add_trace(
            go.Scatter(x=part["step"], y=part[y], mode="lines+markers", name=f"width {w}", line={"color": c})
        )
    if two_over_lr is not None and math.isfinite(two_over_lr):
        steps = trajectories["step"]
        fig.add_trace(
            go.Scatter(
                x=[steps.min(), steps.max()], y=[two_over_lr, two_over_lr], mode="lines", name="2/η",
                line={"dash": "dash", "color": "black"},
            )
        )  # fmt: skip
    fig.update_layout(xaxis_title="step", yaxis_title=y)
    return _finish(fig, title or f"{y} per width over training")
