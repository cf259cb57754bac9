"""One trajectory view: a probe's stored results over checkpoints → one tidy table → one figure.

The result store keys every row on everything that determines it, the checkpoint's identity included
(its sha256, the optimizer state's sha256, the steps of a multi-checkpoint probe, the per-checkpoint
model spec and the η of the schedule at that step). Results computed with the same *setting* — the
parameters without that identity (:func:`setting`) — belong on one curve over the steps. This module
groups them so (:func:`settings`, widest first), and a :class:`Trajectory` gives the tidy table
(:meth:`Trajectory.frame`: one row per step and quantity) and the figure
(:meth:`Trajectory.figure`: :func:`dynascope.probes.figures.across_checkpoints`).

The notebook (``RunView.trajectory`` / ``RunView.figure``), the CLI export, the app's run page and the
report all go through here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Parameters that identify the checkpoint, not the computation: left out of :func:`setting`.
#: ``lr``: the sharpness probe's η is read from the schedule at each checkpoint (the result keeps it).
CHECKPOINT_KEYS = frozenset({"checkpoint_sha256", "checkpoint_steps", "optimizer_state", "model_spec", "lr"})


def setting(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the checkpoint's identity (:data:`CHECKPOINT_KEYS`)."""
    return {k: v for k, v in params.items() if k not in CHECKPOINT_KEYS}


def setting_id(params: Mapping[str, Any]) -> str:
    """A short stable name of a setting: the first 8 hex digits of its canonical JSON's sha256."""
    blob = json.dumps(setting(params), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Trajectory:
    """The results of ``probe`` under one setting, one per checkpoint step (the latest when repeated)."""

    probe: str
    params: dict[str, Any]
    results: dict[int, Any]
    hashes: dict[int, str]
    n_settings: int = 1

    @property
    def steps(self) -> list[int]:
        return sorted(self.results)

    @property
    def id(self) -> str:
        return setting_id(self.params)

    def frame(self):  # -> pandas.DataFrame
        """Tidy: ``step, quantity, index, value`` — one row per step and quantity (``index``: the entry of
        a vector quantity, 1-based; empty for scalars). Parameters are not repeated here: see
        :meth:`sidecar`."""
        return tidy_frame(self.results)

    def sidecar(self) -> dict[str, Any]:
        """What the table leaves out: probe, setting id and parameters, and each step's checkpoint hash."""
        return {
            "probe": self.probe,
            "setting": self.id,
            "params": self.params,
            "checkpoints": {str(s): self.hashes[s] for s in self.steps},
        }

    def figure(self, *, title: str | None = None, x_title: str = "step"):  # -> go.Figure
        """The probe over the steps (:func:`dynascope.probes.figures.across_checkpoints`); one result: its
        own figure."""
        from dynascope.probes import figures

        if len(self.results) == 1:
            (only,) = self.results.values()
            return only.figure()
        fig = figures.across_checkpoints(self.results, x_title=x_title)
        if title:
            fig.update_layout(title={"text": title})
        elif self.n_settings > 1:
            head = fig.layout.title.text or self.probe
            fig.update_layout(title={"text": f"{head} (1 of {self.n_settings} settings)"})
        return fig


def tidy_frame(results: Mapping[int, Any]):  # -> pandas.DataFrame
    """``step, quantity, index, value`` of ``{step: Result}``: every numeric scalar field, every entry of
    every numeric vector field and every row of a numeric matrix (``loss[i]``, ``index`` the column);
    deeper lists, strings, booleans and ``meta`` are left out (JSON exports hold them)."""
    import pandas as pd

    rows: list[tuple[int, str, float, float]] = []
    for step, result in sorted(results.items()):
        for name, value in result.to_dict().items():
            if name == "meta" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                rows.append((step, name, math.nan, float(value)))
            elif isinstance(value, list) and value and all(_is_number(v) for v in value):
                rows.extend((step, name, float(i), float(v)) for i, v in enumerate(value, 1))
            elif isinstance(value, list) and value and all(_numbers(row) for row in value):  # a grid
                for i, row in enumerate(value, 1):
                    rows.extend((step, f"{name}[{i}]", float(j), float(v)) for j, v in enumerate(row, 1))
    frame = pd.DataFrame(rows, columns=["step", "quantity", "index", "value"])
    frame["index"] = frame["index"].astype("Int64")
    return frame


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(row: Any) -> bool:
    return isinstance(row, list) and bool(row) and all(_is_number(v) for v in row)


def settings(store: Any, probe: str) -> list[Trajectory]:
    """Every setting of ``probe`` in ``store`` (a :class:`~dynascope.store.ResultStore`), the one covering
    the most checkpoints first (a multi-checkpoint probe such as ``ntk_trajectory`` has one result per
    setting, under step ``None``)."""
    from dynascope.probes.results import Result

    groups: dict[str, list[Any]] = {}
    for s in store.list(probe):  # ordered by step, then time: the latest of a step wins below
        if isinstance(s.result, Result):  # step None: a multi-checkpoint probe's one result
            groups.setdefault(setting_id(s.params), []).append(s)
    out = [
        Trajectory(
            probe=probe,
            params=setting(rows[0].params),
            results={s.step: s.result for s in rows},
            hashes={s.step: s.checkpoint_hash for s in rows},
            n_settings=len(groups),
        )
        for rows in groups.values()
    ]
    return sorted(out, key=lambda t: (-len(t.results), -max(s.created for s in groups[t.id])))


def trajectory(store: Any, probe: str) -> Trajectory:
    """The widest setting of ``probe`` (:func:`settings`); ``ExportError`` when nothing is stored."""
    from dynascope.probes.figures import ExportError

    found = settings(store, probe)
    if not found:
        raise ExportError(f"no cached {probe!r} results")
    return found[0]


__all__ = ["CHECKPOINT_KEYS", "Trajectory", "setting", "setting_id", "settings", "tidy_frame", "trajectory"]
