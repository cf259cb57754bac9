"""Curvature figures: top-k eigenvalues, layer-wise blocks, trace, spectral density, diagonal, sharpness
and the edge of stability — of one result (result → figure) and across checkpoints (frame → figure)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import PALETTE, finish, floats, log_axis, number


def hessian_eigenvalues(result: Any, *, title: str | None = None) -> go.Figure:
    """Stem plot of the eigenvalues (unconverged ones as crosses), residuals in the hover text."""
    vals, res = floats(result.values), floats(result.residuals)
    conv = [bool(c) for c in floats(result.converged)]
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
    return finish(fig, title or f"Top eigenvalues of the {op} ({result.meta.get('reduction', '')})")


def layerwise_hessian(result: Any, *, value: str = "lambda_1", title: str | None = None) -> go.Figure:
    """Bar chart of one column of ``to_frame()`` per layer (``trace`` gets ±2 s.e. error bars)."""
    frame = result.to_frame()
    if value not in frame.columns:
        raise ValueError(f"value must be one of {list(frame.columns[2:])}; got {value!r}")
    err = {"type": "data", "array": (2 * frame["trace_stderr"]).tolist()} if value == "trace" else None
    fig = go.Figure(go.Bar(x=frame["layer"], y=frame[value], error_y=err, name=value))
    fig.update_layout(xaxis_title="layer", yaxis_title=value)
    op = result.meta.get("operator", "hessian")
    return finish(fig, title or f"{value} per layer ({op} diagonal blocks)")


def blockwise_spectra(result: Any, *, title: str | None = None) -> go.Figure:
    """Each block's spectral density on the shared λ axis (log y), and the Jensen–Shannon divergences
    between blocks as a heatmap."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.14,
                        subplot_titles=("density per block", "Jensen–Shannon divergence (nats)"))  # fmt: skip
    grid = floats(result.grid)
    for b, name in enumerate(result.blocks):
        y = _density_floor(floats(result.densities[b]))
        fig.add_trace(go.Scatter(x=grid, y=y, mode="lines", name=name, line={"color": PALETTE[b % 8]}), 1, 1)
    fig.add_trace(
        go.Heatmap(z=result.js.tolist(), x=result.blocks, y=result.blocks, colorscale="Viridis", zmin=0,
                   zmax=math.log(2), colorbar={"x": 1.02, "len": 0.8}, showscale=True),
        1, 2,
    )  # fmt: skip
    log_axis(fig, row=1, col=1)
    fig.update_xaxes(title_text="eigenvalue", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    head = (
        f"Blockwise Hessian spectra: heterogeneity {result.heterogeneity:.3g} nats (σ = {result.sigma:.3g})"
    )
    return finish(fig, title or head, height=520)


def hessian_trace(result: Any, *, title: str | None = None) -> go.Figure:
    """Running estimate over the stochastic samples with the final ±2 s.e. band."""
    s = np.asarray(floats(result.samples), dtype=np.float64)
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
    return finish(fig, title or head)


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
    y = floats(result.density)
    if log_y:
        y = _density_floor(y)
    fig = go.Figure(go.Scatter(x=floats(result.grid), y=y, mode="lines", name="density"))
    fig.update_layout(
        xaxis_title="log₁₀ |eigenvalue|" if result.log_scale else "eigenvalue", yaxis_title="density"
    )
    if log_y:
        log_axis(fig)
    scale = "decades" if result.log_scale else "λ units"
    return finish(fig, title or f"Spectral density (SLQ, σ = {result.sigma:.3g} {scale})")


def sharpness(result: Any) -> go.Figure:
    """Top-k eigenvalues (and the batch λ_max distribution) against the 2/η threshold."""
    fig = go.Figure()
    fig.add_scatter(
        x=[f"λ{i + 1}" for i in range(len(result.eigenvalues))],
        y=floats(result.eigenvalues),
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
    return finish(fig, title)


def adaptive_sharpness(result: Any) -> go.Figure:
    """The worst-case loss increase after each ascent step."""
    steps = list(range(1, len(result.step_values) + 1))
    fig = go.Figure(go.Scatter(x=steps, y=result.step_values, mode="lines+markers"))
    fig.update_layout(xaxis_title="ascent step", yaxis_title="L(w+ε) − L(w)")
    return finish(fig, f"Adaptive sharpness (ρ={result.rho}, η={result.eta}) = {result.sharpness:.4g}")


def average_sharpness(result: Any) -> go.Figure:
    """Histogram of the Monte Carlo loss increases."""
    fig = go.Figure(go.Histogram(x=result.samples))
    fig.update_layout(xaxis_title="L(w+ε) − L(w)", yaxis_title="count")
    head = f"Average-case sharpness (σ={result.sigma}) = {result.sharpness:.4g} ± {result.stderr:.2g}"
    return finish(fig, head)


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
    return finish(fig, "Edge-of-stability tracker")


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
    return finish(fig, title or head, showlegend=False)


def topk_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, index, eigenvalue, residual, converged`` (one row per eigenvalue per checkpoint)."""
    rows = []
    for step, r in sorted(results.items()):
        vals, res = floats(r.values), floats(r.residuals)
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
    return finish(fig, "Top Hessian eigenvalues over training (× = not converged)")


def density_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, x, density, sigma, log_scale`` (x: eigenvalue, or log10|λ| when the probe used a log grid)."""
    rows = []
    for step, r in sorted(results.items()):
        for x, d in zip(floats(r.grid), floats(r.density)):
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
    return finish(fig, f"Hessian spectral density (SLQ, Gaussian broadening σ = {sigma})")


def trace_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, estimate, stderr, n_matvecs, method``."""
    rows = [
        {"step": s, "estimate": number(r.estimate), "stderr": number(r.stderr), "n_matvecs": r.n_matvecs,
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
    return finish(fig, f"Hessian trace over training (error bars ±{z:g} standard errors)")


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
    pre = frame["preconditioned_lambda_max"].map(number)
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
                y=frame["preconditioned_threshold"].map(number),
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
        return finish(fig, "Sharpness vs the stability threshold", height=640)
    fig.update_layout(xaxis_title="step", yaxis_title="eigenvalue")
    return finish(fig, "Sharpness vs the stability threshold 2/η")


def condition_figure(
    frame: pd.DataFrame, *, x: str, y: str, threshold: float | None, log_x: bool = True
) -> go.Figure:
    """Condition number of the feature matrix vs ``x`` (log y), with the interpolation threshold marked."""
    fig = go.Figure(go.Scatter(x=frame[x], y=frame[y], mode="lines+markers", name=y))
    add_threshold(fig, threshold, frame[y])
    fig.update_layout(xaxis_title=x, yaxis_title="condition number")
    if log_x:
        log_axis(fig, "x")
    return finish(log_axis(fig), "Condition number of the feature matrix")


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
