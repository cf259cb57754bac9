"""Empirical NTK figures: the Gram matrix and its spectrum, and kernel dynamics over a trajectory."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import finish, log_axis


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
    return finish(fig, head, showlegend=False)


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
    return finish(fig, "NTK trajectory (lazy → rich)", showlegend=False, height=620)
