"""Phenomenon detectors from ``dynascope.recipes`` shown as a verdict with the evidence table."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dynascope import recipes

from . import downloads


def _fmt(v: Any) -> str:
    """Evidence values as text: floats to 4 significant digits (69.89, not 69.89076232910156)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def show_evidence(title: str, detector: str, *args: Any, **kwargs: Any) -> Any | None:
    """Run ``dynascope.recipes.<detector>`` and show its verdict (a caption when it does not apply)."""
    fn = getattr(recipes, detector)
    try:
        evidence = fn(*args, **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        st.caption(f"{title} detector not applicable to this run: {exc}")
        return None
    data = evidence.to_dict() if hasattr(evidence, "to_dict") else dict(vars(evidence))
    detected = bool(data.pop("detected", False))
    with st.container(border=True, key=f"evidence_{detector}"):
        if detected:
            st.success(f"**{title} detected** (`{detector}`)")
        else:
            st.warning(f"**{title} not detected** by `{detector}` with its default thresholds")
        table = pd.DataFrame({"evidence": list(data), "value": [_fmt(v) for v in data.values()]})
        downloads.table(table, key=f"evidence_table_{detector}")
    return evidence
