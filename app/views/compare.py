"""Compare runs: several runs' metrics overlaid on one chart (seeds, learning rates, widths).

Edge-of-stability runs at different η are put on one axis as λ_max·η/2 (1 = the edge 2/η); runs that logged
no sharpness (an Adam recipe run) use the sharpness results in their result store, as the ratio that applies
to their optimizer (λ_max(P⁻¹H) over its threshold, 38/η for Adam); grokking seeds as accuracy against the
step; double-descent runs as test error against model size.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st
from lib import compute, downloads, errors, state

from dynascope.models import Run, RunError
from dynascope.probes import figures
from dynascope.store import ResultStore

st.title("Compare runs")
st.caption(
    "Overlay the metrics several runs logged during training. Edge-of-stability runs are normalised as "
    "λ_max·η/2, so runs at different learning rates share one axis with the edge at 1."
)
run = state.current_run()
runs: dict[str, Run] = {}
for p in state.known_runs():
    try:
        r = Run.open(p)
    except RunError:
        continue
    if not r.metrics().empty:
        runs[str(p)] = r
if len(runs) < 2:
    st.info("Comparing needs at least two runs with metrics.csv in the runs folder.")
    st.stop()

phenomenon = run.extra.get("phenomenon") if run is not None else None
same = [p for p, r in runs.items() if phenomenon and r.extra.get("phenomenon") == phenomenon]
# else the selected run and the first other whose steps are of the same kind (training steps, or model sizes)
kind = run.extra.get("sweep_variable") if run is not None else None
alike = [p for p, r in runs.items() if r.extra.get("sweep_variable") == kind]
current = [str(run.path)] if run is not None and str(run.path) in alike else []
default = same if len(same) >= 2 else (current + [p for p in alike if p not in current])[:2]
chosen = st.multiselect(
    "Runs", list(runs), default=default, format_func=state.label, key="cmp_runs",
    help="Default: every run of the selected run's phenomenon (e.g. its seeds or learning rates), else the "
    "selected run and one whose steps are of the same kind.",
)  # fmt: skip


def _eos_frame(r: Run) -> tuple[pd.DataFrame, bool]:
    """``step, lambda_eta_over_2`` in units of the run's stability threshold, and whether the values are
    preconditioned. From the logged sharpness and η (``sharpness_ratio`` when logged); for a run that
    logged none, from the ``sharpness`` results in its store: ``preconditioned_ratio`` for an adaptive
    optimizer when computed, else ``ratio`` (the last stored result per step)."""
    m = r.metrics()
    col = next((c for c in ("sharpness", "lambda_max", "hessian_lambda_max") if c in m.columns), None)
    if col is None:
        pre = compute.is_adaptive(r)
        by_step: dict[int, float] = {}
        for s in ResultStore(r.path).list("sharpness"):
            v = getattr(s.result, "preconditioned_ratio", None) if pre else None
            v = v if v is not None else (None if pre else getattr(s.result, "ratio", None))
            if v is not None and s.step is not None:
                by_step[int(s.step)] = float(v)
        frame = pd.DataFrame(sorted(by_step.items()), columns=["step", "lambda_eta_over_2"])
        return frame, pre and bool(by_step)
    if "sharpness_ratio" in m.columns:
        out = m[["step", "sharpness_ratio"]].rename(columns={"sharpness_ratio": "lambda_eta_over_2"})
    else:
        lr = m["lr"] if "lr" in m.columns else float((r.optimizer_config or {}).get("lr", float("nan")))
        out = pd.DataFrame({"step": m["step"], "lambda_eta_over_2": m[col] * lr / 2.0})
    return out.dropna(), False


with errors.guard("Run comparison"):
    if len(chosen) < 1:
        st.info("Select runs to compare.")
        st.stop()
    picked = {state.label(p): runs[p] for p in chosen}
    eos = all(r.extra.get("phenomenon") == "edge_of_stability" for r in picked.values())
    if eos:
        found = {name: _eos_frame(r) for name, r in picked.items()}
        frames = {name: f for name, (f, _) in found.items()}
        adaptive = [name for name, (_, pre) in found.items() if pre]
        empty = [name for name, f in frames.items() if f.empty]
        if adaptive:
            st.caption(
                f"{', '.join(adaptive)}: λ_max(P⁻¹H) over its threshold (38/η for Adam), from the result "
                "store; the others: λ_max·η/2. 1 is the edge of stability for each."
            )
        if empty:
            st.caption(
                f"{', '.join(empty)}: no sharpness logged or computed yet (compute it on the Edge of "
                "stability page)."
            )
        if adaptive:
            y_title, edge = "λ_max / threshold (GD: λ_max·η/2)", "edge of stability (λ_max = threshold)"
            title = "Sharpness in units of the stability threshold"
        else:
            y_title, edge, title = "λ_max·η/2", "edge of stability (λ_max = 2/η)", "Sharpness in units of 2/η"
        fig = figures.overlay_figure(
            frames, x="step", y="lambda_eta_over_2", y_title=y_title, hline=1.0, hline_name=edge, title=title
        )
    else:
        metrics = {name: r.metrics() for name, r in picked.items()}
        common = sorted(set.intersection(*(set(m.select_dtypes("number").columns) for m in metrics.values())))
        if not common:
            st.info("The selected runs share no numeric metric column.")
            st.stop()
        sweeps = {r.extra.get("sweep_variable") for r in picked.values()}
        if len(sweeps) > 1:  # a double-descent run's "step" is its model size p, not a training step
            kinds = ", ".join(
                sorted(f"{v} (one checkpoint per value)" if v else "training step" for v in sweeps)
            )
            st.warning(
                f"The selected runs put different things on their step axis: {kinds}. Pick runs of one kind."
            )
            st.stop()
        x_default = next(iter(sweeps)) if len(sweeps) == 1 and None not in sweeps else "step"
        x_default = x_default if x_default in common else common[0]
        y_pref = ("test_mse", "test_error", "test_acc", "test_loss", "train_loss")
        ys = [c for c in common if c != x_default]
        y_default = next((c for c in y_pref if c in ys), ys[0] if ys else x_default)
        c1, c2, c3, c4 = st.columns(4)
        # the axes' choices belong to this set of runs: another set starts from its own defaults
        which = hashlib.sha256("|".join(sorted(chosen)).encode()).hexdigest()[:8]
        x = c1.selectbox("x-axis", common, index=common.index(x_default), key=f"cmp_x_{which}")
        y = c2.selectbox("y-axis", ys or common, index=(ys or common).index(y_default), key=f"cmp_y_{which}")
        log_x = c3.toggle("Log x-axis", value=x != "step", key=f"cmp_logx_{which}")
        log_y = c4.toggle("Log y-axis", value=False, key=f"cmp_logy_{which}")
        frames = {name: m.groupby(x, as_index=False)[y].mean() for name, m in metrics.items()}
        fig = figures.overlay_figure(frames, x=x, y=y, log_x=log_x, log_y=log_y)
    table = pd.concat([f.assign(run=name) for name, f in frames.items()], ignore_index=True)
    downloads.chart(fig, table, "compare_runs", key="cmp_overlay")
