"""Landscape: the Hessian diagonal per layer, loss surfaces with the training trajectory drawn on them, and
the opposing-signal examples beside the run's sharpness curve."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import torch
from lib import compute, downloads, errors, state

from dynascope import runner
from dynascope.probes import figures

st.title("Loss landscape")
run = state.require_run()
state.page_settings_for("land", run)
st.caption(
    "Curvature entry by entry (Hutchinson's diagonal estimator), the loss on a plane through the weights "
    "(Li et al., 2018) and the few examples whose loss swings most between checkpoints (opposing signals, "
    "Rosenfeld & Risteski, 2023). Everything is cached in the run's result store."
)
split, max_samples, _ = compute.data_controls(run, key="land", stratify=False)
tab_diag, tab_surface, tab_opp = st.tabs(["Hessian diagonal", "Loss surface", "Opposing signals"])
name = state.label(run.path)

with tab_diag:
    c1, c2, c3, c4 = st.columns(4)
    steps = run.steps()
    step = c1.selectbox("Checkpoint", steps, index=len(steps) - 1, key="land_diag_step")
    method = c2.radio(
        "Method",
        ["hutchinson", "exact"],
        horizontal=True,
        key="land_diag_method",
        help="exact: one product per parameter (small models only)",
    )
    n_mv = int(c3.number_input("Probes (Hutchinson)", 2, 2000, 100, step=10, key="land_diag_mv"))
    spatial = c4.toggle("Average conv kernels (ADAHESSIAN)", key="land_diag_spatial")
    params = {"n_matvecs": n_mv, "method": method, "spatial_average": spatial}
    with errors.guard("Hessian diagonal"):
        results = compute.sweep_panel(
            run,
            "hessian_diagonal",
            [step],
            key="land_diag",
            params=params,
            split=split,
            max_samples=max_samples,
            label="Hessian diagonal",
            button="Compute the diagonal",
        )
        if results:
            result = results[step]
            layers = result.layer_frame()
            downloads.table(layers, key="land_diag_table")
            total = float(result.values.sum())
            st.caption(
                f"tr(H) = Σ diag = {total:.6g} over {result.values.numel()} parameters "
                f"({result.method}, {result.n_matvecs} products; s.e. per entry in the CSV)."
            )
            downloads.chart(
                result.figure(),
                result.to_frame(),
                f"{name}_hessian_diagonal_step{step}",
                key="land_diag",
                extra_json={"layers": layers.to_dict(orient="list"), "meta": result.meta},
            )

with tab_surface:
    mode = st.radio(
        "Plane", ["Training trajectory (PCA)", "Around one checkpoint"], horizontal=True, key="land_mode"
    )
    c1, c2, c3 = st.columns(3)
    resolution = int(c1.number_input("Grid points per axis", 3, 81, 15, key="land_res"))
    value = c2.radio("Show", ["loss", "accuracy"], horizontal=True, key="land_value")
    view = c3.radio("View", ["contour", "surface"], horizontal=True, key="land_view")
    log = st.toggle("log₁₀ loss", value=True, key="land_log")
    result = None
    with errors.guard("Loss surface"):
        if mode.startswith("Training"):
            chosen = compute.checkpoint_picker(run, key="land_traj", default_count=8)
            st.caption(
                "The plane through the last selected checkpoint spanned by the two principal directions "
                "of the others' offsets from it; every checkpoint is projected onto it."
            )
            if len(chosen) < 3:
                st.info("Select at least three checkpoints (two directions need two offsets).")
            else:
                where = {
                    "steps": chosen,
                    "params": {"resolution": resolution},
                    "split": split,
                    "max_samples": max_samples,
                }
                result = compute.stored(run, "landscape_trajectory", **where)
                if result is None and st.button(
                    "Compute the trajectory plane", type="primary", key="land_traj_run"
                ):
                    result = compute.compute_stored(
                        run, "landscape_trajectory", label="trajectory plane", **where
                    )
        else:
            c1, c2, c3 = st.columns(3)
            center = c1.selectbox("Checkpoint", run.steps(), index=len(run.steps()) - 1, key="land_center")
            directions = c2.radio(
                "Directions",
                ["random", "hessian", "toward a checkpoint"],
                horizontal=True,
                key="land_dirs",
                help="random: filter-normalised Gaussian directions (biases and norm parameters zeroed); "
                "hessian: the top two eigenvectors; toward a checkpoint: the straight line to another "
                "checkpoint (a = 1) and a random direction",
            )
            if directions == "toward a checkpoint":
                others = [s for s in run.steps() if s != center]
                other = c3.selectbox("Other checkpoint", others, index=0, key="land_other")
                align = st.toggle("Permutation-align it first (weight matching)", key="land_align")
                where = {
                    "step": center,
                    "other": (run, other),
                    "params": {"resolution": resolution, "align": align},
                    "split": split,
                    "max_samples": max_samples,
                }
                result = compute.stored(run, "landscape_between", **where)
                if result is None and st.button(
                    "Compute the surface", type="primary", key="land_between_run"
                ):
                    result = compute.compute_stored(
                        run, "landscape_between", label="landscape between", **where
                    )
            else:
                span = float(c3.number_input("Span", 0.01, 100.0, 1.0, key="land_span"))
                res = compute.sweep_panel(
                    run,
                    "loss_landscape",
                    [center],
                    key="land_point",
                    split=split,
                    max_samples=max_samples,
                    params={"directions": directions, "resolution": resolution, "span": span},
                    label="loss landscape",
                    button="Compute the surface",
                )
                result = res.get(center)
    if result is not None:
        with errors.guard("Loss surface chart"):
            if result.explained_variance:
                ev = ", ".join(f"{100 * v:.1f} %" for v in result.explained_variance)
                st.caption(f"Variance of the checkpoint offsets explained by the two directions: {ev}.")
            st.caption(
                f"Loss at the centre: {result.center_loss:.6g}; BatchNorm: {result.meta['batchnorm']}."
            )
            traj = result.trajectory_frame()
            if len(traj):
                downloads.table(traj, key="land_traj_table")
            fig = figures.loss_landscape(result, value=value, surface=view == "surface", log=log)
            downloads.chart(
                fig,
                result.to_frame(),
                f"{name}_loss_surface",
                key="land_surface",
                extra_json={"trajectory": traj.to_dict(orient="list"), "kinds": result.kinds},
            )


def _label_counts(y: torch.Tensor) -> str:
    """``class 3: 12, class 7: 5`` for integer labels or one-hot / soft targets (their argmax); regression
    targets (one float per example) as ``mean ± std``."""
    labels = runner.class_labels(y)
    if labels is None:
        v = y.reshape(len(y), -1)[:, 0].double()
        return f"target {float(v.mean()):.3g} ± {float(v.std()) if len(v) > 1 else 0.0:.2g} (mean ± std)"
    counts = pd.Series(labels.tolist()).value_counts()
    return ", ".join(f"class {k}: {v}" for k, v in counts.items())


def _sharpness(steps: list[int]) -> pd.DataFrame | None:
    """λ_max over ``steps``: logged during training when it was, else cached ``sharpness`` results."""
    metrics = run.metrics()
    logged = next(
        (c for c in ("sharpness", "lambda_max", "hessian_lambda_max") if c in metrics.columns), None
    )
    if logged:
        part = metrics[(metrics["step"] >= steps[0]) & (metrics["step"] <= steps[-1])]
        cols = ["step", logged] + (["two_over_lr"] if "two_over_lr" in part.columns else [])
        return part[cols].dropna(subset=[logged]).rename(columns={logged: "sharpness"})
    cached = compute.sharpness_results(
        run,
        steps,
        params={"k": 1, "tol": 1e-3, "trace": False},
        split=split,
        max_samples=max_samples,
        preconditioned=False,
    )
    if not cached:
        return None
    frame = figures.sharpness_frame(cached)
    return frame.rename(columns={"lambda_max": "sharpness"})[["step", "sharpness", "two_over_lr"]]


def _feature_stats(x: torch.Tensor, members: list[int]) -> pd.DataFrame:
    """Labels and the features whose group mean departs most from the data mean (in data std units)."""
    flat = x.reshape(x.shape[0], -1).double()
    mu, sd = flat.mean(0), flat.std(0).clamp_min(1e-12)
    z = (flat[members].mean(0) - mu) / sd
    top = z.abs().argsort(descending=True)[:5]
    return pd.DataFrame(
        {"feature": top.tolist(), "group mean (z)": z[top].tolist(), "data mean": mu[top].tolist()}
    )


with tab_opp:
    all_steps = run.steps()
    lo, hi = st.select_slider(
        "Consecutive checkpoints", all_steps, value=(all_steps[0], all_steps[-1]), key="land_opp_range"
    )
    chosen = [s for s in all_steps if lo <= s <= hi]
    c1, c2, c3 = st.columns(3)
    direction = c1.radio(
        "Split along",
        ["update", "hessian"],
        horizontal=True,
        key="land_opp_dir",
        help="update: θ(t*+1) − θ(t*); hessian: the top-k eigenvectors at t* (k > 1: the update's component "
        "in their span, robust when the top eigenvalues are nearly equal)",
    )
    k_eig = int(c2.number_input("k (hessian)", 1, 20, 1, key="land_opp_k", disabled=direction != "hessian"))
    n_fixed = int(c3.number_input("Examples (0 = automatic)", 0, 10000, 0, key="land_opp_n"))
    opp = None
    with errors.guard("Opposing signals"):
        if len(chosen) < 3:
            st.info("Select at least three consecutive checkpoints.")
        else:
            where = {
                "steps": chosen,
                "params": {"direction": direction, "n_examples": n_fixed or None}
                | ({"k": k_eig} if direction == "hessian" else {}),
                "split": split,
                "max_samples": max_samples,
            }
            opp = compute.stored(run, "opposing_signals", **where)
            if opp is None and st.button("Find opposing signals", type="primary", key="land_opp_run"):
                opp = compute.compute_stored(run, "opposing_signals", label="opposing signals", **where)
    if opp is not None:
        with errors.guard("Opposing-signal groups"):
            groups = opp.groups_frame()
            downloads.table(groups, key="land_opp_groups")
            alt = "n/a" if opp.alternation is None else f"{opp.alternation:.3f}"
            st.caption(
                f"{len(opp.selected)} examples selected ({opp.meta['selection']}); reference step "
                f"{opp.reference_step}; alternation of the groups' loss changes {alt}."
            )
            sharp = _sharpness(chosen)
            if sharp is None:
                st.caption("No sharpness for these steps yet (compute it on the Edge of stability page).")
            fig = figures.opposing_signals(opp, sharpness=sharp)
            downloads.chart(
                fig,
                opp.to_frame(),
                f"{name}_opposing_signals",
                key="land_opp",
                extra_json={
                    "groups": groups.to_dict(orient="list"),
                    "trajectory": opp.trajectory_frame().to_dict(orient="list"),
                },
            )
            from dynascope.runner import probe_data

            x, y = probe_data(run, split=split, max_samples=max_samples)
            for gname, members in opp.groups.items():
                if not members:
                    continue
                st.subheader(f"Group {gname}: {len(members)} examples")
                st.caption("Labels: " + _label_counts(y[members]))
                if x.dim() >= 3:  # images: [N, H, W] or [N, C, H, W]
                    imgs = [x[i].float() for i in members[:8]]
                    imgs = [(im if im.dim() == 2 else im.movedim(0, -1).squeeze(-1)) for im in imgs]
                    imgs = [((im - im.min()) / (im.max() - im.min() + 1e-12)).numpy() for im in imgs]
                    st.image(imgs, caption=[f"#{i}" for i in members[:8]], width=64)
                else:
                    st.dataframe(_feature_stats(x, members), hide_index=True, key=f"land_opp_feat_{gname}")
