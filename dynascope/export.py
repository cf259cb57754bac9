"""Exports of cached probe results: tables (CSV, Parquet, JSON) and figures (HTML, PNG, SVG, PDF).

Tables are tidy (:func:`dynascope.trajectories.tidy_frame`): ``step, setting, quantity, index, value``,
one row per step and quantity; the parameters of each setting and each step's checkpoint hash go once
into a sidecar JSON beside the table (``eig.csv`` → ``eig.params.json``), not into every row. JSON holds
every result whole with its parameters. Figures come from :mod:`dynascope.trajectories`: every checkpoint
of the widest setting on the x axis (one checkpoint: the result's own figure). HTML files embed plotly.js
(they open offline); images go through kaleido, which drives a Chrome/Chromium browser. Files are
written atomically with mode 0644.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dynascope.trajectories import Trajectory, settings

#: What ``dynascope export`` writes (this module imports plotly and torch only when it writes).
FORMATS = ("csv", "parquet", "json", "html", "png", "svg", "pdf")


def _settings(store: Any, probe: str, step: int | None = None) -> list[Trajectory]:
    found = settings(store, probe)
    if step is None:
        return found
    return [
        Trajectory(probe, t.params, {step: t.results[step]}, {step: t.hashes[step]}, t.n_settings)
        for t in found
        if step in t.results
    ]


def results_frame(store: Any, probe: str, *, step: int | None = None):  # -> pandas.DataFrame
    """Every cached result of ``probe`` (at ``step``) as one tidy table: ``step, setting, quantity, index,
    value`` (``setting``: the id of :func:`params_sidecar`'s entry holding its parameters)."""
    import pandas as pd

    frames = []
    for t in _settings(store, probe, step):
        f = t.frame()
        f.insert(1, "setting", t.id)
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["step", "setting", "quantity", "index", "value"])
    return pd.concat(frames, ignore_index=True).sort_values(["step", "setting"], kind="stable")


def params_sidecar(store: Any, probe: str, *, step: int | None = None) -> dict[str, Any]:
    """``{"probe", "settings": {id: {"params", "checkpoints": {step: sha256}}}}``: what
    :func:`results_frame` leaves out."""
    out: dict[str, Any] = {"probe": probe, "settings": {}}
    for t in _settings(store, probe, step):
        side = t.sidecar()
        out["settings"][t.id] = {"params": side["params"], "checkpoints": side["checkpoints"]}
    return out


def sidecar_path(out: str | os.PathLike) -> Path:
    """``eig.csv`` → ``eig.params.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.params.json")


def results_json(store: Any, probe: str, *, step: int | None = None) -> list[dict[str, Any]]:
    """Every cached result of ``probe`` as ``{"probe", "step", "checkpoint_hash", "params", "result"}``."""
    from dynascope.probes.results import Result

    return [
        {"probe": probe, "step": s.step, "checkpoint_hash": s.checkpoint_hash, "params": s.params,
         "result": s.result.to_dict()}
        for s in store.list(probe)
        if isinstance(s.result, Result) and (step is None or s.step == step)
    ]  # fmt: skip


def export_results(
    store: Any, probe: str, fmt: str, out: str | os.PathLike, *, step: int | None = None
) -> Path:
    """Write the cached ``probe`` results of ``store`` to ``out`` as ``fmt`` (see :data:`FORMATS`).

    Tables (``csv``, ``parquet``) are tidy with the parameters in ``<stem>.params.json`` beside them;
    ``json`` holds each result whole. Figures: every checkpoint of the widest setting on the x axis
    (:meth:`~dynascope.trajectories.Trajectory.figure`); with ``step``, that checkpoint's own figure.
    """
    from dynascope.probes.figures import ExportError, write_figure
    from dynascope.probes.results import atomic_write_bytes

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    found = _settings(store, probe, step)
    if not found:
        where = f" at step {step}" if step is not None else ""
        raise ExportError(
            f"no cached results for probe {probe!r}{where}; run `dynascope probe {probe} ...` first"
        )
    out = Path(out)
    if fmt in ("csv", "parquet"):
        frame = results_frame(store, probe, step=step)
        if fmt == "csv":
            data = frame.to_csv(index=False).encode()
        else:
            import io

            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            data = buf.getvalue()
        side = json.dumps(params_sidecar(store, probe, step=step), indent=1, default=str)
        atomic_write_bytes(sidecar_path(out), side.encode())
        return atomic_write_bytes(out, data)
    if fmt == "json":
        return atomic_write_bytes(out, json.dumps(results_json(store, probe, step=step), indent=1).encode())
    return write_figure(found[0].figure(), out, fmt)


__all__ = [
    "FORMATS",
    "export_results",
    "params_sidecar",
    "results_frame",
    "results_json",
    "sidecar_path",
]
