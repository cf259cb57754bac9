"""Runs: pick a run folder (built-in demos, a path on disk) or upload checkpoints; inspect its checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import streamlit as st
from lib import demos, downloads, errors, live, own, state, uploads

from dynascope.datasets import available as datasets_available
from dynascope.datasets import defaults as dataset_defaults
from dynascope.models import Run, RunError, normalize_config
from dynascope.models import available as models_available
from dynascope.probes import figures
from dynascope.store import ResultStore
from dynascope.tracker import run_status

st.title("Runs")
root = state.runs_dir()
st.caption(f"Run folders are read from `{root}` (set `DYNASCOPE_RUNS_DIR` or `dynascope app --runs-dir`).")

# ------------------------------------------------------------------ demos (first start)
if demos.auto_generation_enabled():
    with errors.guard("Generating the demo runs"):
        job = demos.start_generation(root)
        if job is not None:

            @st.fragment(run_every=None if job.done else 2.0)
            def _demo_progress() -> None:
                demos.show_progress(job)

            _demo_progress()

# ------------------------------------------------------------------ pick a run
st.subheader("Pick a run")
runs = state.known_runs()
if runs:
    state.run_selectbox(st, key="runs_page_pick", label_text="Run folder")
else:
    st.info(f"No run folders in `{root}` yet: open one from disk or upload checkpoints below.")

with st.form("open_path", border=False):
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    path_text = c1.text_input("…or open a run folder on disk", placeholder="/path/to/run", key="runs_path")
    if c2.form_submit_button("Open"):
        with errors.guard("Opening the run folder"):
            if not path_text.strip():
                raise ValueError("enter the path of a run folder (it holds run.json)")
            state.select_run(path_text.strip())
            st.rerun()

# ------------------------------------------------------------------ upload
with st.expander("Upload checkpoints as a new run", expanded=not runs):
    st.caption(
        "Checkpoints (`.pt`, `.safetensors`, Lightning `.ckpt`) are loaded safely (no arbitrary pickles) "
        "into the architecture you name, then saved as a new run folder under "
        f"`{root / uploads.UPLOADS_FOLDER}`."
    )
    models = models_available()
    datasets = datasets_available()
    m_col, d_col = st.columns(2)
    model_name = m_col.selectbox(
        "Architecture", models, index=models.index("mlp") if "mlp" in models else 0, key="up_model"
    )
    dataset_name = d_col.selectbox(
        "Dataset", datasets, index=datasets.index("digits") if "digits" in datasets else 0, key="up_dataset"
    )
    with st.form("upload", border=False):
        files = st.file_uploader(
            "Checkpoint files",
            type=list(uploads.UPLOAD_SUFFIXES),
            accept_multiple_files=True,
            key="up_files",
        )
        c1, c2 = st.columns(2)
        try:
            example = {k: v for k, v in normalize_config(model_name).items() if k != "name"}
        except (ValueError, TypeError):
            example = {"in_dim": 64, "width": 32, "depth": 2, "out_dim": 10} if model_name == "mlp" else {}
        model_json = c1.text_area(
            "Model config (JSON)",
            value=json.dumps(example),
            key=f"up_model_json_{model_name}",
            help=f"Keyword arguments of `dynascope.models.build({model_name!r}, ...)`.",
        )
        data_json = c2.text_area(
            "Dataset config (JSON)",
            value=json.dumps({k: v for k, v in dataset_defaults(dataset_name).items() if k != "seed"}),
            key=f"up_data_json_{dataset_name}",
            help=f"Keyword arguments of `dynascope.datasets.load({dataset_name!r}, ...)`.",
        )
        c3, c4, c5 = st.columns(3)
        run_name = c3.text_input("Run name", value="my-upload", key="up_name")
        loss = c4.selectbox("Training loss", ["auto", "cross_entropy", "mse"], key="up_loss")
        lr = c5.number_input("Learning rate (optional, for 2/η)", min_value=0.0, value=0.0, format="%g")
        submitted = st.form_submit_button("Create run from upload", type="primary")
    if submitted:
        with errors.guard("Importing the upload"):
            report = uploads.import_checkpoints(
                [(f.name, f.getvalue()) for f in (files or [])],
                runs_root=root,
                run_name=run_name,
                model_name=model_name,
                model_config=uploads.parse_json_object(model_json, "the model config"),
                dataset_name=dataset_name,
                dataset_config=uploads.parse_json_object(data_json, "the dataset config"),
                loss=None if loss == "auto" else loss,
                lr=lr or None,
            )
            for name, exc in report.errors.items():
                st.error(f"**{name}** was not imported. {errors.describe(exc)}")
            if report.run is None:
                st.warning("No run was created: none of the files could be loaded.")
            else:
                state.select_run(report.run.path)
                st.success(
                    f"Created run `{state.label(report.run.path)}` with "
                    f"{len(report.steps)} checkpoint(s) (steps {sorted(report.steps.values())})."
                )

# ------------------------------------------------------------------ your own model: a checkpoint folder
with st.expander("Import a checkpoint folder (your own model, data and loss)", expanded=False):
    st.caption(
        "A Hugging Face `Trainer` output folder (`checkpoint-N/`), Lightning `*.ckpt` files or `.pt` / "
        "`.safetensors` files with the step in their names. Model: a registry name, JSON "
        '(`{"name": ...}`, `{"factory": "pkg.mod:fn", "kwargs": {...}}`, `{"hf": "save_pretrained folder"}`) '
        "or `pkg.mod:fn` / `path/file.py:fn`. Data: a dataset name, JSON "
        '(`{"file": "d.safetensors", "x": "x", "y": "y"}`, `{"file": "t.parquet", "label": "y"}`) or a '
        "factory. Loss: `cross_entropy`, `mse`, `half_sse`, `token_cross_entropy`, "
        '`{"name": "token_cross_entropy", "shift": true}` or `pkg.mod:fn`. **Factories are imported from '
        "this Python environment or a file path on this machine, never from an uploaded file.** The specs "
        "are checked by a dry run (build the model, load the first checkpoint, one forward pass on one "
        "batch, the loss's shape) before the run is created under "
        f"`{root / own.OWN_FOLDER}`."
    )
    own_folder = st.text_input("Checkpoint folder", placeholder="/path/to/trainer/output", key="own_folder")
    o1, o2, o3 = st.columns(3)
    own_model = o1.text_area("Model spec", placeholder='{"hf": "/path/to/model"}', key="own_model")
    own_data = o2.text_area("Data spec", placeholder="pkg.data:make_tokens", key="own_data")
    own_loss = o3.text_input("Loss spec", value="auto", key="own_loss")
    o4, o5 = st.columns(2)
    own_name = o4.text_input("Run name", value="my-model", key="own_name")
    own_copy = o5.checkbox("Copy the weights into the run (default: read them in place)", key="own_copy")
    b1, b2 = st.columns(2)
    check_clicked = b1.button("Check (dry run)", key="own_check")
    create_clicked = b2.button("Create run from folder", type="primary", key="own_create")
    if check_clicked or create_clicked:
        with errors.guard("Checking the specs" if check_clicked else "Importing the folder"):
            specs = (
                own.parse_spec(own_model, "model spec"),
                own.parse_spec(own_data, "data spec"),
                None if own_loss.strip() in ("", "auto") else own.parse_spec(own_loss, "loss spec"),
            )
            if check_clicked:
                result = own.check_folder(own_folder, *specs)
                st.success(
                    f"{len(result.scan.checkpoints)} {result.scan.layout} checkpoint(s) (steps "
                    f"{result.scan.steps}). {result.report.summary()}"
                )
            else:
                new_run, result = own.create_run(own_folder, root, own_name, *specs, copy=own_copy)
                state.select_run(new_run.path)
                st.success(
                    f"Created run `{state.label(new_run.path)}` from {len(result.scan.checkpoints)} "
                    f"{result.scan.layout} checkpoint(s). {result.report.summary()}"
                )

# ------------------------------------------------------------------ details of the selected run
run: Run | None = state.current_run()
if run is None:
    st.stop()
st.divider()
st.subheader(f"Run `{state.label(run.path)}`")
# the run's identity in full (st.metric would cut long spec labels such as factory paths)
summary = {
    "Model": own.spec_label(run.model_config),
    "Dataset": own.spec_label(run.dataset_config),
    "Optimizer": (run.optimizer_config or {}).get("name", "—"),
    "Loss": str(run.config.get("loss") or "auto"),
}
for col, (name, value) in zip(st.columns(4), summary.items(), strict=True):
    col.caption(name)
    col.markdown(f"`{value}`")
if run.notes:
    st.caption(run.notes)
with st.expander("run.json"):
    st.json(run.config, expanded=1)
state.trust_box(run)

# ------------------------------------------------------------------ live: a run still being written
follow = st.toggle(
    f"Follow this run as it is written (refresh every {live.POLL_S:g} s)",
    value=live.is_live(run.path),
    key=f"runs_follow_{run.path}",
    help=f"On by default when the run folder changed in the last {live.LIVE_WINDOW_S:.0f} s.",
)


def _checkpoint_frame(current: Run) -> pd.DataFrame:
    """One row per checkpoint: step, epoch, lr, the metrics saved with it, optimizer state, size."""
    rows = []
    for ck in current.checkpoints():
        row = {"step": ck.step, "epoch": ck.epoch}
        try:
            row["lr"] = current.lr_at(ck.step)
        except (RunError, ValueError, TypeError):
            row["lr"] = None
        for k, v in ck.metrics.items():
            row[k] = v
        row["optimizer state"] = ck.optimizer_path is not None
        row["size (KiB)"] = round(ck.path.stat().st_size / 1024, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _tracker_probes(path: str) -> None:
    """A Tracker's inline probes: planned vs done, the interval it can keep, and why it is longer."""
    status = run_status(path)
    probes = (status or {}).get("probes") or {}
    if not probes:
        return
    rows = [
        {"probe": name, "requested every": s.get("every_requested"), "every now": s.get("every"),
         "possible every": s.get("possible_every"), "planned": s.get("planned"), "done": s.get("done"),
         "skipped": s.get("skipped"), "error": s.get("error")}
        for name, s in probes.items()
    ]  # fmt: skip
    where = status.get("probe_worker", "inline")
    where = "a background worker process" if where == "process" else "the training thread"
    st.markdown(f"**Inline probes** (Tracker; computed on {where}): planned vs done")
    downloads.table(pd.DataFrame(rows), key="runs_tracker_probes")
    for s in probes.values():
        if s.get("cadence_note"):
            st.warning(s["cadence_note"])
    if status.get("probe_worker_note"):
        st.caption(status["probe_worker_note"])


