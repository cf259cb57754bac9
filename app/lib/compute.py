"""Running probes from the app: cache lookups and computation with progress, all through
:mod:`dynascope.runner` — the same checkpoint loop, get-or-compute path and cache key as the CLI and
notebooks, so one result store per run folder serves all three and nothing is computed twice. That
includes the multi-checkpoint probes (NTK trajectory, mode connectivity) and sharpness with the
optimizer's preconditioner (``optimizer_state=True``: the optimizer file's hash joins the key).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from dynascope import runner
from dynascope.models import Run
from dynascope.models import weight_norm as model_weight_norm
from dynascope.store import ResultStore

from .errors import guard

#: Probes default to the whole split the run was trained on when it has at most this many samples,
#: else to a class-stratified subset of this size.
DATA_BUDGET = 2048
Params = dict[str, Any] | Callable[[int], dict[str, Any]] | None


# ------------------------------------------------------------------------------------ widgets
def evenly_spaced(steps: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` steps spread over ``steps`` (first and last included)."""
    steps = list(steps)
    if len(steps) <= n:
        return steps
    if n <= 1:
        return steps[-1:]
    idx = sorted({round(i * (len(steps) - 1) / (n - 1)) for i in range(n)})
    return [steps[i] for i in idx]


def checkpoint_picker(
    run: Run,
    *,
    key: str,
    default_count: int = 4,
    label: str = "Checkpoints",
    default_from: Sequence[int] | None = None,
) -> list[int]:
    """Multiselect of the run's checkpoint steps (default: ``default_count`` spread over training, or
    over ``default_from`` when given and not empty)."""
    steps = run.steps()
    pool = [s for s in (default_from or ()) if s in steps] or steps
    chosen = st.multiselect(
        label,
        steps,
        default=evenly_spaced(pool, default_count),
        key=f"{key}_steps_{run.path}",
        help="Each selected checkpoint is probed once; results are cached in the run's result store.",
    )
    return sorted(chosen)


@st.cache_data(show_spinner=False, max_entries=256)
def _split_sizes(run_path: str, dataset_json: str) -> dict[str, int]:
    ds = Run.open(run_path).load_dataset()
    return {name: int(len(getattr(ds, name)[1])) for name in ("train", "test")}


@st.cache_data(show_spinner=False, max_entries=256)
def _class_counts(run_path: str, dataset_json: str) -> dict[str, int | None]:
    ds = Run.open(run_path).load_dataset()
    labels = {name: runner.class_labels(getattr(ds, name)[1]) for name in ("train", "test")}
    return {name: None if y is None else int(y.unique().numel()) for name, y in labels.items()}


def split_sizes(run: Run) -> dict[str, int]:
    """Samples in the run's train and test splits (cached per run and data spec)."""
    return _split_sizes(str(run.path), json.dumps(run.dataset_config, sort_keys=True, default=str))


def data_controls(
    run: Run,
    *,
    key: str,
    default_split: str = "train",
    budget: int = DATA_BUDGET,
    stratify: bool = True,
) -> tuple[str, int | None, str]:
    """Split, sample-count and subset controls: ``(split, max_samples, sample)``.

    The default is the data the run was trained on: its ``default_split`` whole when that has at most
    ``budget`` samples (``max_samples=None``), else a class-stratified subset of ``budget`` samples
    (every class present; ``stratify=False``: the first ``budget``), stated in a caption."""
    c1, c2, c3 = st.columns([2, 2, 3])
    split = c1.radio(
        "Data split",
        ["train", "test"],
        index=["train", "test"].index(default_split),
        key=f"{key}_split",
        horizontal=True,
    )
    try:
        size = split_sizes(run)[split]
    except Exception:  # noqa: BLE001 - an unreadable dataset is reported by the probe itself
        size = None
    over = size is not None and size > budget
    n = c2.number_input(
        "Samples (0 = all)",
        min_value=0,
        value=budget if over else 0,
        step=32,
        key=f"{key}_max_samples",
        help=f"Default: the whole split when it has at most {budget} samples, else a subset of {budget}.",
    )
    max_samples = int(n) or None
    options = ["first", "stratified"] if stratify else ["first"]
    sample = c3.radio(
        "Subset",
        options,
        index=1 if (over and stratify) else 0,
        key=f"{key}_sample",
        horizontal=True,
        format_func={"first": "first N", "stratified": "class-stratified"}.get,
        help="Which samples a subset keeps: the first N of the split, or N spread over the classes.",
    )
    if size is not None:
        if max_samples is None or max_samples >= size:
            c3.caption(
                f"Using all {size} {split} samples"
                + (" (the data the run was trained on)." if split == "train" else ".")
            )
        elif sample == "stratified":
            try:
                classes = _class_counts(
                    str(run.path), json.dumps(run.dataset_config, sort_keys=True, default=str)
                )
            except Exception:  # noqa: BLE001 - as above
                classes = {}
            n_cls = classes.get(split)
            kept = (
                "every class kept" if n_cls is None or max_samples >= n_cls
                else f"{max_samples} of the {n_cls} classes kept, one sample each"
            )  # fmt: skip
            c3.caption(
                f"Using a class-stratified subset: {max_samples} of {size} {split} samples, {kept}"
                + (f" (the budget is {budget})." if max_samples == budget else ".")
            )
        else:
            c3.caption(f"Using the first {max_samples} of {size} {split} samples.")
    return split, max_samples, sample


