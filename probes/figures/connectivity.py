"""Linear mode connectivity: the loss along the path, and layer-wise barriers."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import finish


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
    return finish(fig, f"Linear mode connectivity — barrier {result.barrier:.4g}")


def lmc_layerwise(layers: pd.DataFrame) -> go.Figure:
    """Per layer group, when only that group is interpolated (``LMCResult.layerwise_frame()``): the
    barrier above the chord and, when present, the loss rise over model A (max_α L(α) − L(0))."""
    fig = go.Figure(go.Bar(x=layers["group"], y=layers["barrier"], name="barrier (above the chord)"))
    if "max_rise" in layers.columns and layers["max_rise"].notna().any():
        fig.add_trace(go.Bar(x=layers["group"], y=layers["max_rise"], name="loss rise over A"))
    fig.update_layout(xaxis_title="layer group", yaxis_title="loss", barmode="group")
    return finish(fig, "Layer-wise loss barriers")
