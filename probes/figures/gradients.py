"""Gradient coherence α, m-coherence and the noise scale: one result and across checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import PALETTE, columns_frame, finish, log_axis


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
    return finish(fig, head)


COHERENCE_COLUMNS = ("alpha", "alpha_with_self", "m_coherence", "noise_scale", "trace_cov", "grad_norm_sq")


def coherence_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step`` and the coherence statistics, one row per checkpoint."""
    return columns_frame(results, COHERENCE_COLUMNS)


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
    return finish(fig, "Gradient coherence and noise scale", showlegend=False)
