"""``torch.load`` of files that may be damaged or hostile: every failure a :class:`CheckpointError`.

- Reads go through :class:`_BoundedReader` (a file object, never the path, so ``*.safetensors`` names
  are not handed to the safetensors library; no read asks for more bytes than the file has left).
- An allow-list: unpickling runs with ``weights_only=True``, so the only globals it can call are torch's
  weights-only set and the ``safe_globals`` the caller names; any other global is refused, naming it. A
  name on :data:`DENIED_GLOBALS` (code execution, system or file access) is refused even when named.
- Integrity torch does not check: every zip record's CRC-32, every loaded zip storage equal to a data
  record (size and CRC-32), a legacy file read to its last byte (its storage index covers the data).
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import os
import pickle
import pickletools
import re
import sys
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint_errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .checkpoint_errors import short as _short

__all__ = ["DENIED_GLOBALS", "torch_load"]


class _BoundedReader:
    """A read-only file whose ``read(n)`` never asks for more bytes than the file has left.

    A damaged length field (a string of 2**32 bytes in a legacy pickle) then yields a short read and a
    parse error instead of a multi-GB allocation. Passing a file object (not a path) to ``torch.load``
    also keeps it from handing ``*.safetensors`` paths to the safetensors library.
    """

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        self._size = os.fstat(self._f.fileno()).st_size
        self.name = str(path)

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self._f.read()
        return self._f.read(min(n, max(self._size - self._f.tell(), 0)))

    def readinto(self, buf: Any) -> int:
        return self._f.readinto(buf)

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(limit)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def __enter__(self) -> _BoundedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


# Globals that no flag allowlists: code execution, process/file/system access, module import and
# attribute access, and nested unpicklers. An entry denies the name itself and everything under it.
DENIED_GLOBALS: frozenset[str] = frozenset(
    {
        *(
            f"builtins.{n}"
            for n in (
                "exec", "eval", "compile", "__import__", "open", "getattr", "setattr", "delattr",
                "globals", "locals", "vars", "breakpoint", "input", "__build_class__", "__loader__",
                "memoryview", "exit", "quit", "help",
            )
        ),
        "os", "posix", "nt", "_posixsubprocess", "subprocess", "pty", "shutil", "sys", "socket",
        "_socket", "ssl", "select", "signal", "importlib", "_imp", "imp", "runpy", "pkgutil", "code",
        "codeop", "ctypes", "_ctypes", "multiprocessing", "threading", "_thread", "asyncio",
        "pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib",
        "pdb", "bdb", "webbrowser", "urllib", "http", "ftplib", "smtplib", "telnetlib", "tempfile",
        "glob", "io", "_io", "fileinput", "zipimport", "tarfile", "zipfile", "inspect", "gc",
        "platform", "sysconfig", "site", "types.FunctionType", "types.LambdaType", "types.CodeType",
        "types.ModuleType", "types.MethodType", "types.BuiltinFunctionType", "operator.attrgetter",
        "operator.methodcaller", "torch.load", "torch.hub", "torch.jit", "torch.package", "torch.ops",
        "torch.utils.cpp_extension", "torch.serialization", "torch.classes", "numpy.load",
        "numpy.testing", "numpy.f2py", "numpy.ctypeslib", "pandas.read_pickle", "yaml", "IPython",
        # methods of path classes (writing, deleting); the classes themselves are common in hparams
        "pathlib.Path.", "pathlib.PosixPath.", "pathlib.WindowsPath.", "pathlib.PurePath.",
        "pathlib.PurePosixPath.",
    }
)  # fmt: skip
# Python 2 module names that protocol-2 pickles use (``commands`` is ``subprocess``, ``__builtin__``
# is ``builtins``); the unpickler maps them back, so the deny-list must too.
_MODULE_ALIASES = {**_compat_pickle.IMPORT_MAPPING, "exceptions": "builtins"}


def _denied(name: str) -> bool:
    """Whether ``module.qualname`` is on (or under) :data:`DENIED_GLOBALS`; dunder attributes always are.

    An entry denies itself and every name below it; an entry ending in ``.`` only the names below it.
    """
    parts = _canonical(name).split(".")
    if any(p.startswith("__") and p.endswith("__") for p in parts[1:]):
        return True
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p in DENIED_GLOBALS or (i < len(parts) - 1 and p + "." in DENIED_GLOBALS)
               for i, p in enumerate(prefixes))  # fmt: skip


def _resolved_name(obj: Any) -> str:
    if isinstance(obj, type(os)):
        return obj.__name__
    mod = getattr(obj, "__module__", None) or ""
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or ""
    return f"{mod}.{qual}" if mod and qual else ""


def _canonical(name: str) -> str:
    """``name`` with a Python 2 module name mapped to today's (``commands.call`` → ``subprocess.call``)."""
    head, _, rest = name.partition(".")
    return ".".join(filter(None, [_MODULE_ALIASES.get(head, head), rest]))


