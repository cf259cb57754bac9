"""Import checkpoint folders written by other tools into a :class:`~dynascope.models.runs.Run`.

Layouts recognised by :func:`scan_checkpoint_folder` (first match wins):

* ``"hf_trainer"`` — Hugging Face ``Trainer`` output: ``checkpoint-N/`` folders holding ``model.safetensors``
  (or ``pytorch_model.bin``); the step is ``N`` (``trainer_state.json``'s ``global_step`` when present) and
  the metrics are the ``log_history`` of the newest ``trainer_state.json`` (``loss`` → ``train_loss``,
  ``eval_loss`` → ``test_loss``, other keys as they are);
* ``"lightning"`` — ``*.ckpt`` files (anywhere below the folder); the step is the file's ``global_step``
  (epoch: ``epoch``); metrics: the ``metrics.csv`` of Lightning's ``CSVLogger`` when one is below the folder;
* ``"plain"`` — ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` files with the step as the last number in
  their name (``step_100.pt``, ``model-2000.safetensors``).

:func:`import_checkpoints` creates the run with the given model, data and loss specs. By reference (default)
``run.json`` lists the original files (``checkpoint_refs``) and the run reads them in place; ``copy=True``
writes each as ``checkpoints/step_N.safetensors`` (tensors only, with step/epoch/metrics metadata).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import CheckpointError, load_checkpoint
from .runs import Run, RunError
from .specs import HF_WEIGHT_FILES

__all__ = ["FoundCheckpoint", "FolderScan", "scan_checkpoint_folder", "import_checkpoints"]

PLAIN_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_HF_DIR = re.compile(r"^checkpoint-(\d+)$")
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class FoundCheckpoint:
    """One checkpoint of a scanned folder: ``step``, ``epoch`` (or None), weights ``path``."""

    step: int
    epoch: int | None
    path: Path


@dataclass
class FolderScan:
    """What :func:`scan_checkpoint_folder` found: the ``layout``, the checkpoints sorted by step and the
    metrics rows (each with a ``step``)."""

    layout: str
    folder: Path
    checkpoints: list[FoundCheckpoint]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; ``RunError`` naming it when unreadable, too deeply nested or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RunError(path, f"could not be read as JSON ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise RunError(path, "could not be read as JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise RunError(path, f"must hold a JSON object, not a {type(obj).__name__}")
    return obj


def _step(value: Any, where: Path, what: str = "step") -> int:
    """``value`` as a step: an integer (or integral float) in [0, 2**63); ``RunError`` naming ``where``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise RunError(where, f"{what} must be an integer in [0, 2**63), got {str(value)[:40]!r}")
    return value


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _hf_metrics(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    rename = {"loss": "train_loss", "eval_loss": "test_loss", "learning_rate": "lr"}
    rows: dict[int, dict[str, Any]] = {}
    history = state.get("log_history")
    for entry in history if isinstance(history, list) else []:
        step = entry.get("step") if isinstance(entry, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
            continue
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        for k, v in entry.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[rename.get(k, k)] = _finite(v)
    return [rows[s] for s in sorted(rows)]


def _scan_hf(folder: Path) -> FolderScan | None:
    found, states = [], []
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _HF_DIR.match(d.name)
        if not (m and d.is_dir()):
            continue
        weights = next((d / n for n in HF_WEIGHT_FILES if (d / n).is_file()), None)
        if weights is None:
            continue
        step, epoch = int(m.group(1)), None
        st = d / "trainer_state.json"
        if st.is_file():
            state = _read_json(st)
            step = _step(state.get("global_step", step), st, "global_step")
            e = state.get("epoch")
            number = isinstance(e, (int, float)) and not isinstance(e, bool)
            epoch = int(e) if number and 0 <= e < 2**63 else None  # NaN compares False
            states.append((step, state))
        found.append(FoundCheckpoint(step, epoch, weights))
    if not found:
        return None
    metrics = _hf_metrics(max(states, key=lambda s: s[0])[1]) if states else []
    return FolderScan("hf_trainer", folder, sorted(found, key=lambda c: c.step), metrics)


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            try:
                step = _step(float(r.get("step") or ""), path)
            except (ValueError, TypeError):  # RunError is a ValueError: a row without a usable step
                continue
            row = rows.setdefault(step, {"step": step})
            for k, v in r.items():
                if k in (None, "step") or v in (None, ""):
                    continue
                try:
                    num = float(v)
                except ValueError:
                    row[k] = v
                    continue
                row[k] = int(num) if k == "epoch" and num.is_integer() and abs(num) < 2**63 else _finite(num)
    return [rows[s] for s in sorted(rows)]


def _scan_lightning(folder: Path) -> FolderScan | None:
    files = sorted(folder.rglob("*.ckpt"))
    if not files:
        return None
    found = []
    for f in files:
        loaded = load_checkpoint(f)
        meta = loaded.metadata
        step = meta.get("global_step", loaded.step)
        if not isinstance(step, int):
            raise CheckpointError(f, "a Lightning checkpoint without a global_step (cannot order it)")
        epoch = meta.get("epoch")
        found.append(FoundCheckpoint(int(step), int(epoch) if isinstance(epoch, int) else None, f))
    groups: dict[int, list[FoundCheckpoint]] = {}
    for c in found:
        groups.setdefault(c.step, []).append(c)
    found, dup = [], []
    for step, cs in groups.items():  # Lightning's last.ckpt repeats the newest step: keep the named file
        named = [c for c in cs if not c.path.stem.startswith("last")]
        if len(named) > 1:
            dup.append(step)
        found.append(named[0] if named else cs[0])
    if dup:
        raise RunError(folder, f"several .ckpt files share global_step {sorted(dup)}; keep one of each")
    metrics: list[dict[str, Any]] = []
    for m in sorted(folder.rglob("metrics.csv")):
        metrics = _csv_rows(m)
    return FolderScan("lightning", folder, sorted(found, key=lambda c: c.step), metrics)


def _scan_plain(folder: Path) -> FolderScan | None:
    found = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not f.is_file() or f.suffix.lower() not in PLAIN_SUFFIXES or f.name.endswith(".optim.pt"):
            continue
        numbers = _NUMBER.findall(f.stem)
        if not numbers:
            continue
        found.append(FoundCheckpoint(_step(int(numbers[-1]), f, "the step in the file name"), None, f))
    if not found:
        return None
    steps = [c.step for c in found]
    if len(set(steps)) != len(steps):
        raise RunError(folder, f"several checkpoint files carry the same step number: {sorted(steps)}")
    return FolderScan("plain", folder, sorted(found, key=lambda c: c.step))


def scan_checkpoint_folder(folder: str | os.PathLike[str]) -> FolderScan:
    """Find the checkpoints of ``folder`` (module docstring); ``RunError`` naming the folder when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(folder, "is not a folder")
    for scan in (_scan_hf, _scan_lightning, _scan_plain):
        found = scan(folder)
        if found is not None:
            return found
    raise RunError(
        folder,
        "holds no checkpoints: expected Hugging Face Trainer checkpoint-N/ folders, Lightning *.ckpt files, "
        "or .pt/.pth/.bin/.safetensors files with the step in their names",
    )


def import_checkpoints(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: Mapping[str, Any] | str,
    dataset: Mapping[str, Any] | str,
    loss: str | Mapping[str, Any] | None = None,
    copy: bool = False,
    overwrite: bool = False,
    notes: str = "",
) -> Run:
    """Create the run ``out`` from the checkpoints of ``folder`` (module docstring) with these specs."""
    scan = scan_checkpoint_folder(folder)
    extra = {"imported_from": str(Path(folder).resolve()), "layout": scan.layout, "copied": bool(copy)}
    run = Run.create(
        out, model=model, dataset=dataset, loss=loss, extra=extra, overwrite=overwrite, notes=notes
    )
    by_step = {r["step"]: r for r in scan.metrics}
    if copy:
        from safetensors.torch import save_file

        for c in scan.checkpoints:
            sd = load_checkpoint(c.path).state_dict
            tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
            meta: dict[str, Any] = {"step": c.step, "epoch": c.epoch, "source": str(c.path)}
            metrics = {k: v for k, v in by_step.get(c.step, {}).items() if k != "step"}
            if metrics:
                meta["metrics"] = metrics
            tmp = run.checkpoint_path(c.step).with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"dynascope": json.dumps(meta)})
            os.replace(tmp, run.checkpoint_path(c.step))
    else:
        run.set_checkpoint_refs(
            [{"step": c.step, "epoch": c.epoch, "path": str(c.path.resolve())} for c in scan.checkpoints]
        )
    if scan.metrics:
        run.log_metrics(scan.metrics)
    return run
