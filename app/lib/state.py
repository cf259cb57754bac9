"""Which run the app is looking at: the runs folder, run discovery and the per-session selection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

from dynascope.models import Run, RunError

from .demos import missing_demos

RUNS_DIR_ENV = "DYNASCOPE_RUNS_DIR"
_RUN_KEY = "dynascope_run_path"  # session state: absolute path of the selected run folder
_EXTRA_KEY = "dynascope_extra_runs"  # session state: run folders opened from elsewhere on disk
_PICKER_KEY = "dynascope_sidebar_run"


def runs_dir() -> Path:
    """The folder holding run folders: ``$DYNASCOPE_RUNS_DIR`` or ``./runs`` (absolute)."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs").expanduser().resolve()


def discover_runs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run folders (holding ``run.json``) under ``root``, up to ``max_depth`` levels deep, sorted."""
    found: list[Path] = []
    if not root.is_dir():
        return found

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if Run.is_run(child):
                found.append(child)
            elif depth < max_depth and child.name != "checkpoints":
                walk(child, depth + 1)

    walk(root, 1)
    return found


def known_runs() -> list[Path]:
    """Runs under the runs folder plus those opened from disk in this session (no duplicates); a demo run
    still being built is left out until it is complete (its pages would show a partial sweep)."""
    root = runs_dir()
    building = {root / name for name in missing_demos(root)}
    runs = [p for p in discover_runs(root) if p not in building]
    extra = [Path(p) for p in st.session_state.get(_EXTRA_KEY, []) if Run.is_run(p)]
    return list(dict.fromkeys([*runs, *extra]))


def label(path: Path | str) -> str:
    """A short name: the path relative to the runs folder when inside it, else the full path."""
    path = Path(path)
    try:
        return str(path.relative_to(runs_dir()))
    except ValueError:
        return str(path)


def select_run(path: Path | str) -> Run:
    """Open ``path`` as a run (``RunError`` if it is not one) and make it the session's selection."""
    run = Run.open(Path(path).expanduser().resolve())
    st.session_state[_RUN_KEY] = str(run.path)
    if run.path not in discover_runs(runs_dir()):
        extra = st.session_state.setdefault(_EXTRA_KEY, [])
        if str(run.path) not in extra:
            extra.append(str(run.path))
    return run


def current_run_path() -> Path | None:
    """The selected run folder; the first known run when nothing was selected yet."""
    path = st.session_state.get(_RUN_KEY)
    if path and Run.is_run(path):
        return Path(path)
    runs = known_runs()
    if runs:
        st.session_state[_RUN_KEY] = str(runs[0])
        return runs[0]
    return None


def current_run() -> Run | None:
    """The selected run, or ``None`` (with an error box when its folder became unreadable)."""
    path = current_run_path()
    if path is None:
        return None
    try:
        run = Run.open(path)
    except RunError as exc:
        st.error(str(exc))
        return None
    from dynascope.runner import ingest_pending

    ingest_pending(run)  # results a training recipe queued for the store
    return run


def require_run() -> Run:
    """The selected run; otherwise an info box pointing at the Runs page, and the page stops here."""
    run = current_run()
    if run is None:
        st.info(
            f"No run selected. Open the **Runs** page to pick one of the runs in `{runs_dir()}`, "
            "open a run folder on disk, or upload checkpoints."
        )
        st.stop()
    if not run.checkpoints():
        st.warning(f"Run `{label(run.path)}` has no checkpoints yet; pick another run on the Runs page.")
        st.stop()
    if not trust_box(run):
        st.stop()
    return run


def trust_box(run: Run) -> bool:
    """For a run whose specs name code that is not trusted (a model factory, a loss function): a box
    listing that code with a "Trust this run" button. ``True`` when the run's code may run."""
    refs = run.untrusted_refs()
    if not refs:
        return True
    with st.container(border=True, key="trust_box"):
        st.warning(
            f"Run `{label(run.path)}` names code that dynascope runs only if you trust it; none of it "
            "has run. Its metrics, checkpoints and cached results stay readable on the Runs page. "
            "Probes need its code:"
        )
        st.markdown("\n".join(f"- {r.describe()}" for r in refs))
        if st.button("Trust this run", key="trust_run", type="primary"):
            run.trust()
            st.rerun()
    return False


def step_label(run: Run) -> str:
    """What a run's checkpoint steps are: ``"step"``, or the swept variable of a sweep run (double descent
    keeps one checkpoint per model size at ``step = p``) — the x title of its across-checkpoint figures."""
    sweep = run.extra.get("sweep_variable")
    return f"{sweep} (checkpoint step)" if sweep else "step"


def phenomenon_of(path: Path | str) -> str | None:
    """The phenomenon a recipe run was made to show (``run.json`` extra), if any."""
    try:
        return Run.open(path).extra.get("phenomenon")
    except RunError:
        return None


def offer_phenomenon_run(run: Run, phenomenon: str, title: str) -> None:
    """On a phenomenon page, point at a run of that phenomenon when the selected run is another one."""
    if run.extra.get("phenomenon") in (None, phenomenon):
        return
    matches = [p for p in known_runs() if phenomenon_of(p) == phenomenon]
    if not matches:
        return
    st.info(f"`{label(run.path)}` is a {run.extra['phenomenon'].replace('_', ' ')} run, not a {title} run.")
    if st.button(f"Switch to `{label(matches[0])}`", key=f"switch_to_{phenomenon}"):
        select_run(matches[0])
        st.rerun()


def run_selectbox(where: Any, *, key: str, label_text: str = "Run") -> None:
    """A selectbox of the known runs in ``where`` (``st`` or ``st.sidebar``), synced with the selection."""
    runs = known_runs()
    current = current_run_path()
    options = [str(p) for p in runs]
    if current is not None and str(current) not in options:
        options.append(str(current))
    if not options:
        return
    if st.session_state.get(key) != str(current):
        st.session_state[key] = str(current) if current is not None else options[0]

    def _changed() -> None:
        st.session_state[_RUN_KEY] = st.session_state[key]

    where.selectbox(label_text, options, format_func=label, key=key, on_change=_changed)


def sidebar_picker() -> None:
    """The run selector in the sidebar (every page)."""
    if not known_runs() and current_run_path() is None:
        st.sidebar.caption(f"No runs in `{runs_dir()}` yet.")
        return
    run_selectbox(st.sidebar, key=_PICKER_KEY)


def page_settings_for(prefix: str, run: Run) -> None:
    """Per-run page settings: when the page ``prefix`` is shown for another run than last time, its
    widgets (session keys ``{prefix}_…``) start again from that run's defaults, not the last run's."""
    marker = f"dynascope_settings_run_{prefix}"
    if st.session_state.get(marker) == str(run.path):
        return
    if marker in st.session_state:
        for k in [k for k in list(st.session_state) if isinstance(k, str) and k.startswith(f"{prefix}_")]:
            try:
                del st.session_state[k]
            except Exception:  # noqa: BLE001,S112 - a key Streamlit holds for a live widget stays
                continue
    st.session_state[marker] = str(run.path)
