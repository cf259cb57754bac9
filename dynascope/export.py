"""Exports of cached probe results: tables (CSV, Parquet, JSON) and figures (HTML, PNG).

A run's result store holds one row per (probe, checkpoint, parameters). :func:`results_frame`
stacks each result's ``to_frame()`` with ``step``, ``checkpoint_hash`` and ``params`` columns in
front (a tidy table across checkpoints); :func:`trajectory_figure` plots a result's scalars (and
short vectors, one line per entry: e.g. λ₁..λ_k) against the checkpoint step. HTML files embed
plotly.js (they open offline); PNG goes through kaleido, which drives a Chrome/Chromium browser.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

FORMATS = ("csv", "parquet", "json", "html", "png")
_MAX_VECTOR = 16  # vectors up to this length become one trajectory line per entry
_SKIP_SERIES = {"n_matvecs"}


class ExportError(ValueError):
    """An export that cannot be made (missing results, unavailable PNG renderer, bad format)."""


def _atomic(path: Path, data: bytes) -> Path:
    from dynascope.probes.results import atomic_write_bytes

    return atomic_write_bytes(path, data)


def write_html(fig: Any, path: str | os.PathLike) -> Path:
    """A self-contained HTML page of a Plotly figure (plotly.js embedded: no network needed)."""
    return _atomic(Path(path), fig.to_html(include_plotlyjs=True, full_html=True).encode())


def write_png(fig: Any, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """A PNG of a Plotly figure rendered by kaleido (needs Chrome/Chromium; ``ExportError`` otherwise)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ExportError("PNG export needs the 'kaleido' package (pip install kaleido)") from None
    try:
        data = fig.to_image(format="png", scale=scale)
    except Exception as exc:  # noqa: BLE001 - kaleido/choreographer raise many types for a missing browser
        raise ExportError(
            "PNG export failed: kaleido could not render with a Chrome/Chromium browser "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
            "install chromium (or run `plotly_get_chrome`), or export --format html instead"
        ) from None
    return _atomic(Path(path), data)


def _entries(store: Any, probe: str, step: int | None = None) -> list[Any]:
    from dynascope.probes.results import Result

    rows = [s for s in store.list(probe) if isinstance(s.result, Result)]
    if step is not None:
        rows = [s for s in rows if s.step == step]
    return rows


def results_frame(store: Any, probe: str, *, step: int | None = None):  # -> pandas.DataFrame
    """Every cached result of ``probe`` (at ``step``) as one table: ``step, checkpoint_hash, params``
    then the columns of the result's ``to_frame()`` (one block of rows per result)."""
    import pandas as pd

    frames = []
    for s in _entries(store, probe, step):
        f = s.result.to_frame().copy()
        f.insert(0, "params", json.dumps(s.params, sort_keys=True))
        f.insert(0, "checkpoint_hash", s.checkpoint_hash)
        f.insert(0, "step", s.step)
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["step", "checkpoint_hash", "params"])
    return pd.concat(frames, ignore_index=True)


def results_json(store: Any, probe: str, *, step: int | None = None) -> list[dict[str, Any]]:
    """Every cached result of ``probe`` as ``{"probe", "step", "checkpoint_hash", "params", "result"}``."""
    return [
        {"probe": probe, "step": s.step, "checkpoint_hash": s.checkpoint_hash, "params": s.params,
         "result": s.result.to_dict()}
        for s in _entries(store, probe, step)
    ]  # fmt: skip


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


def trajectory_figure(store: Any, probe: str, *, title: str | None = None):
    """Plotly figure of every cached ``probe`` result's :func:`scalar_series` against the step.

    With several parameter sets in the store, the one covering the most checkpoints is plotted.
    """
    import plotly.graph_objects as go

    entries = [s for s in _entries(store, probe) if s.step is not None]
    if not entries:
        raise ExportError(f"no cached {probe!r} results with a step to plot")
    groups: dict[str, list[Any]] = {}
    for s in entries:
        groups.setdefault(json.dumps(s.params, sort_keys=True), []).append(s)
    chosen = max(groups.values(), key=lambda g: len({s.step for s in g}))
    latest = {s.step: s for s in sorted(chosen, key=lambda s: s.created)}
    steps = sorted(latest)
    series: dict[str, list[float | None]] = {}
    for i, st in enumerate(steps):
        for name, v in scalar_series(latest[st].result).items():
            series.setdefault(name, [None] * len(steps))[i] = v
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines+markers", name=name))
    note = f" ({len(groups)} parameter sets; showing the widest)" if len(groups) > 1 else ""
    fig.update_layout(
        title=title or f"{probe} across checkpoints{note}",
        xaxis_title="step",
        yaxis_title="value",
        template="plotly_white",
    )
    return fig


def export_results(
    store: Any, probe: str, fmt: str, out: str | os.PathLike, *, step: int | None = None
) -> Path:
    """Write the cached ``probe`` results of ``store`` to ``out`` as ``fmt`` (see :data:`FORMATS`).

    Tables hold every cached result (or those at ``step``). Figures: the probe's own
    ``Result.figure()`` for one result (``step`` given, or a single checkpoint), otherwise
    :func:`trajectory_figure` across checkpoints.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    entries = _entries(store, probe, step)
    if not entries:
        where = f" at step {step}" if step is not None else ""
        raise ExportError(
            f"no cached results for probe {probe!r}{where}; run `dynascope probe {probe} ...` first"
        )
    out = Path(out)
    if fmt == "csv":
        return _atomic(out, results_frame(store, probe, step=step).to_csv(index=False).encode())
    if fmt == "parquet":
        import io

        buf = io.BytesIO()
        frame = results_frame(store, probe, step=step)
        for col in frame.columns:  # mixed-type object columns (e.g. lists) → JSON text for Arrow
            if frame[col].dtype == object:
                frame[col] = frame[col].map(lambda v: v if isinstance(v, str) or v is None else json.dumps(v))
        frame.to_parquet(buf, index=False)
        return _atomic(out, buf.getvalue())
    if fmt == "json":
        return _atomic(out, json.dumps(results_json(store, probe, step=step), indent=2).encode())
    if len({s.step for s in entries}) == 1:
        fig = max(entries, key=lambda s: s.created).result.figure()
    else:
        fig = trajectory_figure(store, probe)
    return write_html(fig, out) if fmt == "html" else write_png(fig, out)


__all__ = [
    "FORMATS",
    "ExportError",
    "export_results",
    "results_frame",
    "results_json",
    "scalar_series",
    "trajectory_figure",
    "write_html",
    "write_png",
]
