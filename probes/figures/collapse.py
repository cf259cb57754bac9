"""Neural-collapse figures NC1–NC4: one result, a trajectory result, and across checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..collapse import NC_FIELDS
from .base import columns_frame, finish, log_axis


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
    return finish(fig, "Neural collapse", showlegend=False)


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
    return finish(fig, "Neural collapse over training", height=620)


NC_COLUMNS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_etf_distance", "nc3", "nc4", "accuracy")


def nc_frame(results: Mapping[int, Any]) -> pd.DataFrame:
    """``step`` and the NC metrics, one row per checkpoint."""
    return columns_frame(results, NC_COLUMNS)


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
    return finish(fig, "Neural collapse over training", height=640)
