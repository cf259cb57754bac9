"""Pages that are one probe over checkpoints: a checkpoint picker and data controls, the probe's figure
across the chosen checkpoints (``figures.across_checkpoints``, tidy table download), and one checkpoint's
per-class detail. Each such page is a row of :data:`PAGES`; its view file only names its row."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from dynascope.probes import figures
from dynascope.trajectories import tidy_frame
from lib import compute, downloads, errors, state


@dataclass(frozen=True)
class TrajectoryPage:
    """``key``: the page's widget-key prefix; ``stem``: the download files' name after the run's label."""

    title: str
    probe: str
    key: str
    caption: str
    label: str
    button: str
    stem: str


PAGES = {
    "gradients": TrajectoryPage(
        title="Gradients",
        probe="gradient_coherence",
        key="grad",
        caption="Coherence α = E[g_i·g_j] / E[‖g_i‖²], the numerator over distinct pairs i ≠ j of "
        "per-example gradients (Chatterjee, 2020): α near 1 means examples pull the same way; "
        "m-coherence = 1 + (m−1)α. The simple noise scale B = tr(Σ)/‖ḡ‖² (McCandlish et al., 2018) "
        "estimates the critical batch size.",
        label="gradient coherence",
        button="Compute coherence",
        stem="coherence",
    ),
    "neural_collapse": TrajectoryPage(
        title="Neural collapse",
        probe="neural_collapse",
        key="nc",
        caption="Late in training on a classification task the last-layer features collapse to their class "
        "means (NC1), the class means form a simplex equiangular tight frame (NC2), the classifier aligns "
        "with them (NC3) and the network acts as a nearest-class-centre classifier (NC4) — Papyan, Han & "
        "Donoho (2020). Features are the input of the final linear layer.",
        label="neural-collapse metrics",
        button="Compute NC1–NC4",
        stem="neural_collapse",
    ),
}


def show(page: TrajectoryPage) -> None:
    """Draw ``page``."""
    st.title(page.title)
    run = state.require_run()
    state.page_settings_for(page.key, run)
    st.caption(page.caption)
    steps = compute.checkpoint_picker(run, key=page.key, default_count=6)
    split, max_samples, sample = compute.data_controls(run, key=page.key)
    with errors.guard(page.title):
        results = compute.sweep_panel(
            run, page.probe, steps, key=page.key, split=split, max_samples=max_samples, sample=sample,
            label=page.label, button=page.button,
        )  # fmt: skip
        if not results:
            return
        name = state.label(run.path)
        downloads.chart(
            figures.across_checkpoints(results, x_title=state.step_label(run)),
            tidy_frame(results),
            f"{name}_{page.stem}",
            key=f"{page.key}_traj",
            extra_json={"results": {s: r.to_dict() for s, r in results.items()}},
        )
        pick = st.selectbox(
            "Per-class detail at checkpoint",
            list(results),
            index=len(results) - 1,
            key=f"{page.key}_detail_step",
        )
        detail = results[pick].to_frame()
        downloads.table(detail, key=f"{page.key}_detail_table")
        downloads.chart(
            results[pick].figure(), detail, f"{name}_{page.stem}_step{pick}", key=f"{page.key}_detail"
        )
