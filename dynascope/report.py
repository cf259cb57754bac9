"""Run report: a short document of everything computed for a run, laid out as a paper appendix.

``build_report(run, "report.html")`` writes ``report.html`` and ``report_files/`` beside it:

1. a first screen: the run (model, data, optimizer, schedule, loss, seed, checkpoints) and the phenomenon
   detector's verdict with its evidence (``recipes.detect_*``, for a recipe run);
2. training: the loss curves (and the λ_max logged in training);
3. one section per probe in the run's result store: its figure with every checkpoint on the x axis
   (:mod:`dynascope.trajectories`, the widest setting), a two-line caption (what it shows; how it was
   computed: operator, data, tolerances, seed), the setting's parameters once, and a compact table of the
   scalar values per step;
4. an appendix: versions and every checkpoint with its sha256 (the result store's key).

The raw numbers go to CSV files in ``report_files/`` (tidy, one row per step and quantity; parameters in
a ``.params.json`` sidecar), never inline. Figures are static SVG inlined in the page when kaleido finds a
Chrome/Chromium browser (the page prints cleanly: a print stylesheet sets A4 pages, and
``build_report(..., pdf=True)`` / ``dynascope report --pdf`` prints it with Chromium); without a browser
they are interactive, with plotly.js written once into ``report_files/``.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DETECTORS = {
    "edge_of_stability": "detect_edge_of_stability",
    "grokking": "detect_grokking",
    "double_descent": "detect_double_descent",
    "neural_collapse": "detect_neural_collapse",
}

#: What each probe's figure shows (the first caption line).
SHOWS = {
    "hessian_eigenvalues": "The top eigenvalues λ₁ ≥ λ₂ ≥ … of the loss Hessian at each checkpoint.",
    "hessian_trace": "The Hessian trace tr(H) at each checkpoint, ±2 standard errors of the estimator.",
    "hessian_density": "The Hessian's spectral density (eigenvalue histogram, smoothed) at each checkpoint.",
    "hessian_diagonal": "The diagonal of the Hessian per parameter tensor.",
    "layerwise_hessian": "The top eigenvalue and trace of each layer's diagonal Hessian block.",
    "blockwise_spectra": "The spectral density of each parameter block's diagonal Hessian block and the "
    "Jensen–Shannon divergence between blocks (their heterogeneity).",
    "sharpness": "λ_max of the Hessian at each checkpoint against the stability threshold 2/η of GD.",
    "gradient_coherence": "Gradient coherence α = E[g_i·g_j]/E‖g_i‖² over pairs i ≠ j, and the noise scale "
    "tr(Σ)/‖g‖².",
    "neural_collapse": "Neural-collapse metrics NC1–NC4 of the penultimate features at each checkpoint.",
    "ntk": "The empirical NTK's eigenvalues and its alignment with the labels.",
    "ntk_trajectory": "How far the NTK moves from initialisation over training (lazy vs rich).",
    "lmc_barrier": "The loss along the straight line between two checkpoints (linear mode connectivity).",
    "loss_landscape": "The loss on a plane or line through the checkpoint (filter-normalised directions).",
    "opposing_signals": "Groups of examples whose losses move in opposition, against λ_max.",
}
#: Parameters that do not say how a value was computed (the run section states them, or they are bookkeeping).
_UNSAID = {"model_spec", "data_spec", "probe_version", "device_class", "compute_dtype", "return_vectors",
           "check_determinism", "params", "split", "max_samples", "sample", "loss", "mode",
           "operator"}  # fmt: skip
_SCREEN_PX = 1000  # one screen of a laptop browser window, for the length bound in the tests
_FIG_WIDTH, _FIG_HEIGHT = 900, 400


@dataclass
class Report:
    """What a report holds: figure titles, table names, files written and notes (e.g. no SVG)."""

    html_path: Path
    files_dir: Path
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pdf_path: Path | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def _fmt(v: Any) -> str:
    """A value as short text: floats to 4 significant digits (in lists too), specs as compact JSON."""
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str, separators=(", ", ": "))
    return "n/a" if v is None else str(v)


def _spec(spec: Any) -> str:
    """``mlp(width=200, depth=2, …)`` for a registry spec, else compact JSON."""
    if isinstance(spec, dict) and "name" in spec:
        rest = ", ".join(f"{k}={_fmt(v)}" for k, v in spec.items() if k != "name")
        return f"{spec['name']}({rest})"
    return _fmt(spec)


def _dl(items: dict[str, str], cls: str = "facts") -> str:
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items.items())
    return f"<dl class='{cls}'>{rows}</dl>"


def _table(frame: Any) -> str:
    return frame.to_html(index=False, border=0, classes="tbl", na_rep="", float_format=lambda v: f"{v:.4g}")


def _how(params: dict[str, Any], result: Any) -> str:
    """The caption's second line: operator, data, tolerances and seed of one setting."""
    meta = getattr(result, "meta", {}) or {}
    n = meta.get("n_samples")
    data = f"{params.get('split', 'train')} split"
    if params.get("max_samples") is not None:
        data += f", {params['max_samples']} samples ({params.get('sample', 'first')})"
    elif n:
        data += f", all {n} samples"
    bits = [data]
    if meta.get("operator") or params.get("operator"):
        bits.insert(0, f"operator: {meta.get('operator') or params.get('operator')}")
    if meta.get("loss") or params.get("loss"):
        bits.append(f"loss {meta.get('loss') or params.get('loss')}")
    bits += [f"{k} = {_fmt(v)}" for k, v in params.items() if k not in _UNSAID and v is not None]
    return "Computed with " + "; ".join(bits) + "."


