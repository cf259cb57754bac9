"""Gradients: per-example gradient coherence and the gradient noise scale over checkpoints."""

from __future__ import annotations

import streamlit as st
from lib import compute, downloads, errors, state

from dynascope.probes import figures

st.title("Gradients")
run = state.require_run()
state.page_settings_for("grad", run)
st.caption(
    "Coherence α = E[g_i·g_j] / E[‖g_i‖²], the numerator over distinct pairs i ≠ j of per-example gradients "
    "(Chatterjee, 2020): α near 1 means examples pull the same way; m-coherence = 1 + (m−1)α. "
    "The simple noise scale B = tr(Σ)/‖ḡ‖² (McCandlish et al., 2018) estimates the critical batch size."
)
steps = compute.checkpoint_picker(run, key="grad", default_count=6)
split, max_samples, sample = compute.data_controls(run, key="grad")

with errors.guard("Gradient coherence"):
    results = compute.sweep_panel(
        run,
        "gradient_coherence",
        steps,
        key="grad",
        split=split,
        max_samples=max_samples,
        sample=sample,
        label="gradient coherence",
        button="Compute coherence",
    )
    if results:
        frame = figures.coherence_frame(results)
        downloads.chart(
            figures.relabel_steps(figures.coherence_figure(frame), state.step_label(run)),
            frame,
            f"{state.label(run.path)}_coherence",
            key="grad_traj",
            extra_json={"results": {s: r.to_dict() for s, r in results.items()}},
        )
        pick = st.selectbox(
            "Per-class detail at checkpoint",
            list(results),
            index=len(results) - 1,
            key="grad_detail_step",
        )
        detail = results[pick].to_frame()
        downloads.table(detail, key="grad_detail_table")
        downloads.chart(
            results[pick].figure(),
            detail,
            f"{state.label(run.path)}_coherence_step{pick}",
            key="grad_detail",
        )
