"""Neural collapse: NC1–NC4 of the penultimate features and the classifier over checkpoints."""

from __future__ import annotations

import streamlit as st
from lib import compute, downloads, errors, state

from dynascope.probes import figures

st.title("Neural collapse")
run = state.require_run()
state.page_settings_for("nc", run)
st.caption(
    "Late in training on a classification task the last-layer features collapse to their class means "
    "(NC1), the class means form a simplex equiangular tight frame (NC2), the classifier aligns with them "
    "(NC3) and the network acts as a nearest-class-centre classifier (NC4) — Papyan, Han & Donoho (2020). "
    "Features are the input of the final linear layer."
)
steps = compute.checkpoint_picker(run, key="nc", default_count=6)
split, max_samples, sample = compute.data_controls(run, key="nc")

with errors.guard("Neural collapse"):
    results = compute.sweep_panel(
        run,
        "neural_collapse",
        steps,
        key="nc",
        split=split,
        max_samples=max_samples,
        sample=sample,
        label="neural-collapse metrics",
        button="Compute NC1–NC4",
    )
    if results:
        frame = figures.nc_frame(results)
        downloads.chart(
            figures.relabel_steps(figures.nc_figure(frame), state.step_label(run)),
            frame,
            f"{state.label(run.path)}_neural_collapse",
            key="nc_traj",
            extra_json={"results": {s: r.to_dict() for s, r in results.items()}},
        )
        last = max(results)
        st.markdown(f"**Checkpoint {last}: per-class detail**")
        detail = results[last].to_frame()
        downloads.chart(
            results[last].figure(), detail, f"{state.label(run.path)}_nc_step{last}", key="nc_detail"
        )
