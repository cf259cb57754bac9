"""Readable error display: user errors become one ``st.error`` box and the app keeps running."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from dynascope.models import CheckpointError, RunError, UnsafeCheckpointError

UNSAFE_EXPLANATION = (
    "The file is a Python pickle that needs more than plain tensors to load. Unpickling can run "
    "arbitrary code, so dynascope only loads checkpoints with `torch.load(weights_only=True)` and "
    "refuses this one. If you trust the file, re-save just the weights — "
    "`torch.save(model.state_dict(), 'weights.pt')` or `safetensors.torch.save_file(...)` — and upload that."
)

# Errors whose message is written for the user (bad files, bad config, bad input): no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    RunError,
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    PermissionError,
)


def describe(exc: BaseException) -> str:
    """One readable paragraph for ``exc`` (unsafe checkpoints get the explanation why)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    if isinstance(exc, UnsafeCheckpointError):
        return f"Refused an unsafe checkpoint. {text}\n\n{UNSAFE_EXPLANATION}"
    return text


def show_error(exc: BaseException, what: str | None = None) -> None:
    """``st.error`` with the message; unexpected errors add the traceback in a collapsed expander."""
    head = f"**{what} failed.** " if what else ""
    st.error(head + describe(exc))
    if not isinstance(exc, USER_ERRORS):
        with st.expander("Technical details"):
            st.code("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


@contextmanager
def guard(what: str | None = None) -> Iterator[None]:
    """Run a block; any error (but Streamlit's own stop/rerun signals) is shown, not raised."""
    try:
        yield
    except ScriptControlException:
        raise
    except Exception as exc:  # noqa: BLE001 - the app shows every failure and keeps running
        show_error(exc, what)