@st.fragment(run_every=live.POLL_S if follow else None)
def _run_view(path: str) -> None:
    """Checkpoints and metrics, re-read from the folder on every poll while the run is followed."""
    try:
        current = Run.open(path)
        steps, metrics = current.steps(), current.metrics()
        checkpoints = _checkpoint_frame(current)
    except (RunError, OSError) as exc:  # a half-written file: the next poll reads it again
        st.caption(f"Waiting for the run folder: {exc}")
        return
    if follow:
        with st.container(border=True, key="runs_live"):
            c = st.columns(4)
            c[0].metric("Checkpoints", len(steps))
            c[1].metric("Latest checkpoint step", steps[-1] if steps else "—")
            c[2].metric("Metric rows", len(metrics))
            c[3].metric("Last write", f"{max(time.time() - live.last_write(Path(path)), 0):.0f} s ago")
            loss_cols = [k for k in ("train_loss", "test_loss") if k in metrics.columns]
            if loss_cols and "step" in metrics.columns and len(metrics):
                data = metrics[["step", *loss_cols]]
                st.plotly_chart(figures.loss_figure(data, loss_cols), key="runs_live_loss")
    _tracker_probes(path)
    if len(checkpoints):
        st.markdown(f"**Checkpoints** ({len(checkpoints)})")
        downloads.table(checkpoints, key="runs_ckpt_table")
    else:
        st.warning("This run has no checkpoints.")
    if len(metrics) > 0:
        st.markdown(f"**Logged metrics** ({len(metrics)} rows of `metrics.csv`)")
        downloads.table(metrics, height=220, key="runs_metrics_table")


