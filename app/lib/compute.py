"""Running probes from the app: availability checks, cache lookups and computation with progress.

Per-checkpoint probes go through :mod:`dynascope.runner` (``cached_result`` / ``run_probe``), so
the app, the CLI and notebooks share one result store per run folder and nothing is computed
twice. Probes over several checkpoints at once (NTK trajectory, mode connectivity, sharpness
with the optimizer's preconditioner) use :class:`~dynascope.store.ResultStore` directly, keyed by
the hashes of every checkpoint file involved.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from dynascope.models import Run, file_sha256
from dynascope.store import ResultStore

from .errors import guard

DEFAULT_MAX_SAMPLES = 256


# ------------------------------------------------------------------------------------ availability
def missing_probe(function: str) -> str | None:
    """``None`` when ``dynascope.probes.<function>`` imports; else why not."""
    try:
        getattr(importlib.import_module("dynascope.probes"), function)
    except (AttributeError, ImportError) as exc:
        return f"`dynascope.probes.{function}` is not available yet ({exc})"
    return None


def require_probes(*functions: str) -> bool:
    """Show an info box for each probe that is not available; ``True`` when all are."""
    problems = [p for p in (missing_probe(f) for f in functions) if p]
    for p in problems:
        st.info(f"This view needs a probe that is not installed: {p}.")
    return not problems


def optional(module: str, name: str) -> Any | None:
    """``module.name`` or ``None`` when it does not exist (yet)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (AttributeError, ImportError):
        return None


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


def checkpoint_picker(run: Run, *, key: str, default_count: int = 4, label: str = "Checkpoints") -> list[int]:
    """Multiselect of the run's checkpoint steps (default: a few spread over training)."""
    steps = run.steps()
    chosen = st.multiselect(
        label,
        steps,
        default=evenly_spaced(steps, default_count),
        key=f"{key}_steps_{run.path}",
        help="Each selected checkpoint is probed once; results are cached in the run's result store.",
    )
    return sorted(chosen)


def data_controls(
    run: Run, *, key: str, default_split: str = "train", default_samples: int = DEFAULT_MAX_SAMPLES
) -> tuple[str, int | None]:
    """Split and sample-count controls: ``(split, max_samples)`` (the first samples, deterministic)."""
    c1, c2 = st.columns(2)
    split = c1.radio(
        "Data split",
        ["train", "test"],
        index=["train", "test"].index(default_split),
        key=f"{key}_split",
        horizontal=True,
    )
    n = c2.number_input(
        "Samples (0 = all)",
        min_value=0,
        value=default_samples,
        step=32,
        key=f"{key}_max_samples",
        help="Probes use the first N samples of the split (deterministic) to keep CPU time low.",
    )
    return split, (int(n) or None)


# ------------------------------------------------------------------------------------ per-checkpoint
def lookup(
    run: Run,
    probe: str,
    steps: Sequence[int],
    *,
    params: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
    split: str = "train",
    max_samples: int | None = None,
) -> dict[int, Any]:
    """The cached results of ``probe`` at ``steps`` (nothing is computed)."""
    from dynascope.runner import cached_result

    store = ResultStore(run.path)
    out: dict[int, Any] = {}
    for s in steps:
        p = params(s) if callable(params) else params
        hit = cached_result(run, probe, step=s, params=p, split=split, max_samples=max_samples, store=store)
        if hit is not None:
            out[s] = hit
    return out


