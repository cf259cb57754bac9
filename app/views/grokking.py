"""Grokking: accuracy and loss on a log-step axis; NTK label alignment, kernel distance, weight norm."""

from __future__ import annotations

import streamlit as st
from lib import compute, detectors, downloads, errors, state

from dynascope.probes import figures

st.title("Grokking")
run = state.require_run()
state.page_settings_for("grok", run)
xor = run.extra.get("phenomenon") == "xor_grokking"
if not xor:
    state.offer_phenomenon_run(run, "grokking", "grokking")
st.caption(
    "Grokking: the training set is fit early, test accuracy jumps much later (Power et al., 2022). "
    "The function-space view: the empirical NTK's alignment with the labels and its distance from the "
    "initial kernel show the move from lazy to feature-learning dynamics; the weight norm shows the "
    "role of weight decay."
)

metrics = run.metrics()
with errors.guard("Training curves"):
    split_cols = ("train_acc_clean", "train_acc_flipped")
    cols = ("train_acc", "test_acc", *split_cols, "train_loss", "test_loss")
    have = [c for c in cols if c in metrics.columns]
    if have:
        data = metrics[["step", *have]]
        downloads.chart(
            figures.grokking_figure(data), data, f"{state.label(run.path)}_curves", key="grok_curves"
        )
        if xor:
            st.caption(
                "XOR clusters with flipped training labels (Xu et al., 2023): every label, flipped ones "
                "included, is fit while the test accuracy is near chance (benign overfitting); the test "
                "accuracy reaches the Bayes-optimal level later while the flipped labels stay fit. "
                f"Bayes-optimal test accuracy: {run.extra.get('bayes_accuracy', float('nan')):.3f}."
            )
            detectors.show_evidence("Benign overfitting → grokking", "detect_xor_grokking", run)
        else:
            detectors.show_evidence("Grokking", "detect_grokking", run)
    else:
        st.info("This run's metrics.csv has no accuracy or loss columns to plot.")

st.subheader("Function-space dynamics over checkpoints")
steps = compute.checkpoint_picker(run, key="grok", default_count=8)
first = run.steps()[0]
if steps and steps[0] != first:
    steps = [first, *steps]
    st.caption(f"The first checkpoint (step {first}) is included as the reference kernel at init.")
split, max_samples, sample = compute.data_controls(run, key="grok", default_split="test", budget=64)
st.caption(
    "One N×N empirical NTK per checkpoint (summed over the outputs): its cost grows with N² × outputs × "
    "parameters, so start with a few dozen samples."
)

with errors.guard("NTK trajectory"):
    weight_norms = {s: compute.weight_norm(run, s) for s in steps}
    trajectory = None
    if len(steps) >= 2:
        where = {
            "steps": steps,
            "params": {"reduce_outputs": "trace", "centered": True},
            "split": split,
            "max_samples": max_samples,
            "sample": sample,
        }
        trajectory = compute.stored(run, "ntk_trajectory", **where)
        if trajectory is None:
            st.caption("The NTK trajectory for these checkpoints is not in the result store yet.")
            if st.button("Compute NTK trajectory", type="primary", key="grok_run"):
                trajectory = compute.compute_stored(run, "ntk_trajectory", label="NTK trajectory", **where)
        else:
            st.caption("NTK trajectory loaded from the result store.")
    else:
        st.info("Select at least two checkpoints for the kernel trajectory.")
    frame = figures.dynamics_frame(trajectory, weight_norms)
    downloads.chart(
        figures.dynamics_figure(frame),
        frame,
        f"{state.label(run.path)}_ntk_dynamics",
        key="grok_dynamics",
        extra_json={"trajectory": trajectory.to_dict() if trajectory is not None else None},
    )
