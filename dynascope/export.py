"""Exports of cached probe results: tables (CSV, Parquet, JSON) and figures (HTML, PNG, SVG, PDF).

A run's result store holds one row per (probe, checkpoint, parameters). :func:`results_frame`
stacks each result's ``to_frame()`` with ``step``, ``checkpoint_hash`` and ``params`` columns in
front (a tidy table across checkpoints). Figures come from :mod:`dynascope.probes.figures`: the
result's own figure for one checkpoint, else its ``trajectory_figure`` (a result's scalars and short
vectors, one line per entry: e.g. λ₁..λ_k, against the checkpoint step). HTML files embed plotly.js
(they open offline); images go through kaleido, which drives a Chrome/Chromium browser.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dynascope.probes.figures import ExportError, trajectory_figure, write_figure
from dynascope.probes.results import atomic_write_bytes

FORMATS = ("csv", "parquet", "json", "html", "png", "svg", "pdf")


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
        return atomic_write_bytes(out, results_frame(store, probe, step=step).to_csv(index=False).encode())
    if fmt == "parquet":
        import io

        buf = io.BytesIO()
        frame = results_frame(store, probe, step=step)
        for col in frame.columns:  # mixed-type object columns (e.g. lists) → JSON text for Arrow
            if frame[col].dtype == object:
                frame[col] = frame[col].map(lambda v: v if isinstance(v, str) or v is None else json.dumps(v))
        frame.to_parquet(buf, index=False)
        return atomic_write_bytes(out, buf.getvalue())
    if fmt == "json":
        return atomic_write_bytes(out, json.dumps(results_json(store, probe, step=step), indent=2).encode())
    if len({s.step for s in entries}) == 1:
        fig = max(entries, key=lambda s: s.created).result.figure()
    else:
        fig = trajectory_figure(store, probe)
    return write_figure(fig, out, fmt)


__all__ = ["FORMATS", "ExportError", "export_results", "results_frame", "results_json"]
