"""Run report: one self-contained HTML page of everything computed for a run, plus a folder of SVG/CSV.

``write_report(run, "report.html")`` writes ``report.html`` (plotly.js embedded once: it opens offline)
and ``report_files/`` beside it: one CSV per table and, when a Chrome/Chromium browser is available to
kaleido, one SVG per figure (for papers). Sections:

* meta — the run (folder, model/data/optimizer specs, loss, seed, notes), versions (dynascope, torch,
  python), every checkpoint with its sha256 (the hash the result store keys on) and the data used by
  each cached result (split, ``max_samples``, subset);
* training metrics — metrics.csv (loss curves, the logged sharpness) as figures and a CSV;
* every probe in the run's result store — its figure across checkpoints (or the single result's own
  figure) and its table (:func:`dynascope.export.results_frame`);
* detector evidence — the phenomenon detector of a recipe run (``recipes.detect_*``), verdict and values.
"""

from __future__ import annotations

import html
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DETECTORS = {
    "edge_of_stability": "detect_edge_of_stability",
    "grokking": "detect_grokking",
    "double_descent": "detect_double_descent",
}


@dataclass
class Report:
    """What a report holds: figure titles, table names, files written and notes (e.g. no SVG)."""

    html_path: Path
    files_dir: Path
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _table_html(frame: Any, max_rows: int = 200) -> str:
    shown = frame.head(max_rows)
    more = (
        f"<p class='note'>{len(frame) - max_rows} more rows in the CSV.</p>" if len(frame) > max_rows else ""
    )
    return shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="tbl") + more


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def build_report(run: Any, out: str | os.PathLike[str], *, svg: bool = True) -> Report:
    """Write the report of ``run`` (a :class:`~dynascope.models.Run` or its folder) to ``out`` (HTML)
    and ``<out stem>_files/``; returns what was written."""
    import pandas as pd
    import torch

    from dynascope.export import results_frame
    from dynascope.models import Run
    from dynascope.probes import figures
    from dynascope.probes.results import atomic_write_bytes
    from dynascope.store import STORE_FILENAME, ResultStore
    from dynascope.version import __version__

    run = Run.open(run) if isinstance(run, (str, os.PathLike)) else run
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out '{out}' is a folder; give a file name, e.g. {out / 'report.html'}")
    if not out.parent.is_dir():
        raise ValueError(f"the folder of '{out}' does not exist ({out.parent}); create it")
    files = out.parent / f"{out.stem}_files"
    files.mkdir(exist_ok=True)
    rep = Report(html_path=out, files_dir=files)
    parts: list[str] = []
    first_fig = [True]

    def add_figure(fig: Any, name: str) -> None:
        parts.append(
            fig.to_html(full_html=False, include_plotlyjs=first_fig[0], config={"displaylogo": False})
        )
        first_fig[0] = False
        rep.figures.append(name)
        if svg:
            try:
                path = files / f"{_slug(name)}.svg"
                atomic_write_bytes(path, figures.figure_image(fig, "svg", scale=1.0))
                rep.files.append(path)
            except Exception as exc:  # noqa: BLE001 - no browser: the HTML still holds the figure
                if not any(n.startswith("SVG") for n in rep.notes):
                    rep.notes.append(f"SVG files not written: {exc}")

    def add_table(frame: Any, name: str, caption: str = "") -> None:
        path = files / f"{_slug(name)}.csv"
        atomic_write_bytes(path, frame.to_csv(index=False).encode())
        rep.files.append(path)
        rep.tables.append(name)
        cap = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
        rel = html.escape(str(path.relative_to(out.parent)))
        parts.append(
            f"<h3>{html.escape(name)}</h3>{cap}{_table_html(frame)}"
            f"<p class='note'>CSV: <code>{rel}</code></p>"
        )

    # ---------------------------------------------------------------- meta
    cfg = run.config
    meta = {
        "run folder": str(run.path),
        "model": json.dumps(cfg.get("model"), sort_keys=True, default=str),
        "dataset": json.dumps(cfg.get("dataset"), sort_keys=True, default=str),
        "optimizer": json.dumps(cfg.get("optimizer"), sort_keys=True, default=str),
        "lr schedule": json.dumps(cfg.get("lr_schedule"), default=str),
        "loss": str(cfg.get("loss")),
        "seed": str(cfg.get("seed")),
        "notes": str(cfg.get("notes") or ""),
        "recipe": str((run.extra or {}).get("recipe") or ""),
        "created": str(cfg.get("created") or ""),
        "dynascope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    parts.append("<h2>Run</h2>")
    parts.append(_table_html(pd.DataFrame({"field": list(meta), "value": list(meta.values())})))
    from dynascope.models.checkpoints import file_sha256

    def _where(p: Any) -> str:
        p = Path(p)
        return str(p.relative_to(run.path)) if p.is_relative_to(run.path) else str(p)

    ckpts = pd.DataFrame(
        [
            {"step": c.step, "file": _where(c.path), "sha256": file_sha256(c.path),
             "optimizer state": c.optimizer_path is not None}
            for c in run.checkpoints()
        ]
    )  # fmt: skip
    add_table(ckpts, "checkpoints", "Each checkpoint file and its sha256 (the result store's key).")

    # ---------------------------------------------------------------- metrics
    metrics = run.metrics()
    if len(metrics):
        parts.append("<h2>Training metrics</h2>")
        loss_cols = [c for c in ("train_loss", "test_loss") if c in metrics.columns]
        x = "step" if "step" in metrics.columns else metrics.columns[0]
        if loss_cols and x == "step":
            add_figure(figures.loss_figure(metrics[["step", *loss_cols]], loss_cols), "training loss")
        logged = next((c for c in ("sharpness", "lambda_max") if c in metrics.columns), None)
        if logged is not None:
            part = metrics[["step", logged]].dropna()
            fig = figures.overlay_figure({logged: part}, x="step", y=logged, title="λ_max logged in training")
            add_figure(fig, "sharpness logged in training")
        add_table(metrics, "metrics", "metrics.csv as logged by the training loop.")

    # ---------------------------------------------------------------- probes
    store_path = run.path / STORE_FILENAME
    if store_path.is_file():
        store = ResultStore(store_path)
        probes = sorted({s.probe for s in store.list()})
        if probes:
            parts.append("<h2>Computed probes</h2>")
        for probe in probes:
            entries = store.list(probe)
            parts.append(f"<h3>{html.escape(probe)}</h3>")
            used = sorted(
                {(s.params.get("split"), s.params.get("max_samples"), s.params.get("sample", "first"))
                 for s in entries},
                key=str,
            )  # fmt: skip
            data = "; ".join(
                f"{sp} split, " + ("all samples" if n is None else f"{n} samples ({sm})")
                for sp, n, sm in used
            )
            parts.append(
                f"<p class='note'>{len(entries)} cached result(s). Data used: {html.escape(data)}.</p>"
            )
            with_step = [s for s in entries if s.step is not None]
            try:
                if len({s.step for s in with_step}) > 1:
                    add_figure(figures.trajectory_figure(store, probe), f"{probe} across checkpoints")
                else:
                    latest = max(entries, key=lambda s: s.created)
                    add_figure(latest.result.figure(), f"{probe}")
            except Exception as exc:  # noqa: BLE001 - a result without a figure still has its table
                rep.notes.append(f"{probe}: no figure ({exc})")
            add_table(results_frame(store, probe), f"{probe} results")

    # ---------------------------------------------------------------- detectors
    phenomenon = (run.extra or {}).get("phenomenon")
    if phenomenon in DETECTORS:
        from dynascope import recipes

        parts.append("<h2>Detector evidence</h2>")
        try:
            ev = getattr(recipes, DETECTORS[phenomenon])(run)
            d = ev.to_dict() if hasattr(ev, "to_dict") else dict(vars(ev))
            verdict = "detected" if d.pop("detected", False) else "not detected"
            parts.append(f"<p><b>{html.escape(phenomenon.replace('_', ' '))} {verdict}</b> "
                         f"(<code>{DETECTORS[phenomenon]}</code>, default thresholds)</p>")  # fmt: skip
            add_table(
                pd.DataFrame({"evidence": list(d), "value": [str(v) for v in d.values()]}),
                "detector evidence",
            )
        except (ValueError, TypeError, KeyError) as exc:
            parts.append(f"<p class='note'>Detector not applicable: {html.escape(str(exc))}</p>")

    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in rep.notes)
    title = f"dynascope report: {run.path.name}"
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
.tbl{{border-collapse:collapse;font-size:13px}}
.tbl td,.tbl th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}}
.note{{color:#666;font-size:13px}}h2{{border-bottom:2px solid #0072B2;padding-bottom:4px}}</style>
</head><body><h1>{html.escape(title)}</h1>{notes}{"".join(parts)}</body></html>"""
    atomic_write_bytes(out, page.encode())
    return rep
