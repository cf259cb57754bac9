"""Learning-rate transfer: final loss vs η and sharpness trajectories, one colour per width."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from lib import detectors, downloads, errors, state

from dynascope.probes import figures
from dynascope.recipes import read_lr_sweep
from dynascope.recipes.lr_transfer import SWEEP_FILE

st.title("Learning-rate transfer")
run = state.require_run()
state.page_settings_for("lrt", run)
state.offer_phenomenon_run(run, "lr_transfer", "learning-rate transfer")
st.caption(
    "The same learning-rate grid trained at several widths. Under μP the best η stays at one grid "
    "point and the sharpness trajectories of all widths agree (Yang & Hu, 2021; Noci et al., 2024); "
    "under the standard or NTK parametrisation the optimum moves and the sharpness spreads with width. "
    "Reads an lr_transfer run's lr_sweep.csv (final train loss per width and η) and metrics.csv "
    "(trajectories at the reference η; sharpness in η units, so GD is stable below 2/η)."
)

if not (run.path / SWEEP_FILE).is_file():
    st.info(
        f"`{state.label(run.path)}` holds no learning-rate sweep ({SWEEP_FILE}). This page reads the runs of "
        "the `lr_transfer` recipe: one η grid trained at several widths. Make one (`--small`: the CI-sized "
        "variant) and open it here:"
    )
    st.code(
        "# μP (the recipe's default) and, for contrast, the standard parametrisation\n"
        f"dynascope recipe lr_transfer --out {state.runs_dir() / 'lr_transfer'} --small\n"
        f"dynascope recipe lr_transfer --out {state.runs_dir() / 'lr_transfer_sp'} --small "
        "--set parametrization=sp",
        language="bash",
    )
    st.stop()

with errors.guard("Learning-rate transfer"):
    sweep = read_lr_sweep(run)
    param = run.extra.get("parametrization")
    if param:
        st.caption(f"Parametrisation: **{param}**")
    finite = sweep[sweep["final_train_loss"].astype(float) < float("inf")]
    best = finite.loc[
        finite.groupby("width")["final_train_loss"].idxmin(), ["width", "lr", "final_train_loss"]
    ]
    best = best.rename(columns={"lr": "best_lr"}).reset_index(drop=True)
    st.caption(
        "Best η per width: "
        + ", ".join(f"{int(w)} → {lr:g}" for w, lr in zip(best["width"], best["best_lr"]))
    )
    fig = figures.lr_sweep_figure(sweep)
    downloads.chart(fig, sweep, f"{state.label(run.path)}_lr_sweep", key="lrt_sweep")
    downloads.table(best, key="lrt_best")
    metrics = run.metrics()
    if {"width", "sharpness"} <= set(metrics.columns):
        ref = (run.extra.get("config") or {}).get("reference_lr")
        two = 2.0 / float(ref) if ref else None
        y = st.selectbox("Trajectory", ["sharpness", "train_loss"], key="lrt_y")
        tfig = figures.width_sharpness_figure(metrics, y=y, two_over_lr=two if y == "sharpness" else None)
        if y == "train_loss":
            figures.log_axis(tfig)
        cols = [c for c in ("step", "width", y) if c in metrics.columns]
        downloads.chart(tfig, pd.DataFrame(metrics[cols]), f"{state.label(run.path)}_{y}", key="lrt_traj")
    detectors.show_evidence("Learning-rate transfer", "detect_lr_transfer", run)
