"""Trust records: which code the specs of a run folder or checkpoint file may import.

Files are data. A spec stored in a folder (``run.json``'s model, dataset and loss, a checkpoint's
``model_config`` metadata) may name code: ``{"factory": "pkg.module:fn"}``, ``"path/file.py:fn"``, a loss
``"pkg.module:fn"``. That code runs only while the folder is *trusted*: a record in the user's trust file
keyed by the folder's real path, holding the sha256 of its manifest (``run.json``, or the checkpoint file
itself) and of every referenced ``.py`` file, and the references it allows. Editing the manifest or a
referenced file revokes the record; a checkpoint added later that names other code is not covered.

The trust file is ``$DYNASCOPE_TRUST_FILE``, else ``$XDG_CONFIG_HOME/dynascope/trust.json``, else
``~/.config/dynascope/trust.json``. Registry names (``{"name": "mlp"}``), built-in datasets and losses, data
files and Hugging Face folders (loaded with ``trust_remote_code=False``) name no code and need no trust.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datasets.factory import CodePolicy, _is_file_ref, absolute_ref, code_policy, is_factory_ref, split_ref
from .atomic import atomic_write_text, dir_lock

__all__ = [
    "CodeRef", "TrustedCode", "spec_refs", "trust_file", "trusted_refs", "grant", "revoke", "TRUST_HINT"
]

#: How to trust a folder, with ``{path}`` to fill in.
TRUST_HINT = (
    "to trust it, run `dynascope trust {path}` (it shows what would run and asks), or pass "
    "open_run(..., trust=True) / --trust, or press 'Trust this run' in the app"
)


@dataclass(frozen=True)
class CodeRef:
    """One piece of code a spec names: ``what`` (e.g. ``"model factory"``), the reference, and the
    absolute ``.py`` file it imports (``None`` for a module of the environment)."""

    what: str
    ref: str
    file: str | None

    def describe(self) -> str:
        where = f"runs the file {self.file}" if self.file else "imports a module of this environment"
        return f"{self.what}: {self.ref} ({where})"


def _ref(what: str, ref: str) -> CodeRef:
    ref = absolute_ref(ref)
    mod, _ = split_ref(ref)
    return CodeRef(what, ref, mod if _is_file_ref(mod) else None)


def spec_refs(config: Mapping[str, Any], where: str = "") -> list[CodeRef]:
    """The code named by a run config's ``model``, ``dataset`` and ``loss`` specs (or by a lone model
    spec passed as ``{"model": spec}``); ``where`` is appended to each description."""
    out: list[CodeRef] = []
    for key, what in (("model", "model factory"), ("dataset", "data factory")):
        spec = config.get(key)
        if isinstance(spec, Mapping) and is_factory_ref(spec.get("factory")):
            out.append(_ref(what + where, spec["factory"]))
    loss = config.get("loss")
    name = loss.get("name") if isinstance(loss, Mapping) else loss
    if is_factory_ref(name):
        out.append(_ref("loss" + where, name))
    return out


def trust_file() -> Path:
    """Where trust records are kept (module docstring)."""
    env = os.environ.get("DYNASCOPE_TRUST_FILE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "dynascope" / "trust.json"


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _fingerprint(manifest: Path, refs: Iterable[CodeRef]) -> dict[str, Any]:
    files = sorted({r.file for r in refs if r.file})
    return {
        "manifest": str(manifest.resolve()),
        "manifest_sha256": _sha256(manifest),
        "files": {f: _sha256(Path(f)) for f in files},
    }


def _read() -> dict[str, Any]:
    path = trust_file()
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        return {}  # an unreadable trust file trusts nothing
    return records if isinstance(records, dict) else {}


def trusted_refs(folder: str | os.PathLike[str], manifest: str | os.PathLike[str]) -> frozenset[str]:
    """The references the record of ``folder`` allows, if its manifest and files are unchanged; else none."""
    record = _read().get(str(Path(folder).resolve()))
    if not isinstance(record, dict) or not isinstance(record.get("refs"), list):
        return frozenset()
    refs = [_ref(str(r.get("what", "")), r["ref"]) for r in record["refs"]
            if isinstance(r, dict) and is_factory_ref(r.get("ref"))]  # fmt: skip
    if _fingerprint(Path(manifest), refs) != record.get("fingerprint"):
        return frozenset()  # run.json or a referenced file changed since it was trusted
    return frozenset(r.ref for r in refs)


def _write(update: dict[str, Any]) -> None:
    path = trust_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with dir_lock(path.parent):
        records = _read()
        records.update(update)
        records = {k: v for k, v in records.items() if v is not None}
        atomic_write_text(path, json.dumps(records, indent=2, sort_keys=True) + "\n")


def grant(folder: str | os.PathLike[str], manifest: str | os.PathLike[str], refs: Iterable[CodeRef]) -> None:
    """Record that the code ``refs`` named by ``folder`` (whose manifest is ``manifest``) may run."""
    refs = list(refs)
    if not refs:
        return
    record = {
        "refs": [{"what": r.what, "ref": r.ref} for r in refs],
        "fingerprint": _fingerprint(Path(manifest), refs),
        "granted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write({str(Path(folder).resolve()): record})


def revoke(folder: str | os.PathLike[str]) -> None:
    """Forget the trust record of ``folder`` (nothing happens when there is none)."""
    _write({str(Path(folder).resolve()): None})


class TrustedCode:
    """The trust methods of something that holds specs (a run folder, a checkpoint file): it names its
    :meth:`code_refs`, is keyed by ``_trust_key`` with manifest ``_manifest``, and is called ``_kind``;
    ``_given_refs`` are references the caller passed in this process (theirs, trusted)."""

    # provided by the class (Run, CheckpointFile): declared here, never defined here
    _kind: str
    _trust_key: Path
    _manifest: Path
    code_refs: Callable[[], list[CodeRef]]
    _given_refs: frozenset[str] = frozenset()

    def untrusted_refs(self) -> list[CodeRef]:
        """The code named here that is not trusted (empty: nothing to trust, or trusted)."""
        allowed = trusted_refs(self._trust_key, self._manifest) | self._given_refs
        return [r for r in self.code_refs() if r.ref not in allowed]

    def trust(self) -> list[CodeRef]:
        """Trust the code named here now (a record in the user's trust file); returns it."""
        refs = [r for r in self.code_refs() if r.ref not in self._given_refs]
        grant(self._trust_key, self._manifest, refs)
        return refs

    def code_scope(self, allow: Iterable[str] = ()) -> AbstractContextManager[CodePolicy]:
        """A :func:`~dynascope.datasets.factory.code_policy` for these specs: only trusted code, the
        caller's own references and ``allow`` (references given in this process) are imported in it."""
        allowed = trusted_refs(self._trust_key, self._manifest) | self._given_refs | set(allow)
        how = TRUST_HINT.format(path=shlex.quote(str(self._trust_key)))
        return code_policy(f"{self._kind} '{self._trust_key}'", allowed, how)
