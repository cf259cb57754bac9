"""The look shared by every figure: the ``dynascope`` Plotly template (:data:`TEMPLATE`), decade-only log
axes (:func:`log_axis`), number helpers and :class:`ExportError`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

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


def finish(fig: go.Figure, title: str, **layout: Any) -> go.Figure:
    """Title and template; with subplot titles the legend goes above them (it would cover them)."""
    fig.update_layout(title={"text": title}, template=TEMPLATE, **layout)
    if fig.layout.annotations and "legend" not in layout and len(fig.data) > 1:
        fig.update_layout(legend={"y": 1.06}, margin={"t": 120})
    return fig


def number(v: Any) -> float:
    """A float (NaN for None / non-numbers)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def floats(v: Any) -> list[float]:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return [number(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def columns_frame(results: Mapping[int, Any], columns: Sequence[str]) -> pd.DataFrame:
    """``step`` and the scalar fields ``columns`` of ``{step: Result}``, one row per checkpoint (NaN where
    a result lacks one)."""
    rows = [
        {"step": s, **{c: number(getattr(r, c, None)) for c in columns}} for s, r in sorted(results.items())
    ]
    return pd.DataFrame(rows, columns=["step", *columns])


class ExportError(ValueError):
    """An export that cannot be made (missing results, unavailable renderer, bad format)."""
