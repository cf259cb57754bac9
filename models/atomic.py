"""Atomic file writes: write to a hidden temp file in the target folder, fsync, then ``os.replace``.

Readers therefore see either the old file or the complete new one, never a partial write, and a
failed write leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "dir_lock", "remove_orphans"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:  # e.g. a full disk: say which write failed
            raise OSError(exc.errno, f"writing '{path}' failed: {exc.strerror}") from exc
        raise
    return path


#: What :func:`atomic_write` leaves behind when its process is killed mid-write.
ORPHAN_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_orphans(folder: str | os.PathLike[str], min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` in ``folder`` left by a killed writer (those
    older than ``min_age_s``, so that a write in progress elsewhere is left alone); returns them."""
    now, removed = time.time(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if e.is_file(follow_symlinks=False) and ORPHAN_PATTERN.match(e.name):
            with contextlib.suppress(OSError):
                if now - e.stat().st_mtime >= min_age_s:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock (``flock``) on a folder, serialising writers across processes.

    No lock file is created; on platforms without ``fcntl`` this is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
