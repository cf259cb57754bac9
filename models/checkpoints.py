"""Checkpoint I/O: save and safely load model weights in PyTorch, safetensors and Lightning formats.

Formats (``format=`` on save, detected from the file's content on load, suffix as a hint):

- ``"torch"`` (``.pt``/``.pth``/``.bin``): ``torch.save`` of a state_dict; with metadata, of
  ``{"state_dict": ..., "dynascope_metadata": <JSON str>}``. Loaded with ``weights_only=True``.
- ``"safetensors"`` (``.safetensors``): tensors plus str→str metadata; ours is JSON under key ``"dynascope"``.
- ``"lightning"`` (``.ckpt``): ``{"state_dict": {"model.<key>": ...}, "epoch", "global_step", ...}``.

Loading strips DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes, unwraps nested
``{"state_dict" | "model_state_dict" | "model" | ...: ...}`` dicts, strips a Lightning attribute
prefix (``model.``/``net.``...) when that makes the keys fit, checks weights are finite and reports
missing / unexpected / mis-shaped keys by name. Every failure is a :class:`CheckpointError`
(a ``ValueError``) whose message names the file and whose ``.kind`` says what went wrong.

Unsafe pickles: a torch file whose unpickling needs globals beyond the ``weights_only``
allowlist is refused, naming those globals. ``allow_unsafe=True`` allowlists those named globals
(importing them by name, via ``torch.serialization.safe_globals``) and still loads with
``weights_only=True``, so only the named globals can be called; ``allow_unsafe="pickle"`` is the last
resort (``weights_only=False``: unpickling can execute arbitrary code) and warns loudly. Under both
flags a deny-list that no flag lifts (:data:`DENIED_GLOBALS`: ``exec``/``eval``/``compile``/
``__import__``/``getattr``, ``os``/``posix``/``subprocess``/``importlib``/``runpy``/``shutil``/``sys``/
``socket``/``ctypes``, pickle/marshal loaders, ...) refuses the file before such a global is even
imported. The deny-list stops the known gadgets, it cannot make an untrusted pickle safe: with
``allow_unsafe="pickle"`` only load files you trust.

Before any tensor is used, sparse, meta-device, quantized and other non-strided tensors are refused,
``step``/``global_step``/``epoch`` metadata must be integers in [0, 2**63), and (with a model) each
tensor's dtype must be of the parameter's kind (floating into floating, integer into integer, bool into
bool). Format sniffing checks safetensors by its structure (u64 header length, then a JSON header
that parses and fits in the file) before zip and pickle magic, because a header length of 640, 896,
1152 or 1408 bytes starts with the bytes of a pickle protocol opcode.
"""

from __future__ import annotations

import _compat_pickle
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .registry import CONFIG_ATTR, _unwrap

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "LoadedCheckpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "EmptyCheckpointError",
    "CorruptCheckpointError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
    "NoStateDictError",
    "StateDictMismatchError",
    "NonFiniteWeightsError",
    "UnsupportedTensorError",
    "CheckpointMetadataError",
    "DENIED_GLOBALS",
    "checkpoint_counter",
    "file_sha256",
    "read_safetensors_metadata",
]

_SUFFIX_FORMAT = {
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".safetensors": "safetensors",
    ".ckpt": "lightning",
}
_FORMAT_ALIASES = {
    "torch": "torch",
    "pt": "torch",
    "pth": "torch",
    "bin": "torch",
    "safetensors": "safetensors",
    "lightning": "lightning",
    "ckpt": "lightning",
}
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_KNOWN_ATTR_PREFIXES = ("model", "net", "network", "module", "_model")
_META_KEY_TORCH = "dynascope_metadata"
_META_KEY_SAFETENSORS = "dynascope"
_MAX_LISTED = 20


# ----------------------------------------------------------------------------------------- errors
class CheckpointError(ValueError):
    """A checkpoint could not be saved or loaded; ``.path`` is the file, ``.kind`` the reason."""

    kind = "error"

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"checkpoint '{self.path}': {detail}")

    def __reduce__(self):  # keep picklable (multiprocessing) despite the custom signature
        return (self.__class__, (self.path, self.detail))


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    kind = "not_found"


