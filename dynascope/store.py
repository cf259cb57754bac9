"""Result store: a SQLite cache of probe results inside a run folder.

Each row is keyed by ``sha256(probe, checkpoint hash, parameters)``; :mod:`dynascope.runner` puts
everything that determines a result into the parameters (checkpoint sha256s, resolved model and data
specs, split, sample count, loss, probe parameters, dtype, device class, probe version), so a cached row
is returned only for the same inputs, and a probe is never recomputed for them. Rows hold the result's
``to_dict()`` JSON and the name of its Result class, so it comes back as the same object.
Writes are single transactions (SQLite's journal makes them atomic: a killed process leaves
the previous state intact). Usable from the app, the CLI and notebooks alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynascope.probes.results import Result, to_jsonable

STORE_FILENAME = "results.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    probe TEXT NOT NULL,
    checkpoint_hash TEXT NOT NULL,
    step INTEGER,
    params TEXT NOT NULL,
    result_type TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_probe ON results (probe, step);
"""


def result_key(probe: str, checkpoint_hash: str, params: dict[str, Any]) -> str:
    """Stable cache key: sha256 of the canonical JSON of (probe, checkpoint hash, parameters)."""
    blob = json.dumps(
        {"probe": probe, "checkpoint": checkpoint_hash, "params": to_jsonable(params)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StoredResult:
    """One cached row: what was computed, for which checkpoint, and the result itself."""

    probe: str
    checkpoint_hash: str
    step: int | None
    params: dict[str, Any]
    result: Result | dict[str, Any]
    created: float


def _find_result_class(name: str) -> type[Result] | None:
    """The imported Result subclass called ``name``, or that was called so (``former_names``: rows stored
    before a rename still decode)."""
    stack = list(Result.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls.__name__ == name or name in cls.former_names:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def _result_class(name: str) -> type[Result] | None:
    """Find a Result subclass by name: among those imported, else after importing the probe module
    that exports it (``dynascope.probes._EXPORTS``), else after importing every probe module."""
    cls = _find_result_class(name)
    if cls is not None or name == "dict":
        return cls
    import importlib

    from dynascope import probes

    exports: dict[str, str] = getattr(probes, "_EXPORTS", {})
    modules = [exports[name]] if name in exports else sorted(set(exports.values()))
    for module in modules:
        try:
            importlib.import_module(f"dynascope.probes.{module}")
        except ImportError:
            continue
        cls = _find_result_class(name)
        if cls is not None:
            return cls
    return None


class ResultStore:
    """SQLite-backed cache of probe results (``<run folder>/results.sqlite`` by default)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / STORE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        new = not path.exists()
        try:
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if new:  # never leave an empty or half-made store behind (a full disk, a read-only folder)
                for leftover in (path, path.with_name(path.name + "-journal")):
                    leftover.unlink(missing_ok=True)
                raise OSError(f"creating the result store '{path}' failed (SQLite: {exc})") from exc
            raise ValueError(f"{path} is not a dynascope result store (SQLite said: {exc})") from exc

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """SQLite's write failures (a full disk, a read-only file) as an ``OSError`` naming the store."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise OSError(f"{what} in '{self.path}' failed (SQLite: {exc})") from exc

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30)
        try:
            with con:  # one transaction: commit on success, roll back on error
                yield con
        finally:
            con.close()

    def get(self, probe: str, checkpoint_hash: str, params: dict[str, Any]) -> StoredResult | None:
        """The cached result, or ``None``."""
        with self._connect() as con:
            row = con.execute(
                "SELECT probe, checkpoint_hash, step, params, result_type, result, created "
                "FROM results WHERE key = ?",
                (result_key(probe, checkpoint_hash, params),),
            ).fetchone()
        return None if row is None else self._decode(row)

    def put(
        self,
        probe: str,
        checkpoint_hash: str,
        params: dict[str, Any],
        result: Result | dict[str, Any],
        *,
        step: int | None = None,
    ) -> str:
        """Store (or replace) a result; returns its key."""
        if isinstance(result, Result):
            rtype, payload = type(result).__name__, result.to_dict()
        else:
            rtype, payload = "dict", to_jsonable(result)
        key = result_key(probe, checkpoint_hash, params)
        with self._writing(f"storing the {probe} result"), self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    probe,
                    checkpoint_hash,
                    step,
                    json.dumps(to_jsonable(params), sort_keys=True),
                    rtype,
                    json.dumps(payload),
                    time.time(),
                ),
            )
        return key

    def get_or_compute(
        self,
        probe: str,
        checkpoint_hash: str,
        params: dict[str, Any],
        compute: Callable[[], Result | dict[str, Any]],
        *,
        step: int | None = None,
        recompute: bool = False,
        write: bool = True,
    ) -> tuple[Result | dict[str, Any], bool]:
        """``(result, was_cached)``: the cached result, or ``compute()`` stored (unless ``write=False``)
        then returned; ``recompute`` skips the lookup. :mod:`dynascope.runner` calls it with the full key."""
        if not recompute:
            hit = self.get(probe, checkpoint_hash, params)
            if hit is not None:
                return hit.result, True
        result = compute()
        if write:
            self.put(probe, checkpoint_hash, params, result, step=step)
        return result, False

    def list(self, probe: str | None = None) -> list[StoredResult]:
        """All stored results (of one probe), ordered by step then time."""
        sql = "SELECT probe, checkpoint_hash, step, params, result_type, result, created FROM results"
        args: tuple[Any, ...] = ()
        if probe is not None:
            sql += " WHERE probe = ?"
            args = (probe,)
        with self._connect() as con:
            rows = con.execute(sql + " ORDER BY step, created", args).fetchall()
        return [self._decode(r) for r in rows]

    def catalogue(self, probe: str | None = None):  # -> pandas.DataFrame
        """What the store holds, one row per stored result: ``probe, step, checkpoint_hash, setting,
        created`` (``setting``: :func:`dynascope.trajectories.setting_id` of its parameters). The values
        themselves are read as trajectories (:mod:`dynascope.trajectories`), one tidy table per setting."""
        import pandas as pd

        from .trajectories import setting_id

        rows = [
            {"probe": s.probe, "step": s.step, "checkpoint_hash": s.checkpoint_hash,
             "setting": setting_id(s.params), "created": s.created}
            for s in self.list(probe)
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=["probe", "step", "checkpoint_hash", "setting", "created"])

    def delete(self, probe: str | None = None) -> int:
        """Remove stored results (of one probe, or all); returns how many."""
        with self._connect() as con:
            if probe is None:
                cur = con.execute("DELETE FROM results")
            else:
                cur = con.execute("DELETE FROM results WHERE probe = ?", (probe,))
            return cur.rowcount

    @staticmethod
    def _decode(row: tuple) -> StoredResult:
        probe, chash, step, params, rtype, payload, created = row
        data = json.loads(payload)
        cls = _result_class(rtype)
        result: Result | dict[str, Any] = cls.from_dict(data) if cls is not None else data
        return StoredResult(probe, chash, step, json.loads(params), result, created)
