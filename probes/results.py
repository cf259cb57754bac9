"""Result types: frozen dataclasses with JSON, pandas and file exports.

Every probe returns a subclass of :class:`Result`. ``.meta`` records how the numbers were
made (probe, parameters, seed, matvec count, wall time, device, dtype, versions, checkpoint
hash, train/eval mode, loss and its reduction).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dynascope.version import __version__

from ..models.atomic import atomic_write


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, numpy scalars, dataclasses and non-finite floats to JSON-safe values.

    Non-finite floats become ``None`` (JSON has no NaN/Inf).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_jsonable(value.item() if value.dim() == 0 else value.tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return repr(value)


def _nan_for_none(value: Any) -> Any:
    """``None`` (how :func:`to_jsonable` writes NaN/Inf) back to NaN, in nested lists too."""
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return float("nan") if value is None else value


def _all_bool(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, bool) for v in items)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`dynascope.models.atomic.atomic_write`) with permissions
    ``mode`` (default 0644, as any tool writes a document; a temporary file alone would leave 0600)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)

    return atomic_write(path, write)


@dataclass(frozen=True, kw_only=True)
class Result:
    """Base of all probe results. Subclasses add their value fields; ``former_names``: the names a renamed
    class was stored under (:class:`~dynascope.store.ResultStore` rows keep their class name)."""

    former_names: ClassVar[tuple[str, ...]] = ()
    #: Bulky fields (``[P, k]`` eigenvectors, ``[d, P]`` directions) that :meth:`to_dict` leaves out unless
    #: named in ``include`` (stored results and JSON files stay small; they come back as ``None``).
    omitted: ClassVar[tuple[str, ...]] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, include: Iterable[str] = ()) -> dict[str, Any]:
        """All fields (meta included) as JSON-safe Python values, but the :attr:`omitted` ones not in
        ``include``."""
        kept = set(include)
        return {
            f.name: to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in self.omitted or f.name in kept
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild a result from :meth:`to_dict` output; tensor-annotated fields become float64 tensors."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if "Tensor" in annotation and isinstance(value, (list, int, float)):
                try:
                    raw = _nan_for_none(value)
                    value = torch.tensor(raw, dtype=torch.bool if _all_bool(value) else torch.float64)
                except (TypeError, ValueError):
                    pass  # ragged or non-numeric: keep the JSON value
            kwargs[f.name] = value
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_frame(self):  # -> pandas.DataFrame
        """A tidy table of the result's values.

        Default: every 1-D array field of the longest length becomes a column, scalar fields
        are repeated; subclasses override where another layout reads better.
        """
        import pandas as pd

        arrays: dict[str, list] = {}
        scalars: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "meta":
                continue
            v = to_jsonable(getattr(self, f.name))
            if isinstance(v, list) and all(not isinstance(e, (list, dict)) for e in v):
                arrays[f.name] = v
            elif not isinstance(v, (list, dict)):
                scalars[f.name] = v
        n = max((len(a) for a in arrays.values()), default=1)
        cols = {k: a for k, a in arrays.items() if len(a) == n}
        frame = pd.DataFrame(cols) if cols else pd.DataFrame(index=range(1))
        for k, v in scalars.items():
            frame[k] = v
        return frame

    def figure(self, **kwargs: Any):  # -> plotly.graph_objects.Figure
        """The Plotly figure, drawn by :func:`dynascope.probes.figures.draw` (keywords pass through)."""
        from .figures import draw

        return draw(self, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result by file suffix: ``.json`` (full), ``.csv`` / ``.parquet`` (``to_frame``),
        ``.html`` / ``.png`` / ``.svg`` / ``.pdf`` (:meth:`figure`; images need kaleido and Chrome/Chromium).

        Written atomically.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            return atomic_write_bytes(path, self.to_json(indent=2).encode())
        if suffix == ".csv":
            return atomic_write_bytes(path, self.to_frame().to_csv(index=False).encode())
        if suffix == ".parquet":
            import io

            buf = io.BytesIO()
            self.to_frame().to_parquet(buf, index=False)
            return atomic_write_bytes(path, buf.getvalue())
        if suffix in (".html", ".png", ".svg", ".pdf"):
            from .figures import write_figure

            return write_figure(self.figure(), path)
        raise ValueError(
            f"cannot save a result as {suffix!r}; use .json, .csv, .parquet, .html, .png, .svg or .pdf"
        )


def _versions() -> dict[str, str]:
    return {
        "dynascope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def make_meta(
    probe: str,
    *,
    model: nn.Module | None = None,
    params: dict[str, Any] | None = None,
    started: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Standard ``.meta`` block: probe, parameters, wall time, device, dtype, versions, checkpoint hash."""
    meta: dict[str, Any] = {"probe": probe, "params": to_jsonable(params or {})}
    if model is not None:
        p = next(iter(model.parameters()), None)
        if p is not None:
            meta["device"] = str(p.device)
            meta["dtype"] = str(p.dtype)
        meta["checkpoint_hash"] = getattr(model, "dynascope_checkpoint_hash", None)
        meta["model_config"] = to_jsonable(getattr(model, "dynascope_config", None))
        meta["model_config_source"] = getattr(model, "dynascope_config_source", None)
        if type(model).__name__ == "OptimizedModule":
            meta["compiled"] = "a torch.compile'd module, probed through its original module (_orig_mod)"
    if started is not None:
        meta["wall_time_s"] = time.perf_counter() - started
    meta["versions"] = _versions()
    meta.update(to_jsonable(extra))
    return meta


def stochastic_modules(model: nn.Module, mode: str) -> list[str]:
    """Dropout modules with p > 0 when ``mode="train"``: each forward draws new masks, so a probe's numbers
    change between calls (empty in eval mode)."""
    if mode != "train":
        return []
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0]  # fmt: skip


def warn_train_randomness(probe: str, stochastic: list[str], detail: str = "") -> None:
    """The warning every probe gives when ``mode="train"`` makes it random (:func:`stochastic_modules`)."""
    if stochastic:
        warnings.warn(
            f"{probe}: mode='train' with dropout ({', '.join(stochastic[:5])}) makes the result random, so "
            f"it changes between calls{detail}. Use mode='eval' for reproducible numbers (recorded in .meta: "
            "'stochastic_modules')",
            UserWarning,
            stacklevel=3,
        )


def train_randomness(probe: str, model: nn.Module, mode: str) -> list[str]:
    """:func:`stochastic_modules` of ``model`` in ``mode``, warned about (:func:`warn_train_randomness`)."""
    stochastic = stochastic_modules(model, mode)
    warn_train_randomness(probe, stochastic, "")
    return stochastic
