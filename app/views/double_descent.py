"""Double descent: test error vs model size (or epochs) with the interpolation threshold marked."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from lib import detectors, downloads, errors, state

from dynascope.probes import figures
from dynascope.recipes import interpolation_threshold

st.title("Double descent")
run = state.require_run()
state.page_settings_for("dd", run)
state.offer_phenomenon_run(run, "double_descent", "double-descent")
st.caption(
    "Test error first falls, then peaks where the model can just interpolate the training set "
    "(p ≈ n for random-features regression), then falls again as the model grows (Belkin et al., 2019; "
    "Nakkiran et al., 2020). Reads the run's metrics.csv: one row per model size (or per step for "
    "epoch-wise double descent), several trials averaged."
)

SIZE_COLUMNS = ("n_features", "p", "width", "n_params", "num_params", "model_size", "params", "hidden")
ERROR_COLUMNS = ("test_mse", "test_error", "test_err", "test_loss")
NOT_Y = ("step", "epoch", "trial", "trials", "seed", "wall_time", "cond", "condition_number")


def _numeric(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]


with errors.guard("Double descent"):
    metrics = run.metrics()
    if "test_acc" in metrics.columns and "test_error" not in metrics.columns:
        metrics["test_error"] = 1.0 - metrics["test_acc"]
    if "train_acc" in metrics.columns and "train_error" not in metrics.columns:
        metrics["train_error"] = 1.0 - metrics["train_acc"]
    numeric = _numeric(metrics)
    if len(metrics) == 0 or not numeric:
        st.info("This run's metrics.csv is empty; double descent needs test error per model size or step.")
        st.stop()
    sweep = run.extra.get("sweep_variable")
    x_default = sweep if sweep in numeric else next((c for c in SIZE_COLUMNS if c in numeric), "step")
    y_options = [c for c in numeric if c not in SIZE_COLUMNS and c not in NOT_Y and not c.endswith("_std")]
    y_default = next((c for c in ERROR_COLUMNS if c in y_options), y_options[0] if y_options else None)
    if y_default is None:
        st.info("metrics.csv has no error or loss column to plot.")
        st.stop()
    c1, c2, c3, c4, c5 = st.columns(5)
    x = c1.selectbox("x-axis (model size or time)", numeric, index=numeric.index(x_default), key="dd_x")
    y = c2.selectbox("y-axis", y_options, index=y_options.index(y_default), key="dd_y")
    log_x = c3.toggle("Log x-axis", value=x != "step", key="dd_logx")
    log_y = c4.toggle(
        "Log y-axis",
        value=True,
        key="dd_logy",
        help="Log by default: both descents show (a linear axis flattens everything but the peak).",
    )
    show_train = c5.toggle(
        "Also train error",
        value=False,
        key="dd_train",
        help="Train error falls to ~0 past the threshold; best read on a log y-axis.",
    )

    cond = next((c for c in ("cond", "condition_number") if c in metrics.columns), None)
    wanted = [x, y, f"{y}_std", y.replace("test", "train"), cond]
    cols = [c for c in dict.fromkeys(w for w in wanted if w) if c in metrics.columns]
    grouped = metrics[cols].groupby(x, as_index=False)
    frame = grouped.mean()
    if grouped.size()["size"].max() > 1 and f"{y}_std" not in frame.columns:  # several trials per size
        frame[f"{y}_std"] = grouped[y].std()[y].to_numpy()
        frame["trials"] = grouped.size()["size"].to_numpy()

    threshold = interpolation_threshold(run, metrics, x)
    fig = figures.double_descent_figure(
        frame, x=x, y=y, threshold=threshold, x_title=x, log_x=log_x, log_y=log_y, show_train=show_train
    )
    if f"{y}_std" in frame.columns:
        fig.data[0].error_y = {"type": "data", "array": frame[f"{y}_std"].fillna(0).tolist(), "visible": True}
    downloads.chart(fig, frame, f"{state.label(run.path)}_double_descent", key="dd_curve")
    if threshold is not None:
        st.caption(f"Interpolation threshold marked at {x} = {threshold:g}.")
    detectors.show_evidence(
        "Double descent", "detect_double_descent", run, metric=y, x=x, threshold=threshold
    )

    if cond is not None and cond in frame.columns:
        cfig = figures.condition_figure(frame, x=x, y=cond, threshold=threshold, log_x=log_x)
        downloads.chart(cfig, frame[[x, cond]], f"{state.label(run.path)}_condition", key="dd_cond")
