"""Mode connectivity: loss along the linear path between two checkpoints, with and without alignment."""

from __future__ import annotations

import streamlit as st
from lib import compute, downloads, errors, state, twins

from dynascope.models import Run
from dynascope.probes import figures

st.title("Mode connectivity")
run = state.require_run()
state.page_settings_for("lmc", run)
st.caption(
    "Loss along θ(α) = (1−α)θ_A + αθ_B. The barrier is the largest rise above the straight chord between "
    "the end points (Frankle et al., 2020). Permuting B's hidden units to match A first (weight or "
    "activation matching, Ainsworth et al., 2023) often removes the barrier between independently "
    "trained networks. Layer-wise barriers interpolate one layer at a time."
)


def _compatible_runs(base: Run) -> list[str]:
    """Known runs with the same architecture (seed aside) as ``base``."""

    def arch(r: Run) -> dict:
        return {k: v for k, v in r.model_config.items() if k != "seed"}

    out = []
    for p in state.known_runs():
        try:
            other = Run.open(p)
        except Exception:  # noqa: BLE001 - unreadable runs are simply not offered
            continue
        if arch(other) == arch(base) and other.checkpoints():
            out.append(str(p))
    return out or [str(base.path)]


candidates = _compatible_runs(run)
_running = twins.job_for(run)
if _running is not None and not _running.done:  # a twin still being trained is not offered as B yet
    candidates = [c for c in candidates if c != str(_running.out)] or [str(run.path)]
_recipe = twins.recipe_of(run)


def _same_recipe(path: str) -> bool:
    """Another seed of the selected run's recipe and config (what mode connectivity should compare)."""
    try:
        return path != str(run.path) and twins.recipe_of(Run.open(path)) == _recipe
    except Exception:  # noqa: BLE001
        return False


seeds = [c for c in candidates if _recipe is not None and _same_recipe(c)]


@st.fragment(run_every=2.0)
def _twin_progress(job: twins.TwinJob) -> None:
    """Progress of the seed twin's training; the whole page reruns when it is done (so B defaults to it)."""
    if job.done:
        st.rerun(scope="app")
    text = f"step {job.step}/{job.total}" if job.total else "starting"
    st.progress(job.fraction, text=f"Training `{job.out.name}` (seed {job.seed}): {text}")


if _recipe is not None and not seeds:  # other runs may fit, but no second seed of this recipe
    job = twins.job_for(run)
    with st.container(border=True, key="lmc_twin"):
        if job is not None and not job.done:
            _twin_progress(job)
        else:
            if job is not None and job.error:
                st.error(f"Training the seed twin failed: {job.error}")
            st.markdown(
                "**No second run of this recipe yet.** Mode connectivity compares two independently "
                f"trained networks: train `{twins.twin_path(run).name}`, the same recipe and config with the "
                "next seed (a background job; the page stays usable)."
                + (
                    " Meanwhile B defaults to another run of the same architecture."
                    if len(candidates) > 1
                    else ""
                )
            )
            if st.button("Train a seed twin", key="lmc_twin_start", type="primary"):
                twins.start_twin(run)
                st.rerun()
elif seeds:
    job = twins.job_for(run)
    if job is not None and job.done and job.error is None:
        st.caption(f"Seed twin `{job.out.name}` trained in {job.finished_after:.0f} s.")
col_a, col_b = st.columns(2)
with col_a:
    st.markdown("**Model A**")
    st.caption(f"run `{state.label(run.path)}` (the selected run)")
    step_a = st.selectbox("Checkpoint A", run.steps(), index=len(run.steps()) - 1, key="lmc_step_a")
with col_b:
    st.markdown("**Model B**")
    others = seeds + [c for c in candidates if c != str(run.path) and c not in seeds]
    default_b = others[0] if others else str(run.path)
    # B follows the default (a seed twin once it exists, else another run of the same shape) until the
    # user picks another run: the value is reset only while it still equals the default last shown
    shown, last_default = st.session_state.get("lmc_run_b"), st.session_state.get("lmc_b_default")
    if shown not in candidates or (shown == last_default and last_default != default_b):
        st.session_state["lmc_run_b"] = default_b
    st.session_state["lmc_b_default"] = default_b
    path_b = st.selectbox(
        "Run B",
        candidates,
        format_func=state.label,
        key="lmc_run_b",
        help="Runs with the same architecture (e.g. another seed); default: a second seed of this recipe.",
    )
    run_b = Run.open(path_b)
    steps_b = run_b.steps()
    default_step_b = len(steps_b) - 1 if path_b != str(run.path) else 0
    step_b = st.selectbox("Checkpoint B", steps_b, index=default_step_b, key=f"lmc_step_b_{path_b}")

c1, c2, c3 = st.columns(3)
n_points = int(c1.number_input("Points on the path", 3, 101, 11, key="lmc_points"))
align_label = c2.selectbox(
    "Alignment of B to A", ["weight matching", "activation matching", "none"], key="lmc_align"
)
layerwise = c3.toggle("Layer-wise barriers", value=True, key="lmc_layerwise")
split, max_samples, sample = compute.data_controls(run, key="lmc")
align = {"weight matching": "weights", "activation matching": "activations", "none": None}[align_label]

with errors.guard("Mode connectivity"):
    if path_b == str(run.path) and step_a == step_b:
        raise ValueError("choose two different checkpoints (A and B are the same file)")
    where = {
        "step": step_a,
        "other": (run_b, step_b),
        "params": {"n_points": n_points, "align": align, "layerwise": layerwise, "compare_unaligned": True},
        "split": split,
        "max_samples": max_samples,
        "sample": sample,
    }
    result = compute.stored(run, "lmc_barrier", **where)
    note = st.empty()
    if result is None:
        note.caption("This pair is not in the result store yet.")
        slot = st.empty()  # the button goes once clicked
        if slot.button("Compute the path", type="primary", key="lmc_run"):
            slot.empty()
            result = compute.compute_stored(run, "lmc_barrier", label="loss along the linear path", **where)
            note.caption("Computed and stored in the result store.")
    else:
        note.caption("Loaded from the result store.")
    if result is not None:
        m1, m2 = st.columns(2)
        m1.metric(f"Loss barrier ({align_label})", f"{result.barrier:.4g}")
        if result.barrier_unaligned is not None:
            m2.metric("Loss barrier (no alignment)", f"{result.barrier_unaligned:.4g}")
        name = f"{state.label(run.path)}_{step_a}_vs_{state.label(path_b)}_{step_b}"
        downloads.chart(
            result.figure(),
            result.to_frame(),
            f"{name}_lmc",
            key="lmc_path",
            extra_json={"result": result.to_dict()},
        )
        layers = result.layerwise_frame()
        if len(layers):
            st.markdown("**Layer-wise barriers** (only that layer interpolated, the others at model A)")
            st.caption(
                "barrier: the rise above the chord, as for the whole path (0 when the path stays under "
                "it, typically because B's layer alone breaks A's network: see end_loss); max_rise: the "
                "largest loss increase over model A along that layer's path."
            )
            downloads.table(layers, key="lmc_layers_table")
            fig = figures.lmc_layerwise(layers)
            downloads.chart(fig, layers, f"{name}_layerwise", key="lmc_layers")
