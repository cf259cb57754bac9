"""A process-wide index of each run's ``checkpoints/`` folder: the listing and every safetensors header are
read once, and read again only where the folder or a file changed.

Validation, per lookup: the folder's ``(inode, mtime)`` decides whether the listing is current (adding,
removing or renaming a file changes the folder's mtime); a file's ``(inode, size, mtime)`` decides whether
its cached header is (an atomic replace gives a new inode, an in-place rewrite a new mtime). A file system
stamps mtimes with a coarse clock (a tick to seconds), so a change made within the tick of a scan may leave
the stamp as it was: a folder stamped within :data:`RACY_NS` of the scan that saw it is listed again on the
next lookup (the "racy" rule of git's index). ``checkpoint(step)`` stats the folder and one file;
``checkpoints()`` stats the folder and every file; a header is read only for a new or changed file.
Not seen: a file rewritten in place to the same size within one mtime tick of the write before it (dynascope
writes checkpoints by atomic replace, so each write has a new inode).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoints import checkpoint_counter, read_safetensors_metadata

__all__ = ["CheckpointIndex", "checkpoint_index", "clear_run_indexes", "RACY_NS"]

#: A folder whose mtime is this close to the scan that listed it is listed again on the next lookup.
RACY_NS = 2_000_000_000
MAX_INDEXES = 256

FileKey = tuple[int, int, int]


def _file_key(st: os.stat_result) -> FileKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class CheckpointIndex:
    """The ``step_<n>.safetensors`` files of one folder, each with its decoded header.

    ``make(step, epoch, path, metadata)`` builds the record a lookup returns (``CheckpointInfo``)."""

    def __init__(self, directory: Path, pattern: Any, make: Callable[..., Any]) -> None:
        self.directory = directory
        self._pattern = pattern
        self._make = make
        self._lock = threading.Lock()
        self._dir_key: tuple[int, int] | None = None
        self._trusted = False  # the listing may be reused without listing the folder again
        self._names: dict[int, str] = {}  # step -> file name
        self._entries: dict[str, tuple[FileKey, Any]] = {}  # file name -> (file key, record)

    def _dir_stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_ino, st.st_mtime_ns) if stat.S_ISDIR(st.st_mode) else None

    def _record(self, name: str, step: int, key: FileKey) -> Any:
        """The cached record of ``name`` if its key is unchanged, else its header read again."""
        held = self._entries.get(name)
        if held is not None and held[0] == key:
            return held[1]
        path = self.directory / name
        meta = read_safetensors_metadata(path)
        epoch = checkpoint_counter(meta.get("epoch"), "epoch", path)  # CheckpointError if NaN/Inf/huge
        record = self._make(step=step, epoch=epoch, path=path, metadata=meta)
        self._entries[name] = (key, record)
        return record

    def _scan(self, dir_key: tuple[int, int]) -> list[Any]:
        """List the folder; records of every checkpoint file by step."""
        scanned = time.time_ns()
        names: dict[int, str] = {}
        records = []
        with os.scandir(self.directory) as it:
            for entry in it:
                m = self._pattern.match(entry.name)
                if not m:
                    continue
                try:
                    key = _file_key(entry.stat())
                except FileNotFoundError:  # removed while listing
                    continue
                step = int(m.group(1))
                records.append(self._record(entry.name, step, key))
                names[step] = entry.name
        self._entries = {n: self._entries[n] for n in names.values()}
        self._names = names
        self._dir_key = dir_key
        self._trusted = scanned - dir_key[1] > RACY_NS
        return records

    def _current_listing(self) -> tuple[int, int] | None:
        """The folder's key, after dropping a listing that may be stale; None when there is no folder."""
        dir_key = self._dir_stat()
        if dir_key is None:
            self._dir_key, self._trusted, self._names, self._entries = None, False, {}, {}
        elif dir_key != self._dir_key:
            self._trusted = False
        return dir_key

    def records(self) -> list[Any]:
        """Every checkpoint file's record (unsorted); headers read only for new or changed files."""
        with self._lock:
            dir_key = self._current_listing()
            if dir_key is None:
                return []
            if not self._trusted:
                return self._scan(dir_key)
            out = []
            for step, name in list(self._names.items()):
                try:
                    key = _file_key(os.stat(self.directory / name))
                except FileNotFoundError:
                    return self._scan(dir_key)
                out.append(self._record(name, step, key))
            return out

    def get(self, step: int) -> Any | None:
        """The record of ``step``, or None when the folder holds no such file."""
        with self._lock:
            dir_key = self._current_listing()
            if dir_key is None:
                return None
            if self._trusted:
                name = self._names.get(step)
                if name is None:
                    return None
                try:
                    return self._record(name, step, _file_key(os.stat(self.directory / name)))
                except FileNotFoundError:
                    pass
            for record in self._scan(dir_key):
                if record.step == step:
                    return record
            return None


_INDEXES: OrderedDict[tuple[str, str, str], CheckpointIndex] = OrderedDict()
_INDEXES_LOCK = threading.Lock()


def checkpoint_index(directory: Path, pattern: Any, make: Callable[..., Any]) -> CheckpointIndex:
    """This process's index of ``directory`` (by its spelling, made absolute; the records' paths keep the
    spelling; the least recently used of more than :data:`MAX_INDEXES` folders is forgotten)."""
    directory = Path(directory)
    key = (str(directory), "" if directory.is_absolute() else os.getcwd(), pattern.pattern)
    with _INDEXES_LOCK:
        index = _INDEXES.get(key)
        if index is None:
            index = _INDEXES[key] = CheckpointIndex(directory, pattern, make)
        _INDEXES.move_to_end(key)
        while len(_INDEXES) > MAX_INDEXES:
            _INDEXES.popitem(last=False)
        return index


def clear_run_indexes() -> None:
    """Forget every folder's index (benchmarks measure a cold process with it)."""
    with _INDEXES_LOCK:
        _INDEXES.clear()