class EmptyCheckpointError(CheckpointError):
    kind = "empty"


class CorruptCheckpointError(CheckpointError):
    """Truncated or damaged file of a recognised format, or garbage under a checkpoint suffix."""

    kind = "corrupt"


class UnknownFormatError(CheckpointError):
    kind = "unknown_format"


class UnsafeCheckpointError(CheckpointError):
    """The file needs unpickling code outside the ``weights_only`` allowlist; ``.globals`` names it."""

    kind = "unsafe"

    def __init__(self, path: str | os.PathLike[str], detail: str, globals_: list[str] | None = None) -> None:
        self.globals = list(globals_ or [])
        super().__init__(path, detail)

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail, self.globals))


class NoStateDictError(CheckpointError):
    kind = "no_state_dict"


class StateDictMismatchError(CheckpointError):
    """Keys do not fit the model.

    ``.missing``/``.unexpected``: key names; ``.mismatched``: (name, checkpoint shape, model shape).
    """

    kind = "mismatch"

    def __init__(
        self,
        path: str | os.PathLike[str],
        detail: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        super().__init__(path, detail)

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail, self.missing, self.unexpected, self.mismatched))


class NonFiniteWeightsError(CheckpointError):
    """Some floating tensors contain NaN/Inf; ``.tensors`` lists their names."""

    kind = "nonfinite"

    def __init__(self, path: str | os.PathLike[str], detail: str, tensors: list[str] | None = None) -> None:
        self.tensors = list(tensors or [])
        super().__init__(path, detail)

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail, self.tensors))


class UnsupportedTensorError(CheckpointError):
    """Sparse, meta-device, quantized or otherwise non-strided tensors: refused before they are read."""

    kind = "unsupported_tensor"


class CheckpointMetadataError(CheckpointError):
    """Metadata that cannot be right (a step or epoch that is NaN, negative, fractional or >= 2**63)."""

    kind = "metadata"