def _summary_table(results: dict[int, Any], max_rows: int = 12, max_cols: int = 7) -> Any:
    """The scalars that change over the steps (:func:`~dynascope.probes.figures.scalar_series`: scalars,
    then short vectors' first entries), at most ``max_rows`` steps spread over the run and ``max_cols``
    quantities; ``None`` when nothing changes."""
    import pandas as pd

    from dynascope.probes.figures import scalar_series

    rows = {s: scalar_series(r) for s, r in sorted(results.items())}
    wide = pd.DataFrame.from_dict(rows, orient="index")
    if wide.empty:
        return None
    # Hutchinson's single-probe samples and residual norms are in the CSV; the table holds the estimates
    wide = wide[[c for c in wide.columns if c.rpartition("_")[0] not in ("samples", "residuals")]]
    plain = [c for c in wide.columns if not c.rpartition("_")[2].isdigit()]
    firsts = [c for c in wide.columns if c.rpartition("_")[2] in ("1", "2", "3") and c not in plain]
    keep = [c for c in plain + firsts if c != "n_matvecs" and wide[c].nunique(dropna=True) > 1][:max_cols]
    if not keep:
        return None
    wide = wide[keep]
    if len(wide) > max_rows:
        wide = wide.iloc[sorted({round(i * (len(wide) - 1) / (max_rows - 1)) for i in range(max_rows)})]
    return wide.rename_axis("step").reset_index()


def _render(fig: Any, *, static: bool) -> tuple[str, bytes | None]:
    """A figure at the report's size as HTML: inline SVG (and the SVG file's bytes) when ``static``
    (kaleido + Chromium; ``ExportError`` without), else a plotly div (plotly.js loaded once by the page)."""
    import plotly.graph_objects as go

    from dynascope.probes import figures

    fig = go.Figure(fig)
    fig.update_layout(width=_FIG_WIDTH, height=min(int(fig.layout.height or _FIG_HEIGHT), 560))
    if static:
        image = figures.figure_image(fig, "svg", scale=1.0)
        text = image.decode()
        return text[text.index("<svg") :], image
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}), None


