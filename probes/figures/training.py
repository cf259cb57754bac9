"""Training curves and the phenomena pages: losses, grokking, dynamics, double descent, run overlays and
learning-rate sweeps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import PALETTE, finish, log_axis, number
from .curvature import add_threshold


def loss_figure(metrics: pd.DataFrame, columns: Sequence[str] = ("train_loss", "test_loss")) -> go.Figure:
    """Loss curves from metrics.csv (log y)."""
    fig = go.Figure()
    for c in columns:
        if c in metrics.columns:
            fig.add_trace(go.Scatter(x=metrics["step"], y=metrics[c], mode="lines", name=c))
    fig.update_layout(xaxis_title="step", yaxis_title="loss")
    return finish(log_axis(fig), "Loss")


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
    return finish(fig, "Generalisation over training")


def dynamics_frame(trajectory: Any | None, weight_norms: Mapping[int, float]) -> pd.DataFrame:
    """``step, label_alignment, kernel_distance, relative_param_change, weight_norm``."""
    rows: dict[int, dict[str, Any]] = {s: {"step": s, "weight_norm": w} for s, w in weight_norms.items()}
    if trajectory is not None:
        for i, s in enumerate(trajectory.steps):
            row = rows.setdefault(int(s), {"step": int(s)})
            for c in ("label_alignment", "kernel_distance", "relative_param_change"):
                row[c] = number(getattr(trajectory, c)[i])
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
    return finish(fig, "Function-space and weight dynamics", showlegend=False)


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
    return finish(fig, "Double descent")


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
    return finish(fig, title or f"{y_title or y} across runs")


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
    return finish(fig, title or "Final train loss vs learning rate, per width")


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
    return finish(fig, title or f"{y} per width over training")