with errors.guard("Reading the run"):
    _run_view(str(run.path))

with errors.guard("Reading the result store"):
    cached = ResultStore(run.path).catalogue()
    st.markdown(f"**Result store**: {len(cached)} cached probe result(s) in `results.sqlite`.")
    if len(cached):
        counts = cached.groupby("probe").size().rename("results").reset_index()
        downloads.table(counts, key="runs_store_table")

# ------------------------------------------------------------------ report
with st.container(border=True, key="runs_report"):
    st.markdown(
        "**Run report**: a short document of everything computed for this run, laid out as a paper "
        "appendix — the run and the detector's verdict first, then one figure per probe over its checkpoints "
        "with a caption saying how it was computed; the raw numbers as CSV files (in the zip). Print it to "
        f"PDF from the browser, or from a shell: `dynascope report {run.path} --out report.html --pdf`."
    )
    if st.button("Build the report", key="runs_report_build"):
        with errors.guard("Run report"), st.spinner("Writing the report…"):
            import io
            import tempfile
            import zipfile

            from dynascope.report import build_report

            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / f"{downloads.slug(run.path.name)}_report.html"
                rep = build_report(run, out)
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                    zf.write(out, out.name)
                    for f in rep.files:
                        zf.write(f, f"{rep.files_dir.name}/{f.name}")
                st.session_state["runs_report_payload"] = (
                    str(run.path),
                    out.name,
                    out.read_bytes(),
                    buf.getvalue(),
                )
                st.session_state["runs_report_summary"] = (
                    f"{len(rep.figures)} figures ({', '.join(rep.figures)}), {len(rep.tables)} tables"
                    + ("; " + "; ".join(rep.notes) if rep.notes else "")
                )
    payload = st.session_state.get("runs_report_payload")
    if payload and payload[0] == str(run.path):
        _, name, page_bytes, zip_bytes = payload
        st.caption(f"Report ready: {st.session_state.get('runs_report_summary', '')}.")
        row = st.container(horizontal=True, gap="small")
        row.download_button(
            "Report (HTML)", page_bytes, name, "text/html", key="runs_report_html", on_click="ignore"
        )
        row.download_button(
            "Report + SVG/CSV (zip)", zip_bytes, name.replace(".html", ".zip"), "application/zip",
            key="runs_report_zip", on_click="ignore",
        )  # fmt: skip
