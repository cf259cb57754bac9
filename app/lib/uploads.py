"""Turn uploaded checkpoint files into a run folder (no Streamlit here; the Runs page calls it).

Every file is loaded with :func:`dynascope.models.load_checkpoint` into the architecture named by
the user (safe loading: ``weights_only`` pickles, safetensors, Lightning ``.ckpt``). Files that fail
are reported by name with the loader's message; the run is created only when at least one file
loads, then each loaded checkpoint is re-saved as ``checkpoints/step_<n>.safetensors``.

Names are made safe (letters, digits, ``._-``) and short (at most :data:`MAX_NAME_CHARS`, a hash of
the full name keeping long names apart); two files with the same name are reported as ``name`` and
``name (2)``. Each file may be at most :data:`MAX_UPLOAD_MB` MB (``server.maxUploadSize`` in
``app/.streamlit/config.toml`` sets the same limit in the browser; ``DYNASCOPE_MAX_UPLOAD_MB`` overrides
both checks' value here). A step or epoch that is NaN, infinite, negative or >= 2**63 is that file's
error; the other files are imported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynascope.models import CheckpointError, Run, build, checkpoint_counter, load_checkpoint

UPLOAD_SUFFIXES = ("pt", "pth", "bin", "safetensors", "ckpt")
UPLOADS_FOLDER = "uploads"
_STEP_PATTERNS = (re.compile(r"step[=_-]?(\d+)", re.I), re.compile(r"(\d+)"))
MAX_NAME_CHARS = 120  # file systems allow 255 bytes per name; leave room for prefixes and suffixes
MAX_UPLOAD_MB = 1024  # per file; keep equal to server.maxUploadSize in app/.streamlit/config.toml


def max_upload_bytes() -> int:
    """The per-file upload cap in bytes (``DYNASCOPE_MAX_UPLOAD_MB`` or :data:`MAX_UPLOAD_MB`)."""
    try:
        mb = float(os.environ.get("DYNASCOPE_MAX_UPLOAD_MB", MAX_UPLOAD_MB))
    except ValueError:
        mb = MAX_UPLOAD_MB
    return int(mb * 2**20)


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` as a JSON object (empty text gives ``{}``); ``ValueError`` naming ``what`` otherwise."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ValueError(f"{what} is not valid JSON: {exc.msg} ({where})") from None
    if not isinstance(value, dict):
        raise ValueError(f'{what} must be a JSON object like {{"width": 64}}, got {type(value).__name__}')
    return value


def safe_name(name: str) -> str:
    """A file/folder name made of letters, digits, ``._-`` only, at most :data:`MAX_NAME_CHARS` long.

    A longer name keeps its start and suffix, with 10 hex digits of its SHA-256 between them.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name).strip("._") or "upload"
    if len(cleaned) <= MAX_NAME_CHARS:
        return cleaned
    suffix = Path(cleaned).suffix if len(Path(cleaned).suffix) <= 16 else ""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[: MAX_NAME_CHARS - len(suffix) - 11]}-{digest}{suffix}"


def distinct_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats told apart: ``a.pt``, ``a.pt (2)``, ``a.pt (3)``..."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def step_from_name(name: str) -> int | None:
    """A step number in a file name (``step_100.pt``, ``epoch=3-step=200.ckpt``), if any."""
    stem = Path(name).name
    for pattern in _STEP_PATTERNS:
        m = pattern.search(stem)
        if m:
            step = int(m.group(1))
            return step if step < 2**63 else None  # a digit run too long to be a step
    return None


@dataclass
class ImportReport:
    """What an upload produced: the run (``None`` when nothing loaded), loaded steps and per-file errors."""

    run: Run | None
    steps: dict[str, int] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)