# ------------------------------------------------------------------------------------ per-checkpoint
class BarProgress:
    """The runner's ``progress(i, n, step, cached, seconds)`` drawn on an ``st.progress`` bar."""

    def __init__(self) -> None:
        self.bar = st.progress(0.0, text="starting")
        self.done = 0
        self.fresh = 0

    def __call__(self, i: int, n: int, step: int | None, cached: bool, seconds: float) -> None:
        self.done, self.fresh = i, self.fresh + (not cached)
        how = "from the result store" if cached else f"computed in {seconds:.1f} s"
        self.bar.progress(i / n, text=f"step {step}: {how} ({i}/{n})")


def lookup(
    run: Run,
    probe: str,
    steps: Sequence[int],
    *,
    params: Params = None,
    split: str = "train",
    max_samples: int | None = None,
    sample: str = "first",
) -> dict[int, Any]:
    """The cached results of ``probe`` at ``steps`` (nothing is computed)."""
    return runner.cached_results(
        run, probe, steps, params=params, split=split, max_samples=max_samples, sample=sample,
        store=ResultStore(run.path),
    )  # fmt: skip


def compute(
    run: Run,
    probe: str,
    steps: Sequence[int],
    *,
    params: Params = None,
    split: str = "train",
    max_samples: int | None = None,
    sample: str = "first",
    label: str | None = None,
) -> dict[int, Any]:
    """Run ``probe`` at ``steps`` (:func:`dynascope.runner.sweep`) with a status box and a progress
    bar; returns ``{step: result}``."""
    label = label or probe
    steps = list(steps)
    n = len(steps)
    with st.status(f"Running {label} on {n} checkpoint(s)…", expanded=True) as status:
        progress = BarProgress()
        try:
            rows = runner.sweep(
                run, probe, steps, params=params, split=split, max_samples=max_samples, sample=sample,
                store=ResultStore(run.path), progress=progress,
            )  # fmt: skip
        except Exception:
            status.update(
                label=f"{label} failed at step {steps[progress.done]}", state="error", expanded=True
            )
            raise
        status.update(
            label=f"{label}: {progress.fresh} computed, {n - progress.fresh} from the result store",
            state="complete",
            expanded=False,
        )
    return {s: result for s, result, _ in rows}


def sweep_panel(
    run: Run,
    probe: str,
    steps: Sequence[int],
    *,
    key: str,
    params: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    sample: str = "first",
    label: str | None = None,
    button: str = "Run probe",
) -> dict[int, Any]:
    """Cached results for ``steps`` plus a button computing the missing ones; returns what is known."""
    if not steps:
        st.info("Select at least one checkpoint.")
        return {}
    results = lookup(run, probe, steps, params=params, split=split, max_samples=max_samples, sample=sample)
    missing = [s for s in steps if s not in results]
    note = st.empty()
    if missing:
        note.caption(
            f"{len(results)} of {len(steps)} checkpoint(s) already in the result store; "
            f"{len(missing)} to compute (steps {', '.join(map(str, missing))})."
        )
        slot = st.empty()  # the button goes once clicked: nothing is left to compute
        if slot.button(button, key=f"{key}_run", type="primary"):
            slot.empty()
            with guard(label or probe):
                results.update(
                    compute(
                        run,
                        probe,
                        missing,
                        params=params,
                        split=split,
                        max_samples=max_samples,
                        sample=sample,
                        label=label,
                    )  # fmt: skip
                )
                note.caption(
                    f"Computed {len(missing)} checkpoint(s); all results are now in the result store."
                )
    else:
        note.caption(f"All {len(steps)} selected checkpoint(s) are in the result store; nothing to compute.")
    return dict(sorted(results.items()))


