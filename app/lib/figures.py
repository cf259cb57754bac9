"""Tables and Plotly figures across checkpoints (pure functions of results; no Streamlit).

Each ``*_frame`` turns ``{step: Result}`` into a tidy DataFrame (what the downloads contain);
each ``*_figure`` draws such a frame. Single-checkpoint views use the result's own ``figure()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"


def _num(v: Any) -> float:
    """A float (NaN for None / non-numbers)."""
    try:
        out = float(v)
    except (TypeError, ValueError):
        return math.nan
    return out


def _list(v: Any) -> list[float]:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return [_num(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


# ------------------------------------------------------------------------------------ Hessian
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
    fig.update_layout(
        title="Top Hessian eigenvalues over training (× = not converged)",
        xaxis_title="step",
        yaxis_title="eigenvalue",
        yaxis_type="log" if log_y else "linear",
        template=TEMPLATE,
    )
    return fig


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
    floor = 1e-12
    for step, part in frame.groupby("step"):
        y = part["density"].clip(lower=floor) if log_y else part["density"]
        fig.add_trace(go.Scatter(x=part["x"], y=y, mode="lines", name=f"step {step}"))
    sigma = frame["sigma"].iloc[0] if len(frame) else float("nan")
    fig.update_layout(
        title=f"Hessian spectral density (SLQ, Gaussian broadening σ = {sigma:.3g})",
        xaxis_title="log10 |eigenvalue|" if log_x else "eigenvalue",
        yaxis_title="density",
        yaxis_type="log" if log_y else "linear",
        template=TEMPLATE,
    )
    return fig


def trace_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step, estimate, stderr, n_matvecs, method``."""
    rows = [
        {
            "step": s,
            "estimate": _num(r.estimate),
            "stderr": _num(r.stderr),
            "n_matvecs": r.n_matvecs,
            "method": r.method,
        }
        for s, r in sorted(results.items())
    ]
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
    fig.update_layout(
        title=f"Hessian trace over training (error bars ±{z:g} standard errors)",
        xaxis_title="step",
        yaxis_title="trace",
        template=TEMPLATE,
    )
    return fig


# ------------------------------------------------------------------------------------ edge of stability
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
        row: dict[str, Any] = {"step": s}
        for c in SHARPNESS_COLUMNS:
            row[c] = getattr(r, c, None)
        rows.append(row)
    return pd.DataFrame(rows, columns=["step", *SHARPNESS_COLUMNS])


def schedule_frame(lr_at: Callable[[int], float], max_step: int, n: int = 400) -> pd.DataFrame:
    """``step, lr, two_over_lr`` on up to ``n`` steps in ``[0, max_step]`` (the 2/η stability line)."""
    steps = np.unique(np.linspace(0, max(max_step, 0), num=min(n, max_step + 1)).round().astype(int))
    lrs = [lr_at(int(s)) for s in steps]
    return pd.DataFrame(
        {"step": steps, "lr": lrs, "two_over_lr": [2.0 / v if v and v > 0 else math.nan for v in lrs]}
    )


def sharpness_figure(frame: pd.DataFrame, schedule: pd.DataFrame | None) -> go.Figure:
    """λ_max vs step against the 2/η line; Adam-style runs add λ_max(P⁻¹H) against its threshold."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame["step"], y=frame["lambda_max"], mode="lines+markers", name="λ_max(H)"))
    if schedule is not None and len(schedule):
        fig.add_trace(
            go.Scatter(
                x=schedule["step"],
                y=schedule["two_over_lr"],
                mode="lines",
                name="2/η (schedule)",
                line={"dash": "dash", "color": "black"},
            )
        )
    pre = frame["preconditioned_lambda_max"].map(_num)
    if pre.notna().any():
        fig.add_trace(
            go.Scatter(x=frame["step"], y=pre, mode="lines+markers", name="λ_max(P⁻¹H) (preconditioned)")
        )
        fig.add_trace(
            go.Scatter(
                x=frame["step"],
                y=frame["preconditioned_threshold"].map(_num),
                mode="lines",
                name="preconditioned threshold",
                line={"dash": "dot"},
            )
        )
    fig.update_layout(
        title="Sharpness vs the stability threshold 2/η",
        xaxis_title="step",
        yaxis_title="eigenvalue",
        template=TEMPLATE,
    )
    return fig


def loss_figure(metrics: pd.DataFrame, columns: Sequence[str] = ("train_loss", "test_loss")) -> go.Figure:
    """Loss curves from metrics.csv (log y)."""
    fig = go.Figure()
    for c in columns:
        if c in metrics.columns:
            fig.add_trace(go.Scatter(x=metrics["step"], y=metrics[c], mode="lines", name=c))
    fig.update_layout(
        title="Loss", xaxis_title="step", yaxis_title="loss", yaxis_type="log", template=TEMPLATE
    )
    return fig


# ------------------------------------------------------------------------------------ grokking
def log_step(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with step ≥ 1 (a log axis cannot show step 0)."""
    return frame[frame["step"] >= 1] if "step" in frame.columns else frame