def compute(
    run: Run,
    probe: str,
    steps: Sequence[int],
    *,
    params: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    label: str | None = None,
) -> dict[int, Any]:
    """Run ``probe`` at ``steps`` with a status box and a progress bar; returns ``{step: result}``."""
    from dynascope.runner import run_probe

    label = label or probe
    store = ResultStore(run.path)
    out: dict[int, Any] = {}
    n = len(steps)
    with st.status(f"Running {label} on {n} checkpoint(s)…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        fresh = 0
        for i, s in enumerate(steps):
            p = params(s) if callable(params) else params
            t0 = time.perf_counter()
            try:
                result, cached = run_probe(
                    run, probe, step=s, params=p, split=split, max_samples=max_samples, store=store
                )
            except Exception:
                status.update(label=f"{label} failed at step {s}", state="error", expanded=True)
                raise
            fresh += not cached
            how = "from the result store" if cached else f"computed in {time.perf_counter() - t0:.1f} s"
            bar.progress((i + 1) / n, text=f"step {s}: {how} ({i + 1}/{n})")
            out[s] = result
        status.update(
            label=f"{label}: {fresh} computed, {n - fresh} from the result store",
            state="complete",
            expanded=False,
        )
    return out


def sweep_panel(
    run: Run,
    probe: str,
    steps: Sequence[int],
    *,
    key: str,
    params: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    label: str | None = None,
    button: str = "Run probe",
) -> dict[int, Any]:
    """Cached results for ``steps`` plus a button computing the missing ones; returns what is known."""
    if not steps:
        st.info("Select at least one checkpoint.")
        return {}
    results = lookup(run, probe, steps, params=params, split=split, max_samples=max_samples)
    missing = [s for s in steps if s not in results]
    note = st.empty()
    if missing:
        note.caption(
            f"{len(results)} of {len(steps)} checkpoint(s) already in the result store; "
            f"{len(missing)} to compute (steps {', '.join(map(str, missing))})."
        )
        if st.button(button, key=f"{key}_run", type="primary"):
            with guard(label or probe):
                results.update(
                    compute(
                        run, probe, missing, params=params, split=split, max_samples=max_samples, label=label
                    )
                )
                note.caption(
                    f"Computed {len(missing)} checkpoint(s); all results are now in the result store."
                )
    else:
        note.caption(f"All {len(steps)} selected checkpoint(s) are in the result store; nothing to compute.")
    return dict(sorted(results.items()))


# ------------------------------------------------------------------------------------ multi-checkpoint
def combined_hash(paths: Sequence[Any]) -> str:
    """One digest for several checkpoint files (order matters)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def stored(run: Run, probe: str, digest: str, params: dict[str, Any]) -> Any | None:
    """A cached multi-checkpoint result, or ``None``."""
    hit = ResultStore(run.path).get(probe, digest, params)
    return None if hit is None else hit.result


def compute_stored(
    run: Run,
    probe: str,
    digest: str,
    params: dict[str, Any],
    make: Callable[[Callable[[float, str], None]], Any],
    *,
    label: str,
    step: int | None = None,
) -> Any:
    """``make(progress)`` under a status box, stored in the run's result store (or the cached value).

    ``progress(fraction, text)`` updates the bar.
    """
    store = ResultStore(run.path)
    hit = store.get(probe, digest, params)
    if hit is not None:
        return hit.result
    with st.status(f"Running {label}…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")

        def progress(fraction: float, text: str) -> None:
            bar.progress(min(max(fraction, 0.0), 1.0), text=text)

        t0 = time.perf_counter()
        try:
            result = make(progress)
        except Exception:
            status.update(label=f"{label} failed", state="error", expanded=True)
            raise
        store.put(probe, digest, params, result, step=step)
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


def _sharpness_plan(
    run: Run, step: int, params: dict[str, Any], split: str, max_samples: int | None, preconditioned: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(probe params, store key or None)``: a key when the optimizer's preconditioner is used
    (the optimizer file's hash joins the key); ``None`` means the plain runner path."""
    from dynascope.runner import PROBES

    p = dict(params)
    lr = lr_or_none(run, step)
    if lr is not None:
        p["lr"] = lr
    info = run.checkpoint(step)
    if not (preconditioned and info.optimizer_path is not None):
        return p, None
    key = {**PROBES["sharpness"].defaults, **p, "loss": run.loss or "auto"}
    key.update(split=split, max_samples=max_samples, optimizer_state=file_sha256(info.optimizer_path))
    return p, key


def sharpness_results(
    run: Run,
    steps: Sequence[int],
    *,
    params: dict[str, Any],
    split: str,
    max_samples: int | None,
    preconditioned: bool,
    compute_missing: bool = False,
) -> dict[int, Any]:
    """``sharpness`` per checkpoint with η from the schedule and, for adaptive optimizers, λ_max(P⁻¹H)
    from the saved optimizer state. Cached results only, unless ``compute_missing`` (with progress)."""
    from dynascope.probes import sharpness
    from dynascope.runner import cached_result, probe_data, run_probe

    store = ResultStore(run.path)
    out: dict[int, Any] = {}
    todo = []
    for s in steps:
        p, key = _sharpness_plan(run, s, params, split, max_samples, preconditioned)
        if key is None:
            hit = cached_result(
                run, "sharpness", step=s, params=p, split=split, max_samples=max_samples, store=store
            )
        else:
            stored_hit = store.get("sharpness", file_sha256(run.checkpoint(s).path), key)
            hit = None if stored_hit is None else stored_hit.result
        if hit is not None:
            out[s] = hit
        else:
            todo.append((s, p, key))
    if not compute_missing or not todo:
        return dict(sorted(out.items()))
    with st.status(f"Running sharpness on {len(todo)} checkpoint(s)…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        for i, (s, p, key) in enumerate(todo):
            t0 = time.perf_counter()
            try:
                if key is None:
                    result, _ = run_probe(
                        run, "sharpness", step=s, params=p, split=split, max_samples=max_samples, store=store
                    )
                else:
                    model = run.load_model(s)
                    data = probe_data(run, split=split, max_samples=max_samples)
                    call = {
                        k: v for k, v in key.items() if k not in ("split", "max_samples", "optimizer_state")
                    }
                    result = sharpness(model, data, optimizer_state=run.load_optimizer_state(s), **call)
                    store.put("sharpness", file_sha256(run.checkpoint(s).path), key, result, step=s)
            except Exception:
                status.update(label=f"sharpness failed at step {s}", state="error", expanded=True)
                raise
            out[s] = result
            bar.progress((i + 1) / len(todo), text=f"step {s}: {time.perf_counter() - t0:.1f} s")
        status.update(
            label=f"sharpness: {len(todo)} checkpoint(s) computed", state="complete", expanded=False
        )
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------ trajectories
@st.cache_data(show_spinner=False, max_entries=4096)
def _weight_norm(path: str, mtime: float) -> float:
    from dynascope.models import load_checkpoint

    sd = load_checkpoint(path).state_dict
    return float(sum(float(t.double().pow(2).sum()) for t in sd.values() if t.is_floating_point()) ** 0.5)


def weight_norm(run: Run, step: int) -> float:
    """‖θ‖₂ over every floating tensor of the checkpoint at ``step`` (cached per file)."""
    path = run.checkpoint(step).path
    return _weight_norm(str(path), path.stat().st_mtime)


def ntk_trajectory(
    run: Run,
    steps: Sequence[int],
    split: str,
    max_samples: int | None,
    progress: Callable[[float, str], None],
) -> Any:
    """``dynascope.probes.ntk_trajectory`` over the run's checkpoints at ``steps`` (first = reference)."""
    from dynascope.probes import ntk_trajectory as trajectory
    from dynascope.runner import probe_data

    models = []
    for i, s in enumerate(steps):
        models.append(run.load_model(s))
        progress(0.3 * (i + 1) / len(steps), f"loaded checkpoint {s}")
    x, y = probe_data(run, split=split, max_samples=max_samples)
    progress(0.35, f"forming {len(steps)} kernels on {len(x)} samples")
    return trajectory(models, x, y, steps=list(steps))


def lmc(
    run_a: Run,
    step_a: int,
    run_b: Run,
    step_b: int,
    key: dict[str, Any],
    progress: Callable[[float, str], None],
) -> Any:
    """``lmc_barrier`` between two checkpoints on run A's data (``key`` holds the options)."""
    from dynascope.probes import lmc_barrier
    from dynascope.runner import probe_data

    model_a, model_b = run_a.load_model(step_a), run_b.load_model(step_b)
    progress(0.2, "loaded both checkpoints")
    data = probe_data(run_a, split=key["split"], max_samples=key["max_samples"])
    progress(0.3, f"evaluating {key['n_points']} points on {len(data[0])} samples")
    call = {k: v for k, v in key.items() if k not in ("split", "max_samples")}
    return lmc_barrier(model_a, model_b, data, **call)
