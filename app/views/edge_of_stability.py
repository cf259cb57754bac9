"""Edge of stability: λ_max vs step against 2/η from the schedule; preconditioned sharpness for Adam runs."""

from __future__ import annotations

import streamlit as st
from lib import compute, detectors, downloads, errors, state

from dynascope.probes import figures

st.title("Edge of stability")
run = state.require_run()
state.page_settings_for("eos", run)
state.offer_phenomenon_run(run, "edge_of_stability", "edge-of-stability")
st.caption(
    "Full-batch gradient descent is stable on a quadratic while λ_max(H) < 2/η. Progressive sharpening "
    "drives λ_max up until it hovers at 2/η (Cohen et al., 2021). For adaptive optimizers the relevant "
    "quantity is the preconditioned sharpness λ_max(P⁻¹H), computed from the saved optimizer state, "
    "against its own threshold (Cohen et al., 2022)."
)
if compute.lr_or_none(run, run.steps()[-1]) is None:
    st.warning("This run records no learning rate, so the 2/η line cannot be drawn (λ_max is still shown).")

adaptive = compute.is_adaptive(run)
# adaptive runs: by default the checkpoints whose optimizer state gives a preconditioner (not step 0)
steps = compute.checkpoint_picker(
    run, key="eos", default_count=8, default_from=compute.preconditioned_steps(run) if adaptive else None
)
split, max_samples, sample = compute.data_controls(run, key="eos")
c1, c2 = st.columns(2)
preconditioned = c1.toggle(
    "Preconditioned sharpness (optimizer state)",
    value=adaptive,
    disabled=not adaptive,
    key="eos_pre",
    help="Needs an Adam/AdamW/RMSprop/Adagrad run with optimizer state saved beside the checkpoints.",
)
with_trace = c2.toggle("Also estimate tr(H)", value=False, key="eos_trace")
params = {"k": 1, "tol": 1e-3, "trace": with_trace}

results: dict = {}
query = {
    "params": params,
    "split": split,
    "max_samples": max_samples,
    "preconditioned": preconditioned,
    "sample": sample,
}
with errors.guard("Sharpness"):
    results = compute.sharpness_results(run, steps, **query)
    missing = [s for s in steps if s not in results]
    note = st.empty()
    if missing:
        note.caption(f"{len(results)} of {len(steps)} checkpoint(s) cached; {len(missing)} to compute.")
        slot = st.empty()  # the button goes once clicked
        if slot.button("Compute sharpness", type="primary", key="eos_run"):
            slot.empty()
            results = compute.sharpness_results(run, steps, compute_missing=True, **query)
            note.caption("All selected checkpoints are now in the result store.")
    elif steps:
        note.caption("All selected checkpoints are in the result store; nothing to compute.")

metrics = run.metrics()
logged = next((c for c in ("sharpness", "lambda_max", "hessian_lambda_max") if c in metrics.columns), None)
with errors.guard("Sharpness chart"):
    if results or logged:
        frame = figures.sharpness_frame(results)

        def lr_at(s):
            return compute.lr_or_none(run, s) or float("nan")

        schedule = figures.schedule_frame(lr_at, max(run.steps()))
        part = None
        if logged:  # λ_max the training loop measured itself (e.g. the edge-of-stability recipe)
            part = metrics[["step", logged]].dropna().rename(columns={logged: "value"})
        fig = figures.sharpness_figure(
            frame, schedule, logged=part, logged_name=f"{logged} (logged in training)"
        )
        if part is not None:
            part = part.rename(columns={"value": f"{logged}_logged"})
            frame = part if frame.empty else frame.merge(part, on="step", how="outer")
        downloads.chart(
            fig,
            frame,
            f"{state.label(run.path)}_sharpness",
            key="eos_sharpness",
            extra_json={"schedule": schedule.to_dict(orient="list")},
        )
        pre = frame["preconditioned_ratio"].dropna() if "preconditioned_ratio" in frame.columns else []
        ratio = frame["ratio"].dropna() if "ratio" in frame.columns else []
        if adaptive and len(pre):  # the ratio that applies to the run's optimizer
            last = frame.loc[pre.index[-1]]
            factor = float(last["preconditioned_threshold"]) * float(last["lr"] or "nan")
            thr = f"{factor:.3g}/η" if factor == factor else "threshold"
            at_step = int(last["step"])
            st.metric(
                f"λ_max(P⁻¹H) / threshold {thr} at the last preconditioned checkpoint (step {at_step})",
                f"{pre.iloc[-1]:.3f}",
            )
            st.caption(
                f"{len(pre)} of {len(frame)} selected checkpoint(s) have a preconditioned point; the "
                f"threshold there is {float(last['preconditioned_threshold']):,.0f}."
            )
            if len(ratio):
                st.metric("λ_max / (2/η) (plain GD ratio, for reference)", f"{ratio.iloc[-1]:.3g}")
            st.caption(
                "Adaptive optimizers precondition the step: Adam's update is η·P⁻¹m with P = diag(√v̂ + ε), "
                "so its stability is set by the preconditioned sharpness λ_max(P⁻¹H) against its threshold "
                "(2 + 2β₁)/((1 − β₁)η) = 38/η for β₁ = 0.9 (Cohen et al., 2022; dotted line), not by "
                "λ_max(H) against 2/η, which says little for this run. P comes from the optimizer state "
                "saved beside each checkpoint; checkpoints without it have no preconditioned point."
            )
        elif len(ratio):
            st.metric("λ_max / (2/η) at the last selected checkpoint", f"{ratio.iloc[-1]:.3f}")
            if adaptive:
                st.caption(
                    "This run uses an adaptive optimizer but no selected checkpoint has its optimizer state "
                    "saved, so λ_max(P⁻¹H), the quantity that applies, cannot be computed; λ_max(H)/(2/η) "
                    "is shown instead."
                )
    else:
        st.info("Compute the sharpness to see λ_max against 2/η.")
with errors.guard("Loss curve"):
    loss_cols = [c for c in ("train_loss", "test_loss") if c in metrics.columns]
    if loss_cols:
        data = metrics[["step", *loss_cols]]
        downloads.chart(
            figures.loss_figure(data, loss_cols), data, f"{state.label(run.path)}_loss", key="eos_loss"
        )
    else:
        st.info("This run's metrics.csv has no loss column.")

if logged:
    with errors.guard("Edge-of-stability detector"):
        detectors.show_evidence("Edge of stability", "detect_edge_of_stability", run)
