"""Writing figures: HTML (plotly.js embedded), PNG/SVG/PDF through kaleido and Chrome/Chromium."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import plotly.graph_objects as go

from ..results import atomic_write_bytes
from .base import ExportError

IMAGE_FORMATS = ("png", "svg", "pdf")


def write_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """A self-contained HTML page of a figure (plotly.js embedded: opens offline). Written atomically."""
    return atomic_write_bytes(Path(path), fig.to_html(include_plotlyjs=True, full_html=True).encode())


def figure_image(fig: go.Figure, fmt: str = "png", *, scale: float = 2.0) -> bytes:
    """PNG, SVG or PDF bytes rendered by kaleido (needs Chrome/Chromium; ``ExportError`` otherwise)."""
    if fmt not in IMAGE_FORMATS:
        raise ExportError(f"image format must be one of {IMAGE_FORMATS}; got {fmt!r}")
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ExportError(f"{fmt.upper()} export needs the 'kaleido' package (pip install kaleido)") from None
    try:
        return fig.to_image(format=fmt, scale=scale)
    except Exception as exc:  # noqa: BLE001 - kaleido/choreographer raise many types for a missing browser
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"{fmt.upper()} export failed: kaleido could not render with a Chrome/Chromium browser "
            f"({type(exc).__name__}: {first}); install chromium (or set BROWSER_PATH), or use HTML instead"
        ) from None


@contextlib.contextmanager
def image_server() -> Iterator[None]:
    """Keep one kaleido browser for the images rendered inside (a report's dozen SVGs: one Chromium start,
    not one per figure); without kaleido, or when it cannot start, a no-op (each figure starts its own)."""
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
    except Exception:  # noqa: BLE001 - figure_image reports a missing browser itself
        yield
        return
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


def write_png(fig: go.Figure, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """A PNG of a figure (kaleido + Chrome/Chromium). Written atomically."""
    return atomic_write_bytes(Path(path), figure_image(fig, "png", scale=scale))


def write_figure(fig: go.Figure, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a figure as ``fmt`` (default: by suffix): ``html``, ``png``, ``svg`` or ``pdf``."""
    suffix = fmt or Path(path).suffix.lower().lstrip(".")
    if suffix == "html":
        return write_html(fig, path)
    if suffix in IMAGE_FORMATS:
        return atomic_write_bytes(Path(path), figure_image(fig, suffix))
    raise ExportError(f"cannot write a figure as {suffix!r}; use .html, .png, .svg or .pdf")
