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

Unsafe pickles: a torch file is unpickled with ``weights_only=True`` and an allow-list: torch's
weights-only set plus the globals the caller names (``safe_globals=["argparse.Namespace", ...]``, names or
objects, as ``torch.serialization.add_safe_globals``). Any other global is refused, naming it, so no flag
lets a file choose what unpickling calls; a name on the deny-list (:data:`DENIED_GLOBALS`:
``exec``/``eval``/``os``/``subprocess``/``importlib``/``runpy``/pickle loaders, ...) is refused even when
named. ``allow_unsafe`` (the old flag, which allowlisted whatever the file asked for) is refused with a
message pointing at ``safe_globals``.

Before any tensor is used, sparse, meta-device, quantized and other non-strided tensors are refused,
``step``/``global_step``/``epoch`` metadata must be integers in [0, 2**63), and (with a model) each
tensor's dtype must be of the parameter's kind (floating into floating, integer into integer, bool into
bool). Format sniffing checks safetensors by its structure (u64 header length, then a JSON header
that parses and fits in the file) before zip and pickle magic, because a header length of 640, 896,
1152 or 1408 bytes starts with the bytes of a pickle protocol opcode.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .checkpoint_errors import (
    CheckpointError,
    CheckpointMetadataError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    EmptyCheckpointError,
    NonFiniteWeightsError,
    NoStateDictError,
    StateDictMismatchError,
    UnknownFormatError,
    UnsupportedTensorError,
)
from .checkpoint_errors import short as _short
from .registry import CONFIG_ATTR, _unwrap
from .torch_files import DENIED_GLOBALS, torch_load

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "LoadedCheckpoint",
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
            parsed = _json_object(v)
            if parsed is None:
                meta[k] = v
            else:
                meta.update(parsed)
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
            if v.dtype.itemsize == 1:  # float8 kinds: isfinite is not implemented for them
                v = v.float()
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


#: Deeper JSON metadata is kept as its raw text (nothing downstream has to recurse into it).
_MAX_META_DEPTH = 32


def json_object(text: str | bytes) -> dict[str, Any]:
    """``text`` parsed as a JSON object nested at most :data:`_MAX_META_DEPTH` deep; ``ValueError`` saying
    why not (invalid, too deep, not an object) otherwise."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {_MAX_META_DEPTH} levels") from None
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    level, depth = [obj], 0
    while level:
        depth += 1
        if depth > _MAX_META_DEPTH:
            raise ValueError(f"JSON nested deeper than {_MAX_META_DEPTH} levels")
        level = [c for o in level for c in (o.values() if isinstance(o, dict) else o)
                 if isinstance(c, (dict, list))]  # fmt: skip
    return obj


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        return json_object(text)
    except ValueError:
        return None


def _decode_safetensors_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {k: v for k, v in raw.items() if k not in (_META_KEY_SAFETENSORS, "format")}
    blob = raw.get(_META_KEY_SAFETENSORS)
    if blob:
        parsed = _json_object(blob)
        if parsed is None:
            meta[_META_KEY_SAFETENSORS] = blob
        else:
            meta.update(parsed)
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
    safe_globals: Sequence[str | Any] = (),
    allow_unsafe: bool | str = False,
    allow_nonfinite: bool = False,
) -> LoadedCheckpoint:
    """Load a checkpoint file safely and, if ``model`` is given, its weights into ``model`` (in place).

    ``strict=True``: missing or unexpected keys raise :class:`StateDictMismatchError` (mis-shaped
    keys always do). Non-finite floating tensors raise :class:`NonFiniteWeightsError` unless
    ``allow_nonfinite``. ``safe_globals``: globals (``"module.qualname"`` or objects) unpickling may call
    besides torch's weights-only set (module docstring).
    """
    path = Path(path)
    if allow_unsafe is not False:
        raise ValueError(
            f"load_checkpoint('{path}'): allow_unsafe is gone (it let the file choose the globals unpickling "
            "calls); name the globals you trust instead: safe_globals=['module.Class', ...]"
        )
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
        obj = torch_load(path, safe_globals)
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