# ------------------------------------------------------------------------------------ multi-checkpoint
def stored(run: Run, probe: str, **where: Any) -> Any | None:
    """The cached result of a multi-checkpoint probe (``steps=[...]`` or ``step=, other=(run_b, step_b)``,
    ``params``, ``split``, ``max_samples``), or ``None``."""
    return runner.cached_result(run, probe, store=ResultStore(run.path), **where)


def compute_stored(run: Run, probe: str, *, label: str, **where: Any) -> Any:
    """A multi-checkpoint probe through :func:`dynascope.runner.run_probe` under a status box (the
    cached value when there is one); the bar follows the checkpoints as they load."""
    with st.status(f"Running {label}…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")

        def progress(i: int, n: int, step: int | None, cached: bool, seconds: float) -> None:
            bar.progress(0.5 * i / n, text=f"loaded checkpoint {step} ({i}/{n})")

        t0 = time.perf_counter()
        try:
            result, _ = runner.run_probe(run, probe, store=ResultStore(run.path), progress=progress, **where)
        except Exception:
            status.update(label=f"{label} failed", state="error", expanded=True)
            raise
        bar.progress(1.0, text="done")
        status.update(
            label=f"{label}: computed in {time.perf_counter() - t0:.1f} s", state="complete", expanded=False
        )
    return result


# ------------------------------------------------------------------------------------ sharpness
ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad")


def lr_or_none(run: Run, step: int) -> float | None:
    """η at ``step`` from the run's schedule (or its optimizer lr); ``None`` when the run records none."""
    try:
        lr = float(run.lr_at(step))
    except (ValueError, TypeError):
        return None
    return lr if lr > 0 else None


def is_adaptive(run: Run) -> bool:
    return str((run.optimizer_config or {}).get("name", "")).lower() in ADAPTIVE_OPTIMIZERS


@st.cache_data(show_spinner=False, max_entries=4096)
def _optimizer_state_nonempty(path: str, mtime: float) -> bool:
    import torch

    try:
        named = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the probe that reads it
        return True
    return not isinstance(named, dict) or bool(named.get("state"))


def has_optimizer_state(run: Run, step: int) -> bool:
    """True when optimizer state was saved beside checkpoint ``step`` and holds per-parameter entries
    (an adaptive optimizer has none before its first update, e.g. at step 0)."""
    path = run.checkpoint(step).optimizer_path
    return path is not None and _optimizer_state_nonempty(str(path), path.stat().st_mtime)


def preconditioned_steps(run: Run) -> list[int]:
    """The checkpoints at which λ_max(P⁻¹H) can be computed (optimizer state with entries)."""
    return [s for s in run.steps() if has_optimizer_state(run, s)]


def sharpness_params(
    run: Run, params: dict[str, Any], preconditioned: bool
) -> Callable[[int], dict[str, Any]]:
    """Per-step ``sharpness`` parameters: η at the step from the schedule and, when ``preconditioned``
    and optimizer state with entries was saved beside the checkpoint, ``optimizer_state=True``
    (λ_max(P⁻¹H))."""

    def at(step: int) -> dict[str, Any]:
        p = dict(params)
        lr = lr_or_none(run, step)
        if lr is not None:
            p["lr"] = lr
        if preconditioned and has_optimizer_state(run, step):
            p["optimizer_state"] = True
        return p

    return at


def sharpness_results(
    run: Run,
    steps: Sequence[int],
    *,
    params: dict[str, Any],
    split: str,
    max_samples: int | None,
    preconditioned: bool,
    compute_missing: bool = False,
    sample: str = "first",
) -> dict[int, Any]:
    """``sharpness`` per checkpoint with η from the schedule and, for adaptive optimizers, λ_max(P⁻¹H)
    from the saved optimizer state. Cached results only, unless ``compute_missing`` (with progress)."""
    per_step = sharpness_params(run, params, preconditioned)
    out = lookup(
        run, "sharpness", steps, params=per_step, split=split, max_samples=max_samples, sample=sample
    )
    todo = [s for s in steps if s not in out]
    if compute_missing and todo:
        out.update(
            compute(run, "sharpness", todo, params=per_step, split=split, max_samples=max_samples,
                    sample=sample, label="sharpness")
        )  # fmt: skip
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------ trajectories
@st.cache_data(show_spinner=False, max_entries=4096)
def _weight_norm(run_path: str, step: int, mtime: float) -> float:
    return model_weight_norm(Run.open(run_path).load_model(step))


def weight_norm(run: Run, step: int) -> float:
    """‖θ‖₂ over the model's parameters at checkpoint ``step`` (:func:`dynascope.models.weight_norm`,
    the norm the training loop logs; cached per file)."""
    path = run.checkpoint(step).path
    return _weight_norm(str(run.path), step, path.stat().st_mtime)
