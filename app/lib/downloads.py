"""Charts with downloads: data as CSV / Parquet / JSON, the figure as standalone HTML, PNG, SVG, PDF.

Images are drawn by :func:`dynascope.probes.figures.figure_image` (kaleido 1.x, which drives a
Chrome/Chromium browser found via ``BROWSER_PATH``). :func:`configure_browser` points it at the system
Chromium when there is one; without a browser the image buttons are disabled and the app says how to
enable it. HTML files embed plotly.js, so they open offline.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dynascope.probes.results import to_jsonable

BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
PNG_HELP = (
    "PNG export renders the figure in a headless Chromium (kaleido). Install it with "
    "`sudo apt-get install chromium` (or set `BROWSER_PATH` to a Chrome/Chromium binary) and restart "
    "the app; HTML export works without it."
)
_kaleido_lock = threading.Lock()


def configure_browser(environ: dict[str, str] | None = None) -> str | None:
    """Set ``BROWSER_PATH`` to the system Chromium if unset; returns the browser kaleido will use."""
    env = os.environ if environ is None else environ
    current = env.get("BROWSER_PATH")
    if current and Path(current).is_file():
        return current
    for name in (*BROWSER_CANDIDATES, "chromium", "chromium-browser", "google-chrome", "chrome"):
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            env["BROWSER_PATH"] = found
            return found
    return None


def png_support(environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """``(available, reason)``: kaleido importable and a Chrome/Chromium binary found."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False, "the `kaleido` package is not installed (`pip install kaleido`). " + PNG_HELP
    browser = configure_browser(environ)
    if browser is None:
        return False, "no Chrome/Chromium browser was found. " + PNG_HELP
    return True, f"rendered with {browser}"


def figure_bytes(fig: Any, fmt: str = "png", *, scale: float = 2.0) -> bytes:
    """The figure as PNG/SVG/PDF bytes (:func:`figures.figure_image`; one persistent browser process
    serves every export)."""
    import kaleido

    from dynascope.probes import figures

    configure_browser()
    with _kaleido_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        kaleido.start_sync_server(silence_warnings=True)
        return figures.figure_image(fig, fmt, scale=scale)


def figure_png(fig: Any, *, scale: float = 2.0) -> bytes:
    """The figure as PNG bytes."""
    return figure_bytes(fig, "png", scale=scale)


def table(frame: pd.DataFrame, *, key: str, digits: int = 4, **kwargs: Any) -> None:
    """``st.dataframe`` with float columns shown to ``digits`` significant digits (``%.4g``: 1.2e-09,
    not 0.0000000012 cut to "0000000000"); the data itself is unchanged."""
    config = {
        str(c): st.column_config.NumberColumn(format=f"%.{digits}g")
        for c in frame.columns
        if pd.api.types.is_float_dtype(frame[c])
    }
    st.dataframe(frame, hide_index=True, key=key, column_config=config, **kwargs)


def figure_html(fig: Any) -> str:
    """A standalone HTML page of the figure (plotly.js embedded, opens offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True)


def frame_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def frame_parquet(frame: pd.DataFrame) -> bytes:
    """Parquet bytes; object columns holding lists/dicts are stored as JSON text."""
    safe = frame.copy()
    for col in safe.columns:
        if safe[col].dtype == object and safe[col].map(lambda v: isinstance(v, (list, dict))).any():
            safe[col] = safe[col].map(lambda v: json.dumps(to_jsonable(v)))
    buf = io.BytesIO()
    safe.to_parquet(buf, index=False)
    return buf.getvalue()


def frame_json(frame: pd.DataFrame, extra: dict[str, Any] | None = None) -> bytes:
    """``{"data": [records...], **extra}`` (extra: e.g. the full results with their ``meta``)."""
    records = to_jsonable(frame.to_dict(orient="records"))
    return json.dumps({"data": records, **to_jsonable(extra or {})}, indent=1).encode()


IMAGE_MIMES = (("png", "image/png"), ("svg", "image/svg+xml"), ("pdf", "application/pdf"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "figure"


def download_row(
    fig: Any,
    frame: pd.DataFrame,
    name: str,
    *,
    key: str,
    extra_json: dict[str, Any] | None = None,
) -> None:
    """Seven download buttons: CSV, Parquet, JSON (data) and HTML, PNG, SVG, PDF (figure)."""
    base = slug(name)
    row = st.container(horizontal=True, gap="small", key=f"downloads_{key}")
    ok, reason = png_support()
    draw = (lambda f: lambda: figure_bytes(fig, f)) if ok else (lambda f: b"")
    images = [(f.upper(), draw(f), f, mime, ok) for f, mime in IMAGE_MIMES]
    buttons = [  # label, data (bytes or a callable made on click), file suffix, MIME type, enabled
        ("CSV", frame_csv(frame), "csv", "text/csv", True),
        ("Parquet", lambda: frame_parquet(frame), "parquet", "application/octet-stream", True),
        ("JSON", frame_json(frame, extra_json), "json", "application/json", True),
        ("HTML", lambda: figure_html(fig), "html", "text/html", True),
        *images,
    ]
    for label, data, suffix, mime, enabled in buttons:
        row.download_button(
            label, data, f"{base}.{suffix}", mime, key=f"{key}_{suffix}", on_click="ignore", icon="⬇",
            disabled=not enabled, help=None if enabled else "Image export unavailable: " + reason,
        )  # fmt: skip
    if not ok:
        st.caption("PNG/SVG/PDF export is unavailable: " + reason)


def chart(
    fig: Any,
    frame: pd.DataFrame,
    name: str,
    *,
    key: str,
    extra_json: dict[str, Any] | None = None,
) -> None:
    """A Plotly chart followed by its downloads."""
    with st.container(border=True, key=f"chart_{key}"):
        st.plotly_chart(fig, key=f"{key}_plot", config={"displaylogo": False})
        download_row(fig, frame, name, key=key, extra_json=extra_json)