# ----------------------------------------------------------------------------------------- result
@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` found: the (prefix-stripped) state_dict, metadata and provenance.

    ``sha256`` is the hex digest of the file's bytes. ``model`` is the model passed in, with the
    weights loaded; ``missing_keys``/``unexpected_keys`` are only non-empty with ``strict=False``.
    """

    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]
    format: str
    path: Path
    sha256: str
    model: nn.Module | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    stripped_prefixes: list[str] = field(default_factory=list)

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The dynascope model config stored with the checkpoint, if any."""
        cfg = self.metadata.get("model_config")
        return dict(cfg) if isinstance(cfg, Mapping) else None

    @property
    def step(self) -> int | None:
        """``step`` (or Lightning's ``global_step``) metadata, validated at load time."""
        key = "step" if "step" in self.metadata else "global_step"
        return checkpoint_counter(self.metadata.get(key), key, self.path)

    @property
    def epoch(self) -> int | None:
        return checkpoint_counter(self.metadata.get("epoch"), "epoch", self.path)


# ----------------------------------------------------------------------------------------- helpers
def _json_value(value: Any, where: str) -> Any:
    """JSON-able copy of metadata: tuples→lists, 0-d tensors/numpy scalars→Python (NaN allowed)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _json_value(value.item(), where)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value {where}={value!r} (type {type(value).__name__}) is not JSON-able")


_COUNTER_KEYS = ("step", "global_step", "epoch")
_COUNTER_LIMIT = 2**63  # the result store and JSON consumers keep steps as signed 64-bit integers


def checkpoint_counter(value: Any, key: str, path: str | os.PathLike[str] = "<metadata>") -> int | None:
    """A step/epoch counter as an ``int`` in [0, 2**63), ``None`` when absent or not numeric.

    Numbers (and integral floats such as ``100.0``) that are NaN, infinite, fractional, negative or
    >= 2**63, and booleans, raise :class:`CheckpointMetadataError` naming ``key``.
    """
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / 0-d tensor scalar
            return checkpoint_counter(value.item(), key, path)
        if isinstance(value, bool):
            raise CheckpointMetadataError(path, f"metadata {key!r} is a boolean ({value}), not an integer")
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise CheckpointMetadataError(
                path, f"metadata {key!r} = {value!r} is not an integer (NaN, infinite or fractional)"
            )
        value = int(value)
    if not 0 <= value < _COUNTER_LIMIT:
        raise CheckpointMetadataError(path, f"metadata {key!r} = {value} is outside [0, 2**63)")
    return int(value)


def _check_counters(meta: Mapping[str, Any], path: Path) -> None:
    for key in _COUNTER_KEYS:
        if key in meta:
            checkpoint_counter(meta[key], key, path)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, streamed.

    Memoised on (path, inode, size, mtime): the app and the runner ask for the same checkpoint's hash
    on every page rerun, and an atomically replaced or rewritten file changes at least one of these.
    """
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _as_state_dict(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = dict(model_or_state)
    else:
        raise TypeError(f"expected an nn.Module or a state_dict mapping, got {type(model_or_state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"state_dict entries must map str to Tensor; offending keys: {_listing(bad)}")
    if not state:
        raise ValueError("refusing to save an empty state_dict")
    # Detached, contiguous CPU tensors; tensors sharing storage (tied weights) are cloned so
    # safetensors accepts them (loading copies the values into every tied parameter anyway).
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and (ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


# ----------------------------------------------------------------------------------------- save
def save_checkpoint(
    model_or_state: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file in the same folder + ``os.replace``).

    ``format`` defaults from the suffix (.pt/.pth/.bin → torch, .safetensors, .ckpt → lightning).
    ``metadata`` must be JSON-able; a model built by ``dynascope.models.build`` adds its
    ``model_config`` automatically. For lightning, ``metadata["epoch"]`` and
    ``metadata["global_step"]`` (or ``"step"``) fill the top-level fields (default 0).
    """
    path = Path(path)
    if format is None:
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"cannot infer checkpoint format from suffix of '{path}'; use one of "
                f"{sorted(_SUFFIX_FORMAT)} or pass format= ('torch', 'safetensors', 'lightning')"
            )
    else:
        fmt = _FORMAT_ALIASES.get(str(format).lower())
        if fmt is None:
            raise ValueError(
                f"unknown checkpoint format {format!r}; use 'torch', 'safetensors' or 'lightning'"
            )
    state = _as_state_dict(model_or_state)
    meta: dict[str, Any] = dict(metadata or {})
    cfg = (
        getattr(_unwrap(model_or_state), CONFIG_ATTR, None) if isinstance(model_or_state, nn.Module) else None
    )
    if cfg is not None and "model_config" not in meta:
        meta["model_config"] = cfg
    meta = _json_value(meta, "metadata")
    _check_counters(meta, path)
    meta_json = json.dumps(meta, sort_keys=True)

    if fmt == "safetensors":
        from safetensors.torch import save_file

        header = {"format": "pt", _META_KEY_SAFETENSORS: meta_json}

        def write(tmp: str) -> None:
            save_file(state, tmp, metadata=header)

    elif fmt == "torch":
        obj: Any = {"state_dict": state, _META_KEY_TORCH: meta_json} if meta else state

        def write(tmp: str) -> None:
            torch.save(obj, tmp)

    else:  # lightning
        step = meta.get("global_step", meta.get("step", 0))
        obj = {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "epoch": int(meta.get("epoch") or 0),
            "global_step": int(step or 0),
            _META_KEY_TORCH: meta_json,
        }

        def write(tmp: str) -> None:
            torch.save(obj, tmp)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------- load
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit


def _sniff(path: Path) -> str | None:
    """Format from the content.

    safetensors first, by structure: a u64 little-endian header length n with 2 <= n <= size - 8, then
    n bytes that parse as a JSON object. (n = 640, 896, 1152 or 1408 starts with ``0x80 0x02..0x05``,
    a pickle protocol opcode, so this must come before the pickle check.) Then zip (``PK\x03\x04``) or
    a legacy pickle (``0x80`` + protocol 2..5) → torch; a damaged safetensors file whose header still
    starts with ``{`` → safetensors (reported as corrupt by the reader).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) >= 9 and head[8:9] == b"{":
            n = int.from_bytes(head[:8], "little")
            if 2 <= n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
                f.seek(8)
                try:
                    header = json.loads(f.read(n))
                except (ValueError, RecursionError):
                    header = None
                if isinstance(header, dict):
                    return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _MAX_SAFETENSORS_HEADER:
            return "safetensors"
    return None


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


class _DeniedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)


class _DenyingUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that refuses deny-listed globals before importing them (allow_unsafe='pickle')."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if _denied(full):
            raise _DeniedGlobal(full if _canonical(full) == full else f"{full} (= {_canonical(full)})")
        obj = super().find_class(module, name)
        resolved = _resolved_name(obj)
        if resolved and _denied(resolved):
            raise _DeniedGlobal(f"{full} (= {resolved})")
        return obj


def _denying_load(file: Any, **kwargs: Any) -> Any:
    return _DenyingUnpickler(file, **kwargs).load()


_DENYING_PICKLE = type(io)("dynascope_denying_pickle")
_DENYING_PICKLE.Unpickler = _DenyingUnpickler  # type: ignore[attr-defined]
_DENYING_PICKLE.load = _denying_load  # type: ignore[attr-defined]
_DENYING_PICKLE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


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
    return (
        "refused: unpickling it needs globals outside torch's weights_only allowlist: "
        f"{', '.join(globals_)}. "
        "If you trust this file, pass allow_unsafe=True to allowlist exactly these globals (still "
        "weights_only, via torch.serialization.safe_globals), or allow_unsafe='pickle' to unpickle it "
        "fully (weights_only=False: can execute arbitrary code)"
    )


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


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


def _check_zip_records(path: Path) -> set[tuple[int, int]] | None:
    """Verify every record's CRC-32 (torch's reader ignores them, so flipped weight bytes load silently).

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


def _check_zip_storages(obj: Any, records: set[tuple[int, int]] | None, path: Path) -> None:
    """Each loaded storage must equal a data record byte for byte (same size and CRC-32).

    torch's zip reader can hand back a storage it never filled (a damaged central-directory field it
    does not use for reading): uninitialised memory, different on every load.
    """
    if records is None:
        return
    seen: set[tuple[int, int]] = set()
    for t in _tensors_in(obj):
        if t.layout != torch.strided or t.is_meta or t.device.type != "cpu" or t.is_quantized:
            continue  # refused later by _check_tensor_kinds
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        if (storage.nbytes(), zlib.crc32(raw)) not in records:
            raise CorruptCheckpointError(
                path,
                f"is corrupt: a tensor's data ({storage.nbytes()} bytes) matches none of the file's data "
                "records (CRC-32): damaged zip index, the loaded values would be garbage",
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


def _torch_load(path: Path, allow_unsafe: bool | Literal["pickle"]) -> Any:
    """``torch.load`` of a file object (never the path), every failure a :class:`CheckpointError`."""
    with open(path, "rb") as f:
        records = _check_zip_records(path) if f.read(4) == b"PK\x03\x04" else None
    if allow_unsafe == "pickle":
        warnings.warn(
            f"loading '{path}' with weights_only=False (allow_unsafe='pickle'): unpickling can execute "
            "arbitrary code; only do this for files you trust",
            UserWarning,
            stacklevel=3,
        )
        try:
            with _BoundedReader(path) as f:
                obj = torch.load(f, map_location="cpu", weights_only=False, pickle_module=_DENYING_PICKLE)
                _check_consumed(f, path)
            _check_zip_storages(obj, records, path)
            return obj
        except _DeniedGlobal as e:
            raise _denied_error(path, [e.name]) from None
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a full unpickle is a damaged/foreign file
            raise CorruptCheckpointError(path, f"could not be unpickled ({_short(e)})") from None
    if allow_unsafe not in (True, False):
        raise ValueError(f"allow_unsafe must be False, True or 'pickle', got {allow_unsafe!r}")

    allowed: list[Any] = []
    allowed_names: list[str] = []
    for _ in range(64):  # legacy (non-zip) files reveal one unsafe global per attempt
        try:
            with torch.serialization.safe_globals(allowed), _BoundedReader(path) as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
                _check_consumed(f, path)
            _check_zip_storages(obj, records, path)
            return obj
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise _corrupt(path, e) from None
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # noqa: BLE001 - legacy format: parse the refused global from the message
                if _legacy_pickles_truncated(path):  # a cut-off GLOBAL name is damage, not a class
                    raise CorruptCheckpointError(
                        path, "is corrupt or truncated (pickle stream ends early)"
                    ) from None
                names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
            names = [n for n in names if n not in allowed_names] or re.findall(r"GLOBAL ([\w.]+)", str(e))
            names = [n if "." in n else f"builtins.{n}" for n in names]  # torch drops 'builtins.'
            if not names:
                raise UnsafeCheckpointError(
                    path, _unsafe_message(["<unknown>"]) + f" ({_short(e)})"
                ) from None
            _check_denied(names, path)
            if not allow_unsafe:
                raise UnsafeCheckpointError(path, _unsafe_message(names), names) from None
            if set(names) <= set(allowed_names):
                raise UnsafeCheckpointError(
                    path,
                    f"could not be loaded even with the globals {', '.join(names)} allowlisted "
                    f"({_short(e)}); "
                    "use allow_unsafe='pickle' if you trust it",
                    names,
                ) from None
            for n in names:
                try:
                    obj = _resolve_global(n)
                except Exception:  # noqa: BLE001 - ImportError, or an import that fails on its own
                    raise UnsafeCheckpointError(
                        path,
                        f"needs the global {n}, which cannot be imported here; install the code that defines "
                        "it, or use allow_unsafe='pickle' if you trust the file",
                        names,
                    ) from None
                resolved = _resolved_name(obj)
                if resolved and _denied(resolved):
                    raise _denied_error(path, [f"{n} (= {resolved})"]) from None
                allowed.append(obj)
                allowed_names.append(n)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - RuntimeError, AssertionError, struct.error, MemoryError...
            raise _corrupt(path, e) from None
    raise UnsafeCheckpointError(path, _unsafe_message(allowed_names), allowed_names)


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _extract(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any], str | None]:
    """(state_dict, metadata, nested key used) from a torch-loaded object."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), {}, None
    if not isinstance(obj, Mapping):
        raise NoStateDictError(path, f"contains a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    if not obj:
        raise EmptyCheckpointError(path, "contains an empty dict (no tensors)")
    meta: dict[str, Any] = {}
    for k, v in obj.items():
        if k == _META_KEY_TORCH and isinstance(v, str):
            try:
                meta.update(json.loads(v))
            except json.JSONDecodeError:
                meta[k] = v
        elif isinstance(v, (int, float, str, bool)) and isinstance(k, str):
            meta[k] = v
        elif k == "hyper_parameters" and isinstance(v, Mapping):
            try:
                meta[k] = _json_value(v, k)
            except TypeError:
                pass
    if _is_tensor_dict(obj):
        return dict(obj), meta, None
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return dict(inner.state_dict()), meta, key
        if _is_tensor_dict(inner):
            return dict(inner), meta, key
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, Tensor)}
            meta["ignored_keys"] = sorted(str(k) for k in inner if k not in tensors)
            return tensors, meta, key
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if tensors:
        meta["ignored_keys"] = sorted(str(k) for k in obj if k not in tensors)
        return tensors, meta, None
    keys = _listing([str(k) for k in obj])
    raise NoStateDictError(
        path, f"no state_dict found: no tensors at the top level nor under {list(_NESTED_KEYS)}; keys: {keys}"
    )


def _strip_wrappers(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove torch.compile ``_orig_mod.`` segments anywhere and leading DDP ``module.`` prefixes."""
    stripped: list[str] = []
    if any("_orig_mod." in k for k in sd):
        sd = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in sd.items()}
        stripped.append("_orig_mod.")
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
        stripped.append("module.")
    return sd, stripped


def _common_component(keys: list[str]) -> str | None:
    if not keys or any("." not in k for k in keys):
        return None
    first = {k.split(".", 1)[0] for k in keys}
    return first.pop() if len(first) == 1 else None


def _strip_component(sd: dict[str, Tensor], comp: str) -> dict[str, Tensor]:
    n = len(comp) + 1
    return {k[n:]: v for k, v in sd.items()}


def _fit_to_model(sd: dict[str, Tensor], model_keys: set[str]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip common leading attribute names while that makes the keys fit the model better."""
    best, best_prefixes = sd, []
    best_overlap = len(set(sd) & model_keys)
    cur, prefixes = sd, []
    for _ in range(3):
        if set(cur) == model_keys:
            break
        comp = _common_component(list(cur))
        if comp is None:
            break
        cur = _strip_component(cur, comp)
        prefixes = prefixes + [comp + "."]
        overlap = len(set(cur) & model_keys)
        if overlap > best_overlap:
            best, best_prefixes, best_overlap = cur, prefixes, overlap
    return best, best_prefixes


def _check_tensor_kinds(sd: dict[str, Tensor], path: Path) -> None:
    """Refuse, before any value is read, tensors that are not dense CPU tensors with their own storage."""
    bad: list[str] = []
    for k, v in sd.items():
        if v.layout != torch.strided:
            bad.append(f"{k} (layout {str(v.layout).replace('torch.', '')})")
        elif v.is_meta or v.device.type != "cpu":
            bad.append(f"{k} (device {v.device.type}: no data)" if v.is_meta else f"{k} (device {v.device})")
        elif v.is_quantized or v.is_nested or type(v) not in (Tensor, nn.Parameter):
            bad.append(f"{k} ({'quantized' if v.is_quantized else type(v).__name__} tensor)")
        elif _self_overlapping(v):
            bad.append(f"{k} (strides {list(v.stride())} for shape {list(v.shape)} overlap)")
    if bad:
        raise UnsupportedTensorError(
            path,
            f"holds {len(bad)} tensor(s) that are not dense (strided, non-overlapping) CPU tensors: "
            f"{_listing(bad)}; "
            "only dense weights can be loaded (convert with .to_dense() / .dequantize() before saving)",
        )


def _self_overlapping(t: Tensor) -> bool:
    """Whether two indices of ``t`` share memory (a zero or too small stride); weights never do."""
    extent = 0  # largest offset reached by the dims seen so far, smallest stride first
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def _check_finite(sd: dict[str, Tensor], path: Path) -> None:
    bad: list[str] = []
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel():
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(v).sum())
                n_inf = int((~finite).sum()) - n_nan
                bad.append(f"{k} ({n_nan} NaN, {n_inf} Inf of {v.numel()})")
    if bad:
        raise NonFiniteWeightsError(
            path,
            f"non-finite weights in {len(bad)} tensor(s): {_listing(bad)}; "
            "pass allow_nonfinite=True to load anyway",
            [b.split(" (", 1)[0] for b in bad],
        )


def _load_into(
    model: nn.Module, sd: dict[str, Tensor], path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        (k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd if k in own and sd[k].shape != own[k].shape
    ]
    wrong_dtype = [
        f"{k}: checkpoint {str(sd[k].dtype).replace('torch.', '')} vs model "
        f"{str(own[k].dtype).replace('torch.', '')}"
        for k in sd
        if k in own and _dtype_kind(sd[k].dtype) != _dtype_kind(own[k].dtype)
    ]
    if mismatched or wrong_dtype or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(
                f"missing keys ({len(missing)}): " + _listing([f"{k} {_shape(own[k])}" for k in missing])
            )
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): "
                + _listing([f"{k} {_shape(sd[k])}" for k in unexpected])
            )
        if mismatched:
            parts.append(
                f"shape mismatches ({len(mismatched)}): "
                + _listing([f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched])
            )
        if wrong_dtype:
            parts.append(
                f"dtype mismatches ({len(wrong_dtype)}, a value of another kind would be cast silently): "
                + _listing(wrong_dtype)
            )
        raise StateDictMismatchError(
            path,
            f"does not fit {type(model).__name__}: " + "; ".join(parts),
            missing,
            unexpected,
            mismatched,
        )
    try:
        model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            path, f"could not be loaded into {type(model).__name__} ({_short(e)})"
        ) from None
    return missing, unexpected


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of a safetensors file (our JSON blob decoded, other str entries kept); tensors not read."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(path, f"is not a readable safetensors file ({_short(e)})") from None
    return _decode_safetensors_metadata(raw)


def _decode_safetensors_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {k: v for k, v in raw.items() if k not in (_META_KEY_SAFETENSORS, "format")}
    blob = raw.get(_META_KEY_SAFETENSORS)
    if blob:
        try:
            meta.update(json.loads(blob))
        except json.JSONDecodeError:
            meta[_META_KEY_SAFETENSORS] = blob
    return meta


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(
            path, f"is a corrupt or truncated safetensors file ({_short(e)})"
        ) from None
    if not sd:
        raise EmptyCheckpointError(path, "contains no tensors")
    return sd, _decode_safetensors_metadata(raw)


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    strict: bool = True,
    allow_unsafe: bool | Literal["pickle"] = False,
    allow_nonfinite: bool = False,
) -> LoadedCheckpoint:
    """Load a checkpoint file safely and, if ``model`` is given, its weights into ``model`` (in place).

    ``strict=True``: missing or unexpected keys raise :class:`StateDictMismatchError` (mis-shaped
    keys always do). Non-finite floating tensors raise :class:`NonFiniteWeightsError` unless
    ``allow_nonfinite``. See the module docstring for ``allow_unsafe``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(path, "file does not exist")
    if not path.is_file():
        raise CheckpointError(path, "is not a file")
    if path.stat().st_size == 0:
        raise EmptyCheckpointError(path, "file is empty (0 bytes)")
    expected = _SUFFIX_FORMAT.get(path.suffix.lower())
    sniffed = _sniff(path)
    if sniffed is None:
        if expected is None:
            raise UnknownFormatError(
                path,
                f"unknown format: suffix {path.suffix!r} is not one of {sorted(_SUFFIX_FORMAT)} "
                "and the content "
                "is neither a PyTorch (zip/pickle) nor a safetensors file",
            )
        raise CorruptCheckpointError(
            path,
            f"is not a valid {expected} checkpoint: the content matches no known checkpoint format "
            "(corrupt, truncated or not a checkpoint)",
        )
    digest = file_sha256(path)
    stripped: list[str] = []
    if sniffed == "safetensors":
        fmt = "safetensors"
        sd, meta = _load_safetensors(path)
    else:
        obj = _torch_load(path, allow_unsafe)
        sd, meta, nested = _extract(obj, path)
        is_lightning = (
            isinstance(obj, Mapping)
            and nested == "state_dict"
            and ("global_step" in obj or "pytorch-lightning_version" in obj or expected == "lightning")
        )
        fmt = "lightning" if is_lightning else "torch"
        if nested:
            meta.setdefault("state_dict_key", nested)
    if not sd:
        raise EmptyCheckpointError(path, "contains no tensors")
    _check_tensor_kinds(sd, path)
    _check_counters(meta, path)
    sd, stripped = _strip_wrappers(sd)
    if model is not None:
        sd, more = _fit_to_model(sd, set(model.state_dict()))
        stripped += more
    elif fmt == "lightning":
        comp = _common_component(list(sd))
        if comp in _KNOWN_ATTR_PREFIXES:
            sd = _strip_component(sd, comp)
            stripped.append(comp + ".")
    if not allow_nonfinite:
        _check_finite(sd, path)
    missing: list[str] = []
    unexpected: list[str] = []
    if model is not None:
        missing, unexpected = _load_into(model, sd, path, strict)
        model.dynascope_checkpoint_hash = digest  # probes record it in their .meta
    return LoadedCheckpoint(
        state_dict=sd,
        metadata=meta,
        format=fmt,
        path=path,
        sha256=digest,
        model=model,
        missing_keys=missing,
        unexpected_keys=unexpected,
        stripped_prefixes=stripped,
    )