def chromium() -> str | None:
    """A Chrome/Chromium executable (``BROWSER_PATH`` first), or ``None``."""
    for name in (os.environ.get("BROWSER_PATH"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


def print_pdf(html_path: Path, pdf_path: Path, *, timeout: float = 120.0) -> Path:
    """Print ``html_path`` to ``pdf_path`` with headless Chromium (its print stylesheet applies);
    ``RuntimeError`` when no browser is found or printing fails."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("--pdf needs Chrome/Chromium (apt-get install chromium, or set BROWSER_PATH)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
               f"--user-data-dir={profile}", f"--print-to-pdf={pdf_path}",
               html_path.resolve().as_uri()]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not pdf_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"Chromium could not print the report to PDF ({tail[0]})")
    os.chmod(pdf_path, 0o644)
    return pdf_path


CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:960px;margin:1.5em auto;color:#222;font-size:15px;
line-height:1.4}
h1{font-size:24px;margin:0 0 .2em}h2{font-size:19px;border-bottom:2px solid #0072B2;padding-bottom:3px;
margin:1.4em 0 .5em}h3{font-size:16px;margin:1.1em 0 .3em}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:.4em 0;font-size:14px}
.facts dt{color:#555}.facts dd{margin:0;overflow-wrap:anywhere}
.evidence{display:grid;grid-template-columns:repeat(3,max-content 1fr);gap:2px 10px;font-size:13px}
.evidence dt{color:#555}.evidence dd{margin:0}
.verdict{border:1px solid #ccc;border-left:6px solid #999;padding:6px 12px;margin:.6em 0}
.verdict.yes{border-left-color:#009E73}.verdict.no{border-left-color:#D55E00}
figure{margin:.4em 0 1em;break-inside:avoid}figure svg,figure img{max-width:100%;height:auto}
figcaption{font-size:13px;color:#333}figcaption .how{color:#666}
.tbl{border-collapse:collapse;font-size:12px;margin:.3em 0}
.tbl td,.tbl th{padding:2px 7px;border-bottom:1px solid #ddd;text-align:right}
.note{color:#666;font-size:13px}code{font-size:12px}
@page{size:A4;margin:15mm 14mm}
@media print{body{max-width:none;margin:0;font-size:10.5pt}h2{break-after:avoid}h3{break-after:avoid}
section.probe{break-inside:avoid-page}.noprint{display:none}a{color:inherit;text-decoration:none}}
"""


def build_report(run: Any, out: str | os.PathLike[str], *, svg: bool = True, pdf: bool = False) -> Report:
    """Write the report of ``run`` (a :class:`~dynascope.models.Run` or its folder) to ``out`` (HTML) and
    ``<out stem>_files/``; ``svg=False``: interactive figures without trying a browser; ``pdf``: also
    ``<out stem>.pdf`` (Chromium). Returns what was written."""
    from dynascope.probes.figures import image_server

    with image_server() if svg else contextlib.nullcontext():
        return _build(run, out, svg=svg, pdf=pdf)


def _build(run: Any, out: str | os.PathLike[str], *, svg: bool, pdf: bool) -> Report:
    import pandas as pd
    import torch

    from dynascope.export import params_sidecar, results_frame
    from dynascope.models import Run
    from dynascope.models.checkpoints import file_sha256
    from dynascope.probes import figures
    from dynascope.probes.results import Result, atomic_write_bytes
    from dynascope.store import STORE_FILENAME, ResultStore
    from dynascope.trajectories import setting, settings
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
    static = [svg]
    parts: list[str] = []

    def rel(path: Path) -> str:
        return html.escape(str(path.relative_to(out.parent)))

    def add_csv(frame: Any, name: str, sidecar: dict[str, Any] | None = None) -> Path:
        path = files / f"{_slug(name)}.csv"
        atomic_write_bytes(path, frame.to_csv(index=False).encode())
        rep.files.append(path)
        rep.tables.append(name)
        if sidecar is not None:
            side = files / f"{_slug(name)}.params.json"
            atomic_write_bytes(side, json.dumps(sidecar, indent=1, default=str).encode())
            rep.files.append(side)
        return path

    def add_figure(fig: Any, name: str, caption: str) -> None:
        body, image = None, None
        if static[0]:
            try:
                body, image = _render(fig, static=True)
            except Exception as exc:  # noqa: BLE001 - no browser: interactive figures instead
                static[0] = False
                rep.notes.append(f"Static SVG figures not drawn ({exc}); the figures are interactive.")
        if body is None:
            body, _ = _render(fig, static=False)
        if image is not None:
            path = files / f"{_slug(name)}.svg"
            rep.files.append(atomic_write_bytes(path, image))
        parts.append(f"<figure>{body}<figcaption>{caption}</figcaption></figure>")
        rep.figures.append(name)

    def add_whole(store: Any, probe: str) -> None:
        rows = [s for s in store.list(probe) if isinstance(s.result, Result)]
        if not rows:
            return
        latest = max(rows, key=lambda s: s.created)
        params = setting(latest.params)
        csv = add_csv(latest.result.to_frame(), probe, {"probe": probe, "params": params})
        over = latest.params.get("checkpoint_steps")
        parts.append(f"<section class='probe'><h3>{html.escape(probe)}</h3>")
        add_figure(
            latest.result.figure(),
            probe,
            f"{html.escape(SHOWS.get(probe, probe))}"
            + (f" Checkpoints {html.escape(_fmt(over))}." if over else "")
            + f"<br><span class='how'>{html.escape(_how(params, latest.result))} "
            f"Numbers: <code>{rel(csv)}</code>.</span>",
        )
        parts.append("</section>")

    # ---------------------------------------------------------------- first screen: run and verdict
    cfg, extra = run.config, (run.extra or {})
    steps = run.steps()
    sched = cfg.get("lr_schedule")
    facts = {
        "model": _spec(cfg.get("model")),
        "data": _spec(cfg.get("dataset")),
        "optimizer": _spec(cfg.get("optimizer")),
        "schedule": _spec(sched) if sched else "constant",
        "loss": _fmt(cfg.get("loss")),
        "seed": _fmt(cfg.get("seed")),
        "checkpoints": f"{len(steps)} (steps {steps[0]}–{steps[-1]})" if steps else "none",
    }
    if cfg.get("notes"):
        facts["notes"] = str(cfg["notes"])
    parts.append(_dl(facts))
    phenomenon = extra.get("phenomenon")
    if phenomenon in DETECTORS:
        from dynascope import recipes

        name = DETECTORS[phenomenon]
        try:
            ev = getattr(recipes, name)(run)
            d = ev.to_dict() if hasattr(ev, "to_dict") else dict(vars(ev))
            yes = bool(d.pop("detected", False))
            title = phenomenon.replace("_", " ").capitalize()
            said = "detected" if yes else "not detected"
            parts.append(
                f"<div class='verdict {'yes' if yes else 'no'}'><b>{title} {said}</b> "
                f"<span class='note'>(<code>{name}</code>, default thresholds)</span>"
                + _dl({k: _fmt(v) for k, v in d.items()}, "evidence")
                + "</div>"
            )  # fmt: skip
            add_csv(pd.DataFrame({"evidence": list(d), "value": [_fmt(v) for v in d.values()]}), "detector")
        except (ValueError, TypeError, KeyError) as exc:
            parts.append(f"<p class='note'>Detector not applicable: {html.escape(str(exc))}</p>")

    # ---------------------------------------------------------------- training
    sweep = extra.get("sweep_variable")  # e.g. double descent: a checkpoint (and metrics row) per model size
    steps_are = f"{sweep} (checkpoint step)" if sweep else "step"
    metrics = run.metrics()
    if len(metrics) and "step" in metrics.columns:
        parts.append("<h2>Training</h2>")
        loss_cols = [c for c in ("train_loss", "test_loss") if c in metrics.columns]
        csv = add_csv(metrics, "metrics")
        if loss_cols:
            fig = figures.loss_figure(metrics[["step", *loss_cols]], loss_cols)
            fig = figures.relabel_steps(fig, steps_are)
            what = (
                f"Loss per {html.escape(str(sweep))} as logged by the sweep (dataset mean)."
                if sweep
                else "Loss over training as logged by the training loop (dataset mean)."
            )
            add_figure(
                figures.log_axis(fig, "x") if sweep else fig,
                "training loss",
                f"{what} <span class='how'>Every logged step: <code>{rel(csv)}</code>.</span>",
            )
        logged = next((c for c in ("sharpness", "lambda_max") if c in metrics.columns), None)
        if logged is not None:
            part = metrics[["step", logged]].dropna()
            fig = figures.overlay_figure({logged: part}, x="step", y=logged, title="λ_max logged in training")
            two = extra.get("two_over_lr")
            if isinstance(two, (int, float)):
                fig.add_hline(y=float(two), line_dash="dash", annotation_text="2/η")
            add_figure(
                fig,
                "sharpness logged in training",
                "λ_max of the training-loss Hessian logged during training (warm-started Lanczos)."
                f"<span class='how'> Values in <code>{rel(csv)}</code>.</span>",
            )

    # ---------------------------------------------------------------- probes
    store_path = run.path / STORE_FILENAME
    if store_path.is_file():
        store = ResultStore(store_path)
        probes = sorted({s.probe for s in store.list()})
        if probes:
            parts.append("<h2>Probes over checkpoints</h2>")
        for probe in probes:
            found = settings(store, probe)
            if not found or found[0].steps == [None]:  # ntk_trajectory: one result spans its checkpoints
                add_whole(store, probe)
                continue
            traj = found[0]
            parts.append(f"<section class='probe'><h3>{html.escape(probe)}</h3>")
            # the tables `dynascope export` writes: every setting, tidy, parameters in the sidecar
            csv = add_csv(results_frame(store, probe), probe, params_sidecar(store, probe))
            last = traj.results[traj.steps[-1]]
            other = f" {len(found) - 1} other setting(s) in the CSV." if len(found) > 1 else ""
            caption = (
                f"{html.escape(SHOWS.get(probe, probe))} {len(traj.steps)} checkpoint(s).{other}<br>"
                f"<span class='how'>{html.escape(_how(traj.params, last))} "
                f"Numbers: <code>{rel(csv)}</code>.</span>"
            )
            try:
                add_figure(traj.figure(x_title=steps_are), f"{probe}", caption)
            except Exception as exc:  # noqa: BLE001 - a result without a figure still has its numbers
                rep.notes.append(f"{probe}: no figure ({exc})")
                parts.append(f"<p class='note'>{caption}</p>")
            table = _summary_table(traj.results) if len(traj.steps) > 1 else None
            if table is not None:
                parts.append(_table(table))
            parts.append("</section>")

    # ---------------------------------------------------------------- appendix
    parts.append("<h2>Appendix: provenance</h2>")
    parts.append(
        _dl({
            "run folder": str(run.path),
            "recipe": str(extra.get("recipe") or "—"),
            "created": str(cfg.get("created") or "—"),
            "versions": f"dynascope {__version__}, torch {torch.__version__}, "
            f"python {platform.python_version()}",
        })
    )  # fmt: skip

    def where(p: Any) -> str:
        p = Path(p)
        return str(p.relative_to(run.path)) if p.is_relative_to(run.path) else str(p)

    ckpts = pd.DataFrame(
        [{"step": c.step, "file": where(c.path), "sha256": file_sha256(c.path)} for c in run.checkpoints()],
        columns=["step", "file", "sha256"],
    )
    csv = add_csv(ckpts, "checkpoints")
    if len(ckpts):
        parts.append(
            "<p class='note'>Checkpoints and their sha256 (the result store's key): "
            f"<code>{rel(csv)}</code>. First and last:</p>" + _table(ckpts.iloc[[0, -1]])
        )

    # ---------------------------------------------------------------- page
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in rep.notes)
    head_js = ""
    if not static[0] and rep.figures:
        from importlib.resources import files as package_files

        js = files / "plotly.min.js"
        atomic_write_bytes(js, (package_files("plotly") / "package_data" / "plotly.min.js").read_bytes())
        rep.files.append(js)
        head_js = f'<script src="{rel(js)}" charset="utf-8"></script>'
    title = f"dynascope report: {run.path.name}"
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style>{head_js}</head><body><h1>{html.escape(title)}</h1>{notes}{"".join(parts)}</body></html>"""
    atomic_write_bytes(out, page.encode())
    if pdf:
        try:
            rep.pdf_path = print_pdf(out, out.with_suffix(".pdf"))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(str(exc)) from None
    return rep
