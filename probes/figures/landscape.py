"""Loss-landscape views (1-D lines, 2-D surfaces with trajectories) and opposing-signal groups."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import PALETTE, finish, floats


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
        return finish(fig, title or f"{value} along {kinds[0]}")
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
    return finish(fig, title or head)


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
        share = floats(result.group_step_share[g])
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
    return finish(fig, title or head, barmode="relative", height=300 * rows)
