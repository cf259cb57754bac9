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
allowlist is refused, naming those globals. ``allow_unsafe=True`` allowlists exactly those named
globals (importing them by name, via ``torch.serialization.safe_globals``) and still loads with
``weights_only=True``, so no other code can run; ``allow_unsafe="pickle"`` is the last resort
(``weights_only=False``, arbitrary code execution) and warns loudly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pickle
import pickletools
import re
import warnings
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
        step = self.metadata.get("step", self.metadata.get("global_step"))
        return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None

    @property
    def epoch(self) -> int | None:
        epoch = self.metadata.get("epoch")
        return int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None


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
def _sniff(path: Path) -> str | None:
    """Format from the first bytes: zip or legacy pickle → torch; u64 header length + '{' → safetensors."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= 100 * 2**20:
            return "safetensors"
    return None


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
    with open(path, "rb") as f:
        for _ in range(5):  # magic number, protocol, sys info, object, storage keys
            try:
                for _op in pickletools.genops(f):
                    pass
            except Exception:  # noqa: BLE001
                return True
    return False


def _torch_load(path: Path, allow_unsafe: bool | Literal["pickle"]) -> Any:
    if allow_unsafe == "pickle":
        warnings.warn(
            f"loading '{path}' with weights_only=False (allow_unsafe='pickle'): unpickling can execute "
            "arbitrary code; only do this for files you trust",
            UserWarning,
            stacklevel=3,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(path, f"could not be unpickled ({_short(e)})") from None
    if allow_unsafe not in (True, False):
        raise ValueError(f"allow_unsafe must be False, True or 'pickle', got {allow_unsafe!r}")

    allowed: list[Any] = []
    allowed_names: list[str] = []
    for _ in range(64):  # legacy (non-zip) files reveal one unsafe global per attempt
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise CorruptCheckpointError(path, f"is corrupt or truncated ({_short(e)})") from None
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # noqa: BLE001 - legacy format: parse the refused global from the message
                if _legacy_pickles_truncated(path):  # a cut-off GLOBAL name is damage, not a class
                    raise CorruptCheckpointError(
                        path, "is corrupt or truncated (pickle stream ends early)"
                    ) from None
                names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
            names = [n for n in names if n not in allowed_names] or re.findall(r"GLOBAL ([\w.]+)", str(e))
            if not names:
                raise UnsafeCheckpointError(
                    path, _unsafe_message(["<unknown>"]) + f" ({_short(e)})"
                ) from None
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
                    allowed.append(_resolve_global(n))
                except ImportError:
                    raise UnsafeCheckpointError(
                        path,
                        f"needs the global {n}, which cannot be imported here; install the code that defines "
                        "it, or use allow_unsafe='pickle' if you trust the file",
                        names,
                    ) from None
                allowed_names.append(n)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise CorruptCheckpointError(path, f"is corrupt or truncated ({_short(e)})") from None
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
    if mismatched or (strict and (missing or unexpected)):
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