def grokking_figure(metrics: pd.DataFrame) -> go.Figure:
    """Train/test accuracy (left) and loss (right) vs step on a log axis."""
    m = log_step(metrics)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "loss"))
    for c in ("train_acc", "test_acc"):
        if c in m.columns:
            fig.add_trace(go.Scatter(x=m["step"], y=m[c], mode="lines", name=c), row=1, col=1)
    for c in ("train_loss", "test_loss"):
        if c in m.columns:
            fig.add_trace(go.Scatter(x=m["step"], y=m[c], mode="lines", name=c), row=1, col=2)
    fig.update_xaxes(type="log", title_text="step (log)")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="Generalisation over training", template=TEMPLATE)
    return fig


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
    fig.update_xaxes(type="log", title_text="step (log)")
    fig.update_layout(title="Function-space and weight dynamics", template=TEMPLATE, showlegend=False)
    return fig


# ------------------------------------------------------------------------------------ neural collapse
NC_COLUMNS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_etf_distance", "nc3", "nc4", "accuracy")


def nc_frame(results: Mapping[int, Any]) -> pd.DataFrame:
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
        fig.update_yaxes(type="log", row=j // 2 + 1, col=j % 2 + 1)
    fig.update_yaxes(range=[0, 1.05], row=2, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Neural collapse over training", template=TEMPLATE, height=600)
    return fig


# ------------------------------------------------------------------------------------ gradients
COHERENCE_COLUMNS = ("alpha", "alpha_with_self", "m_coherence", "noise_scale", "trace_cov", "grad_norm_sq")


def coherence_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    rows = [
        {"step": s, **{c: _num(getattr(r, c, None)) for c in COHERENCE_COLUMNS}}
        for s, r in sorted(results.items())
    ]
    return pd.DataFrame(rows, columns=["step", *COHERENCE_COLUMNS])


def coherence_figure(frame: pd.DataFrame) -> go.Figure:
    """Gradient coherence α and the simple noise scale B_simple = tr(Σ)/‖g‖² vs step."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("coherence α", "noise scale tr(Σ)/‖g‖²"))
    for c in ("alpha", "m_coherence"):
        fig.add_trace(go.Scatter(x=frame["step"], y=frame[c], mode="lines+markers", name=c), row=1, col=1)
    fig.add_trace(
        go.Scatter(x=frame["step"], y=frame["noise_scale"], mode="lines+markers", name="noise_scale"),
        row=1,
        col=2,
    )
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Gradient coherence and noise scale", template=TEMPLATE)
    return fig


# ------------------------------------------------------------------------------------ double descent
def double_descent_figure(
    frame: pd.DataFrame,
    *,
    x: str,
    y: str,
    threshold: float | None,
    x_title: str,
    log_x: bool = True,
    log_y: bool = False,
) -> go.Figure:
    """Test (and train) error vs model size or epochs, with the interpolation threshold marked."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame[x], y=frame[y], mode="lines+markers", name=y))
    train = y.replace("test", "train")
    if train != y and train in frame.columns:
        fig.add_trace(
            go.Scatter(x=frame[x], y=frame[train], mode="lines+markers", name=train, line={"dash": "dot"})
        )
    add_threshold(fig, threshold, frame[y])
    fig.update_layout(
        title="Double descent",
        xaxis_title=x_title,
        yaxis_title=y,
        template=TEMPLATE,
        xaxis_type="log" if log_x else "linear",
        yaxis_type="log" if log_y else "linear",
    )
    return fig


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
            line={"dash": "dash", "color": "red"},
            hoverinfo="name+x",
        )
    )