def import_checkpoints(
    files: Sequence[tuple[str, bytes]],
    *,
    runs_root: Path,
    run_name: str,
    model_name: str,
    model_config: dict[str, Any],
    dataset_name: str,
    dataset_config: dict[str, Any],
    loss: str | None = None,
    lr: float | None = None,
) -> ImportReport:
    """Create ``<runs_root>/uploads/<run_name>`` from ``files`` (``(file name, bytes)`` pairs).

    Raises ``ValueError`` for a bad model/dataset config, a taken run name or no files; per-file
    load failures go to ``report.errors`` (the run is not created when every file fails).
    """
    if not files:
        raise ValueError("choose at least one checkpoint file to upload")
    cfg = {k: v for k, v in model_config.items() if k != "name"}
    build(model_name, **cfg)  # validates the architecture config (ValueError naming bad keys)
    from dynascope.datasets import load

    load(dataset_name, **dataset_config)  # validates the dataset config
    target = Path(runs_root) / UPLOADS_FOLDER / safe_name(run_name)
    if target.exists():
        raise ValueError(
            f"a run named {safe_name(run_name)!r} already exists in {target.parent}; pick another name"
        )

    loaded: list[tuple[str, int, Any, Any]] = []  # (file name, step, model, LoadedCheckpoint)
    errors: dict[str, Exception] = {}
    cap = max_upload_bytes()
    names = distinct_names([n for n, _ in files])
    with tempfile.TemporaryDirectory(prefix="dynascope-upload-") as tmp:
        for i, (name, (_, data)) in enumerate(zip(names, files)):
            if len(data) > cap:
                errors[name] = ValueError(
                    f"checkpoint '{name}': {len(data) / 2**20:.3g} MB is over the upload limit of "
                    f"{cap / 2**20:.3g} MB per file (DYNASCOPE_MAX_UPLOAD_MB, server.maxUploadSize)"
                )
                continue
            path = Path(tmp) / f"{i:03d}" / safe_name(name)
            path.parent.mkdir()
            path.write_bytes(data)
            model = build(model_name, **cfg)
            try:
                ck = load_checkpoint(path, model)
                step = ck.step if ck.step is not None else step_from_name(name)
                checkpoint_counter(ck.epoch, "epoch", path)
            except CheckpointError as exc:
                errors[name] = _renamed(exc, str(path), name)
                continue
            except Exception as exc:  # noqa: BLE001 - report any loader failure by file name
                why = f"{type(exc).__name__}: {exc}"
                errors[name] = ValueError(f"checkpoint '{name}': could not be loaded ({why})")
                continue
            loaded.append((name, step if step is not None else -1, model, ck))
    if not loaded:
        return ImportReport(run=None, errors=errors)

    explicit = {s for _, s, _, _ in loaded if s >= 0}
    used: set[int] = set()
    plan = []
    for name, step, model, ck in loaded:
        if step < 0 or step in used:  # no step recorded, or a duplicate: the smallest free number
            step = next(n for n in itertools.count() if n not in used and n not in explicit)
        used.add(step)
        plan.append((name, step, model, ck))
    optimizer = {"name": "unknown", "lr": float(lr)} if lr else None
    run = Run.create(
        target,
        model={"name": model_name, **cfg},
        dataset={"name": dataset_name, **dataset_config},
        optimizer=optimizer,
        loss=loss,
        notes=f"uploaded from {len(plan)} file(s): {', '.join(n for n, *_ in plan)}",
        extra={"source": "upload"},
    )
    steps: dict[str, int] = {}
    for name, step, model, ck in sorted(plan, key=lambda t: t[1]):
        metrics = ck.metadata.get("metrics") if isinstance(ck.metadata.get("metrics"), dict) else None
        metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))}
        run.save_checkpoint(model, step, epoch=ck.epoch, metrics=metrics or None)
        steps[name] = step
    return ImportReport(run=run, steps=steps, errors=errors)


def _renamed(exc: CheckpointError, tmp_path: str, name: str) -> CheckpointError:
    """The same error with the temporary path replaced by the uploaded file's name."""
    exc.path = name
    exc.detail = exc.detail.replace(tmp_path, name)
    exc.args = (str(exc.args[0]).replace(tmp_path, name),) + tuple(exc.args[1:])
    return exc
