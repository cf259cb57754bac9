"""Phenomenon detectors from ``dynascope.recipes`` shown as a verdict with the evidence table."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dynascope.models import Run

from .compute import optional


def show_evidence(title: str, detector: str, *args: Any, **kwargs: Any) -> Any | None:
    """Run ``dynascope.recipes.<detector>`` and show its verdict (a caption when it does not apply)."""
    fn = optional("dynascope.recipes", detector)
    if fn is None:
        return None
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
        table = pd.DataFrame({"evidence": list(data), "value": [str(v) for v in data.values()]})
        st.dataframe(table, hide_index=True, key=f"evidence_table_{detector}")
    return evidence


def interpolation_threshold(run: Run, metrics: Any, x: str) -> float | None:
    """Where the model starts to interpolate, along column ``x`` of ``metrics``.

    In order: ``run.json`` extra ``interpolation_threshold`` (when ``x`` is the run's sweep variable
    or no sweep variable is recorded); the training-set size ``n`` when ``x`` counts random features
    (``p = n``); else the smallest ``x`` whose mean train error (or train loss) is ≤ 1e-3, i.e. the
    first model that fits the training set.
    """
    extra = run.extra.get("interpolation_threshold")
    sweep = run.extra.get("sweep_variable")
    if isinstance(extra, (int, float)) and not isinstance(extra, bool) and sweep in (None, x):
        return float(extra)
    if x in ("n_features", "p"):
        n = run.extra.get("n_train", run.dataset_config.get("n_train"))
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            return float(n)
    for col in ("train_error", "train_err", "train_mse", "train_loss"):
        if col in metrics.columns and x in metrics.columns:
            mean = metrics.groupby(x)[col].mean()
            fitted = mean[mean <= 1e-3]
            if len(fitted):
                return float(fitted.index.min())
    return None