def _check_denied(names: list[str], path: Path) -> None:
    denied = [n if _canonical(n) == n else f"{n} (= {_canonical(n)})" for n in names if _denied(n)]
    if denied:
        raise _denied_error(path, denied)


def _denied_error(path: Path, denied: list[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        path,
        f"refused: unpickling it needs {', '.join(denied)}, which dynascope never allows (code "
        "execution, system or file access); neither allow_unsafe=True nor allow_unsafe='pickle' "
        "lifts this. Re-save the weights as a plain state_dict or safetensors file",
        denied,
    )


def _resolve_global(name: str) -> Any:
    """Import ``module.qualname`` (longest importable module prefix) without reading the file."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise ImportError(name)


def _unsafe_message(globals_: list[str]) -> str:
    quoted = ", ".join(repr(g) for g in globals_)
    return (
        "refused: unpickling it needs globals outside torch's weights_only allowlist: "
        f"{', '.join(globals_)}. Unpickling can call any global a file names, so dynascope calls only those "
        f"you name: if you trust these classes, pass safe_globals=[{quoted}] (still weights_only, as "
        "torch.serialization.add_safe_globals), or re-save the weights as a plain state_dict or safetensors"
    )


def _legacy_pickles_truncated(path: Path) -> bool:
    """True if the pickles of a legacy (non-zip) torch file end early; parsed, never executed."""
    with _BoundedReader(path) as f:
        for _ in range(5):  # magic number, protocol, sys info, object, storage keys
            try:
                for _op in pickletools.genops(f):
                    pass
            except Exception:  # noqa: BLE001
                return True
    return False


_DOS_DIRECTORY = 0x10  # MS-DOS directory bit of a zip entry's external file attributes


def _check_zip_records(path: Path) -> set[tuple[int, int]] | None:
    """Verify every record's CRC-32 (torch's reader ignores them, so flipped weight bytes load silently)
    and refuse a file record marked as a directory (torch's reader skips it, leaving its tensor unfilled).

    Returns the ``(size, CRC-32)`` of the tensor data records (``<archive>/data/<key>``), for
    :func:`_check_zip_storages`; ``None`` when the file's byte order is not this machine's (torch then
    byte-swaps the loaded data).
    """
    records: set[tuple[int, int]] = set()
    native = True
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise zipfile.BadZipFile(f"record {info.filename!r}: compression {info.compress_type}")
                if info.external_attr & _DOS_DIRECTORY and not info.is_dir():
                    # torch's reader (miniz) skips a record so marked: its tensor is left unfilled
                    raise zipfile.BadZipFile(f"record {info.filename!r} is marked as a directory")
                with z.open(info) as f:
                    head = f.read(1 << 22)
                    while f.read(1 << 22):
                        pass
                parts = info.filename.split("/")
                if len(parts) == 3 and parts[1] == "data":
                    records.add((info.file_size, info.CRC))
                elif parts[-1] == "byteorder":
                    native = head.decode("ascii", "replace").strip() == sys.byteorder
    except Exception as e:  # noqa: BLE001 - BadZipFile (bad CRC, names differ), zlib.error, OSError, ...
        raise _corrupt(path, e) from None
    return records if native else None


def _tensors_in(obj: Any, depth: int = 0) -> Any:
    """The tensors in a loaded object (dicts, lists, tuples, modules, plain objects' attributes)."""
    if depth > 32:
        return
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (torch.UntypedStorage, torch.TypedStorage)):  # a storage saved on its own
        untyped = obj if isinstance(obj, torch.UntypedStorage) else obj._untyped_storage
        yield torch.empty(0, dtype=torch.uint8, device=untyped.device).set_(untyped)
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _tensors_in(vars(obj), depth + 1)


def _check_zip_storages(
    obj: Any, records: set[tuple[int, int]] | None, path: Path, *, every_record: bool = False
) -> None:
    """Each loaded storage of a data record's size must equal such a record (same CRC-32); with
    ``every_record``, each non-empty data record must also be some loaded storage.

    torch's zip reader can hand back a storage it never filled (a damaged central-directory field it
    does not use for reading): uninitialised memory, different on every load. torch.save writes no
    record that no tensor uses, so an unused record means the pickle's storage keys were damaged
    (a tensor then shows another tensor's values). ``every_record`` is for plain ``weights_only``
    loads, where every tensor of the file is reachable in the loaded object.
    """
    if records is None:
        return
    sizes = {n for n, _ in records}
    seen: set[tuple[int, int]] = set()
    used: set[tuple[int, int]] = set()
    for t in _tensors_in(obj):
        if t.layout != torch.strided or t.is_meta or t.device.type != "cpu" or t.is_quantized:
            every_record = False  # its data is not a plain storage; refused later by _check_tensor_kinds
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        if storage.nbytes() not in sizes:
            continue  # not read from a record (e.g. rebuilt from a pickled numpy array)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        found = (storage.nbytes(), zlib.crc32(raw))
        if found not in records:
            raise CorruptCheckpointError(
                path,
                f"is corrupt: a tensor's data ({storage.nbytes()} bytes) matches none of the file's data "
                "records (CRC-32): damaged zip index, the loaded values would be garbage",
            )
        used.add(found)
    unused = {r for r in records if r[0] > 0} - used
    if every_record and unused:
        raise CorruptCheckpointError(
            path,
            f"is corrupt: {len(unused)} data record(s) used by no tensor (damaged storage keys in the "
            "pickle: some tensor would show another tensor's values)",
        )


def _check_consumed(f: _BoundedReader, path: Path) -> None:
    """Refuse a legacy file with bytes left after ``torch.load`` read it.

    A legacy file is read front to back: pickles, then each storage its index lists. Bytes left over
    mean the index lost entries, and the tensors of those storages were never filled (garbage).
    """
    end = f.tell()
    f.seek(0)
    if f.read(1) == b"\x80" and end != f._size:
        raise CorruptCheckpointError(
            path,
            f"is corrupt: a legacy torch file whose storage index does not cover its data ({f._size - end} "
            "bytes never read); some tensors would hold uninitialised memory",
        )


def _corrupt(path: Path, e: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(path, f"is corrupt or truncated ({_short(e)})")


def _named_globals(safe_globals: Sequence[str | Any], path: Path) -> list[Any]:
    """The objects the caller allows by name (``"module.qualname"``) or as objects; denied ones refused."""
    out = []
    for g in safe_globals:
        name = g if isinstance(g, str) else _resolved_name(g)
        if not name or _denied(name):
            raise _denied_error(path, [str(name or g)])
        try:
            obj = _resolve_global(g) if isinstance(g, str) else g
        except Exception:  # noqa: BLE001 - ImportError, or an import that fails on its own
            raise ValueError(f"safe_globals: {g!r} cannot be imported (expected 'module.qualname')") from None
        resolved = _resolved_name(obj)
        if resolved and _denied(resolved):
            raise _denied_error(path, [f"{name} (= {resolved})"])
        out.append(obj)
    return out


def _needed_globals(path: Path, e: BaseException) -> list[str]:
    """The globals a refused weights-only load needs (all of a zip file's; a legacy file's first one)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy format: parse the refused global from the message
        if _legacy_pickles_truncated(path):  # a cut-off GLOBAL name is damage, not a class
            raise CorruptCheckpointError(path, "is corrupt or truncated (pickle stream ends early)") from None
        names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
    names = names or re.findall(r"GLOBAL ([\w.]+)", str(e))
    return [n if "." in n else f"builtins.{n}" for n in names]  # torch drops 'builtins.'


def torch_load(path: Path, safe_globals: Sequence[str | Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` of a file object (never the path), every failure a
    :class:`CheckpointError`. The only globals unpickling may call are torch's weights-only allowlist and
    ``safe_globals`` (names or objects the caller trusts); anything else is refused, naming it."""
    with open(path, "rb") as f:
        records = _check_zip_records(path) if f.read(4) == b"PK\x03\x04" else None
    allowed = _named_globals(safe_globals, path)
    try:
        with torch.serialization.safe_globals(allowed), _BoundedReader(path) as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            _check_consumed(f, path)
        _check_zip_storages(obj, records, path, every_record=not allowed)
        return obj
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _corrupt(path, e) from None
        names = _needed_globals(path, e)
        if not names:
            raise UnsafeCheckpointError(path, _unsafe_message(["<unknown>"]) + f" ({_short(e)})") from None
        _check_denied(names, path)
        raise UnsafeCheckpointError(path, _unsafe_message(names), names) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - RuntimeError, AssertionError, struct.error, MemoryError...
        raise _corrupt(path, e) from None
