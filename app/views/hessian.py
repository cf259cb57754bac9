"""Hessian: top-k eigenvalues over checkpoints, spectral density, per-layer spectra, trace with error bars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st
from lib import compute, downloads, errors, state

from dynascope import runner
from dynascope.probes import figures
from dynascope.probes.trace import TRACE_METHODS

st.title("Hessian spectrum")
run = state.require_run()
state.page_settings_for("hess", run)
st.caption(
    "Curvature of the run's training loss (dataset mean, eval mode) by Lanczos on exact Hessian-vector "
    "products. Results are cached in the run's result store: nothing is computed twice."
)

steps = compute.checkpoint_picker(run, key="hess")
split, max_samples, sample = compute.data_controls(run, key="hess")


def sweep_chart(
    key: str,
    probe: str,
    params: dict[str, Any],
    *,
    label: str,
    button: str,
    frame_of: Callable[[dict[int, Any]], Any],
    figure_of: Callable[[Any], Any],
    name: str,
    extra: Callable[[dict[int, Any]], dict[str, Any]] | None = None,
) -> None:
    """One probe over the selected checkpoints: cached results plus a compute button, then its chart."""
    with errors.guard(label):
        results = compute.sweep_panel(
            run, probe, steps, key=key, params=params, split=split, max_samples=max_samples, sample=sample,
            label=label, button=button,
        )  # fmt: skip
        if results:
            frame = frame_of(results)
            fig = figures.relabel_steps(figure_of(frame), state.step_label(run))
            downloads.chart(
                fig, frame, f"{state.label(run.path)}_{name}", key=key,
                extra_json=extra(results) if extra else None,
            )  # fmt: skip


tab_topk, tab_density, tab_layers, tab_blocks, tab_trace = st.tabs(
    ["Top-k eigenvalues", "Spectral density", "Per layer", "Blockwise spectra", "Trace"]
)

with tab_topk:
    c1, c2, c3 = st.columns(3)
    k = int(c1.number_input("k (eigenvalues)", 1, 20, 3, key="hess_k"))
    tol = float(c2.select_slider("Residual tolerance", [1e-2, 1e-3, 1e-4, 1e-5], 1e-3, key="hess_tol"))
    log_y = c3.toggle("Log y-axis", key="hess_topk_log")
    sweep_chart(
        "hess_topk", "hessian_eigenvalues", {"k": k, "tol": tol}, label="Hessian top-k (Lanczos)",
        button="Compute top-k eigenvalues", frame_of=figures.topk_frame,
        figure_of=lambda f: figures.topk_figure(f, log_y=log_y), name="hessian_topk",
        extra=lambda rs: {"results": {s: r.to_dict() for s, r in rs.items()}},
    )  # fmt: skip

with tab_density:
    slq = runner.call_params(run, "hessian_density")  # the defaults the CLI and notebook use too
    c1, c2, c3, c4 = st.columns(4)
    n_probes = int(c1.number_input("SLQ probes", 1, 20, int(slq["n_probes"]), key="hess_probes"))
    lanczos_steps = int(
        c2.number_input("Lanczos steps", 5, 200, int(slq["lanczos_steps"]), key="hess_lsteps")
    )
    deflate = int(
        c3.number_input(
            "Outliers computed exactly", 0, 50, int(slq["deflate"]), key="hess_deflate",
            help="The largest-magnitude eigenvalues found by Lanczos first and removed from the probes: the "
            "outliers carry the higher moments, which random probes estimate with ~100 % error.",
        )
    )  # fmt: skip
    log_y = c4.toggle(
        "Log-scale density",
        value=True,
        key="hess_density_log",
        help="A log y-axis shows the bulk near zero and the isolated outliers together.",
    )
    sweep_chart(
        "hess_density", "hessian_density",
        {"n_probes": n_probes, "lanczos_steps": lanczos_steps, "deflate": deflate},
        label="Hessian density (SLQ)", button="Compute spectral density", frame_of=figures.density_frame,
        figure_of=lambda f: figures.density_figure(f, log_y=log_y), name="hessian_density",
        extra=lambda rs: {"ritz": {s: r.ritz_frame().to_dict(orient="list") for s, r in rs.items()}},
    )  # fmt: skip

with tab_layers:
    c1, c2 = st.columns(2)
    layer_step = c1.selectbox("Checkpoint", run.steps(), index=len(run.steps()) - 1, key="hess_layer_step")
    value = c2.selectbox("Bar chart of", ["lambda_1", "trace", "trace_per_param"], key="hess_layer_value")
    with errors.guard("Per-layer Hessian"):
        results = compute.sweep_panel(
            run,
            "layerwise_hessian",
            [layer_step],
            key="hess_layers",
            params={"k": 1},
            split=split,
            max_samples=max_samples,
            sample=sample,
            label="per-layer Hessian blocks",
            button="Compute per-layer spectra",
        )
        if results:
            result = results[layer_step]
            frame = result.to_frame()
            downloads.table(frame, key="hess_layer_table")
            downloads.chart(
                result.figure(value=value),
                frame,
                f"{state.label(run.path)}_layerwise_step{layer_step}",
                key="hess_layers",
                extra_json={"result": result.to_dict()},
            )

with tab_blocks:
    st.caption(
        "The SLQ spectrum of each parameter block's diagonal Hessian block on one eigenvalue axis, and the "
        "Jensen–Shannon divergence between blocks: large in transformers, whose embedding, attention and MLP "
        "blocks have spectra far apart (Zhang et al., 2024, why transformers need Adam)."
    )
    block_step = st.selectbox("Checkpoint", run.steps(), index=len(run.steps()) - 1, key="hess_block_step")
    with errors.guard("Blockwise spectra"):
        results = compute.sweep_panel(
            run, "blockwise_spectra", [block_step], key="hess_blocks", split=split, max_samples=max_samples,
            sample=sample, label="blockwise spectra", button="Compute blockwise spectra",
        )  # fmt: skip
        if results:
            result = results[block_step]
            frame = result.to_frame()
            st.markdown(f"**Heterogeneity** (mean JS over block pairs): {result.heterogeneity:.3g} nats")
            downloads.table(frame, key="hess_block_table")
            downloads.chart(
                result.figure(), frame, f"{state.label(run.path)}_blockwise_step{block_step}",
                key="hess_blocks", extra_json={"result": result.to_dict()},
            )  # fmt: skip

with tab_trace:
    c1, c2 = st.columns(2)
    n_mv = int(c1.number_input("Matrix-vector products", 6, 600, 30, step=6, key="hess_trace_mv"))
    method = c2.radio("Estimator", list(TRACE_METHODS), horizontal=True, key="hess_trace_method")
    sweep_chart(
        "hess_trace", "hessian_trace", {"n_matvecs": n_mv, "method": method},
        label=f"Hessian trace ({method})", button="Compute trace", frame_of=figures.trace_frame,
        figure_of=figures.trace_figure, name="hessian_trace",
    )  # fmt: skip
