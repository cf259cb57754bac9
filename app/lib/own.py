"""Your own model on the Runs page: parse the spec fields, dry-run them and import a checkpoint folder.

No Streamlit here (the page calls it). A factory named by a spec is imported from the Python environment
or from a file path on this machine, never from an uploaded file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynascope.datasets import is_factory_ref
from dynascope.dry_run import DryRunReport, dry_run
from dynascope.models import FolderScan, Run, import_checkpoints, scan_checkpoint_folder

OWN_FOLDER = "imported"


def parse_spec(text: str, what: str, *, name_ok: bool = True) -> Any:
    """A spec field: JSON object, ``module:function`` / ``file.py:function`` (a factory), or a plain name
    (a registered model/dataset, or a loss name). ``ValueError`` naming ``what`` otherwise."""
    text = (text or "").strip()
    if not text:
        raise ValueError(f"enter the {what}")
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the {what} is not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"the {what} must be a JSON object")
        return value
    if is_factory_ref(text):
        return text if what == "loss spec" else {"factory": text}
    if not name_ok:
        raise ValueError(f"the {what} must be JSON or 'module:function'; got {text!r}")
    return text if what == "loss spec" else {"name": text}


@dataclass
class FolderCheck:
    """A scanned folder and the dry run on its first checkpoint."""

    scan: FolderScan
    report: DryRunReport


def check_folder(folder: str, model: Any, data: Any, loss: Any) -> FolderCheck:
    """Scan ``folder`` and dry-run the specs on its first checkpoint (``ValueError``/``RunError`` if not)."""
    path = Path(folder.strip()).expanduser()
    scan = scan_checkpoint_folder(path)
    return FolderCheck(scan, dry_run(model, data, loss, checkpoint=scan.checkpoints[0].path))


def create_run(
    folder: str, runs_root: Path, run_name: str, model: Any, data: Any, loss: Any, *, copy: bool = False
) -> tuple[Run, FolderCheck]:
    """Dry-run, then import ``folder`` as ``<runs_root>/imported/<run_name>`` (never over an existing run)."""
    check = check_folder(folder, model, data, loss)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in run_name.strip()).strip("._")
    if not name:
        raise ValueError("enter a run name")
    target = Path(runs_root) / OWN_FOLDER / name
    if target.exists():
        raise ValueError(f"a run named {name!r} already exists in {target.parent}; pick another name")
    run = import_checkpoints(Path(folder.strip()).expanduser(), target, model=model, dataset=data, loss=loss,
                             copy=copy)  # fmt: skip
    return run, check


def spec_label(spec: dict[str, Any]) -> str:
    """A short label of a spec: registry name, factory function, HF folder or data file name."""
    for key in ("name", "factory", "hf", "file"):
        value = spec.get(key)
        if isinstance(value, str):
            return (
                value.rsplit(":", 1)[-1]
                if key == "factory"
                else (Path(value).name if key != "name" else value)
            )
    return "?"
