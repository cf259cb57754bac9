"""Data specs: JSON-able descriptions of a dataset, resolved to a :class:`DatasetSplit`.

Forms (:func:`load_spec`):

* ``{"name": "digits", ...}`` — a registered dataset (:func:`dynascope.datasets.load`);
* ``{"file": "data.safetensors" | ".pt" | ".npz", "x": "x", "y": "y", "test_file": ...}`` — tensors stored
  under the keys ``x`` and ``y`` (those names by default; ``"x": ["k0", "k1"]`` for positional inputs
  ``forward(x0, x1)``; ``"x": {"input_ids": "k1", "attention_mask": "k2"}``
  reads a dict of inputs, passed to ``forward`` as keyword arguments); ``.pt`` files are read with
  ``weights_only=True``;
* ``{"file": "table.parquet" | ".csv", "label": "column", "test_file": ...}`` — every other column is a
  float32 feature; the label is int64 when its column holds integers, else float32;
* ``{"factory": "pkg.module:function" | "path/file.py:function", "kwargs": {...}}`` — the function returns
  ``(x, y)`` tensors, ``{"train": (x, y), "test": (x, y)}``, a ``torch.utils.data.Dataset`` or a
  ``DataLoader`` whose items are ``(x, y)`` pairs or dicts (Hugging Face style, e.g. ``{"input_ids",
  "attention_mask", "labels"}``): the targets are ``labels`` (or the spec's ``"target_key"``; without one
  the ``input_ids`` are the labels) and **every other key is kept** as an input, reaching ``forward`` as a
  keyword argument (:func:`dynascope.datasets.batching.split_item`). Everything is materialised as
  tensors once; a dict dataset's ``x`` is a dict of tensors.
  A factory is imported from the environment or a file path on this machine, never from an uploaded file.

Without a ``test_file`` (or a factory's ``"test"``) the test split is the train split, stated in
``info["test"]``. :func:`data_fingerprint` is what a cache key holds: the spec, plus the sha256 of every
file it reads (so a changed file changes the key).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .batching import Inputs, concat_inputs, input_count, input_tensors, split_item
from .factory import call_factory, is_factory_ref, normalize_factory_spec, ref_fingerprint
from .registry import DatasetSplit, defaults, load

__all__ = ["DATA_SPEC_FORMS", "normalize_data_spec", "load_spec", "data_fingerprint", "data_spec_kind"]

DATA_SPEC_FORMS = ("name", "file", "factory")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npz")
TABLE_SUFFIXES = (".parquet", ".csv")
_ALLOWED = {
    "name": None,
    "file": {"file", "x", "y", "test_file", "label"},
    "factory": {"factory", "kwargs", "target_key"},
}

Pair = tuple[Inputs, torch.Tensor]


def data_spec_kind(spec: Mapping[str, Any]) -> str:
    """``"name"``, ``"file"`` or ``"factory"``; ``ValueError`` for anything else."""
    kinds = [k for k in DATA_SPEC_FORMS if k in spec] if isinstance(spec, Mapping) else []
    if len(kinds) != 1:
        raise ValueError(
            "dataset config must be a dict with a string 'name' (registry), or exactly one of 'file' "
            "(.safetensors/.pt/.npz/.parquet/.csv) or 'factory' ('pkg.module:function'); "
            f"got {spec!r}"
        )
    return kinds[0]


def normalize_data_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """The JSON-able spec with defaults filled in (registry defaults; ``x``/``y`` keys; empty kwargs).

    A bare string is a registry name, or a factory reference when it reads ``module:function``."""
    if isinstance(spec, str):
        spec = {"factory": spec} if is_factory_ref(spec) else {"name": spec}
    kind = data_spec_kind(spec)
    out = dict(spec)
    allowed = _ALLOWED[kind]
    if allowed is not None:
        extra = sorted(set(out) - allowed)
        if extra:
            raise ValueError(
                f"data spec {dict(spec)}: unknown keys {extra}; a {kind!r} spec takes {sorted(allowed)}"
            )
    if kind == "name":
        if not isinstance(out["name"], str):
            raise ValueError(f"data spec {dict(spec)}: 'name' must be a string")
        return {**defaults(out["name"]), **out}
    if kind == "file":
        f = out["file"]
        if not isinstance(f, str) or not f:
            raise ValueError(f"data spec {dict(spec)}: 'file' must be a path string")
        suffix = Path(f).suffix.lower()
        out["file"] = str(Path(f).expanduser().resolve())
        if isinstance(out.get("test_file"), str) and out["test_file"]:
            out["test_file"] = str(Path(out["test_file"]).expanduser().resolve())
        if suffix in TABLE_SUFFIXES:
            if not isinstance(out.get("label"), str):
                raise ValueError(f'data spec {dict(spec)}: a table ({suffix}) needs "label": "<column>"')
        elif suffix in TENSOR_SUFFIXES:
            out.setdefault("x", "x")
            out.setdefault("y", "y")
            xk = out["x"]
            ok = isinstance(xk, str) or (
                isinstance(xk, Mapping)
                and bool(xk)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in xk.items())
            ) or (isinstance(xk, list) and bool(xk) and all(isinstance(k, str) for k in xk))
            if not ok or not isinstance(out["y"], str):
                raise ValueError(
                    f"data spec {dict(spec)}: 'x' must be a key (or {{input name: key}} for keyword inputs, "
                    "[key, ...] for positional ones) and 'y' a key"
                )
        else:
            raise ValueError(
                f"data spec {dict(spec)}: file suffix {suffix!r} is not one of "
                f"{list(TENSOR_SUFFIXES + TABLE_SUFFIXES)}"
            )
        return out
    if "target_key" in out and not isinstance(out["target_key"], str):
        raise ValueError(f"data spec {dict(spec)}: 'target_key' must be a string (the key of the targets)")
    return normalize_factory_spec(out, spec, "data")


# ------------------------------------------------------------------------------------------ readers
def _read_tensor_file(path: Path, keys: tuple[Any, str], spec: Mapping[str, Any]) -> Pair:
    if not path.is_file():
        raise ValueError(f"data spec {dict(spec)}: file '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Mapping[str, Any] = load_file(str(path))
        elif suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as z:
                content = {k: torch.from_numpy(z[k].copy()) for k in z.files}
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"data spec {dict(spec)}: '{path}' could not be read ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(content, Mapping):
        raise ValueError(
            f"data spec {dict(spec)}: '{path}' holds a {type(content).__name__}, not a dict of tensors "
            f"with keys {list(keys)}"
        )
    positional = isinstance(keys[0], list)
    x_keys = dict(keys[0]) if isinstance(keys[0], Mapping) else (
        {str(i): k for i, k in enumerate(keys[0])} if positional else {"": keys[0]}
    )  # fmt: skip
    missing = [k for k in [*x_keys.values(), keys[1]] if k not in content]
    if missing:
        raise ValueError(
            f"data spec {dict(spec)}: '{path}' has no key(s) {missing}; it has {sorted(map(str, content))} "
            '(name them with "x": ..., "y": ...)'
        )
    xs = {name: torch.as_tensor(content[k]) for name, k in x_keys.items()}
    x = xs[""] if "" in xs else tuple(xs.values()) if positional else xs
    return _check_pair(x, torch.as_tensor(content[keys[1]]), f"'{path}'", spec)


def _read_table(path: Path, label: str, spec: Mapping[str, Any]) -> Pair:
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"data spec {dict(spec)}: file '{path}' does not exist")
    try:
        df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"data spec {dict(spec)}: '{path}' could not be read ({type(e).__name__}: {e})"
        ) from None
    if label not in df.columns:
        raise ValueError(
            f"data spec {dict(spec)}: '{path}' has no column {label!r}; columns: {list(df.columns)}"
        )
    features = df.drop(columns=[label])
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise ValueError(f"data spec {dict(spec)}: '{path}' has non-numeric feature columns {bad}")
    x = torch.tensor(features.to_numpy(dtype="float32"))
    col = df[label]
    y = torch.tensor(col.to_numpy(dtype="int64" if pd.api.types.is_integer_dtype(col) else "float32"))
    return _check_pair(x, y, f"'{path}'", spec)


def _check_pair(x: Any, y: Any, where: str, spec: Mapping[str, Any]) -> Pair:
    if isinstance(x, Mapping) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
        xs = dict(x)
    elif isinstance(x, tuple) and x and all(isinstance(v, torch.Tensor) for v in x):
        xs = {f"x{i}": t for i, t in enumerate(x)}
    elif isinstance(x, torch.Tensor):
        xs = {"x": x}
    else:
        raise ValueError(f"data spec {dict(spec)}: {where} must give tensors x and y")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"data spec {dict(spec)}: {where} must give tensors x and y")
    if y.dim() == 0 or any(t.dim() == 0 for t in xs.values()):
        raise ValueError(f"data spec {dict(spec)}: {where}: x and y need a sample dimension")
    for k, t in xs.items():
        if t.shape[0] != y.shape[0]:
            name = "x" if k == "x" and not isinstance(x, Mapping) else f"input {k!r}"
            raise ValueError(
                f"data spec {dict(spec)}: {where}: {name} has {t.shape[0]} samples but y has {y.shape[0]} "
                f"({name} {tuple(t.shape)}, y {tuple(y.shape)})"
            )
    if y.shape[0] == 0:
        raise ValueError(f"data spec {dict(spec)}: {where} holds no samples")
    xs = {k: t.float() if t.dtype == torch.float64 else t for k, t in xs.items()}
    if isinstance(x, tuple):
        return tuple(xs.values()), y
    return (xs if isinstance(x, Mapping) else xs["x"]), y


def _item_pair(item: Any, target_key: str | None) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        x, y = split_item(item, target_key)
        if isinstance(x, Mapping):
            x = {k: torch.as_tensor(v) for k, v in x.items()}
        return x, y
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise ValueError(f"items must be (x, y) pairs or dicts; got {type(item).__name__}")


def _stack_inputs(xs: list[Any]) -> Inputs:
    if isinstance(xs[0], Mapping):
        return {k: torch.stack([torch.as_tensor(x[k]) for x in xs]) for k in xs[0]}
    return torch.stack([torch.as_tensor(x) for x in xs])


def _materialize(obj: Any, spec: Mapping[str, Any], where: str) -> Pair:
    from torch.utils.data import DataLoader, Dataset

    target_key = spec.get("target_key")
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor):
        if isinstance(obj[0], (torch.Tensor, Mapping)):
            return _check_pair(obj[0], obj[1], where, spec)
    if isinstance(obj, Mapping) and "train" not in obj:  # a dict of tensors: one HF-style batch
        try:
            x, y = _item_pair(obj, target_key)
        except ValueError as e:
            raise ValueError(f"data spec {dict(spec)}: {where}: {e}") from None
        return _check_pair(x, torch.as_tensor(y), where, spec)
    if isinstance(obj, (DataLoader, Dataset)):
        xs, ys = [], []
        try:
            if isinstance(obj, DataLoader):
                for batch in obj:
                    x, y = _item_pair(batch, target_key)
                    xs.append({k: torch.as_tensor(v) for k, v in x.items()} if isinstance(x, Mapping)
                              else torch.as_tensor(x))  # fmt: skip
                    ys.append(torch.as_tensor(y))
                x, y = concat_inputs(xs), torch.cat(ys)
            else:
                for i in range(len(obj)):  # type: ignore[arg-type]
                    x, y = _item_pair(obj[i], target_key)
                    xs.append(x)
                    ys.append(torch.as_tensor(y))
                x, y = _stack_inputs(xs), torch.stack(ys)
        except ValueError as e:
            raise ValueError(f"data spec {dict(spec)}: {where}: {e}") from None
        except (RuntimeError, KeyError) as e:  # torch.cat / torch.stack of items with different shapes
            raise ValueError(
                f"data spec {dict(spec)}: {where}: its items cannot be stacked into one tensor "
                f"(pad sequences to one length, every item with the same keys): {str(e).splitlines()[0]}"
            ) from None
        return _check_pair(x, y, where, spec)
    raise ValueError(
        f"data spec {dict(spec)}: {where} returned {type(obj).__name__}; expected (x, y) tensors, "
        "{'train': (x, y), 'test': (x, y)}, a dict of tensors, a Dataset or a DataLoader"
    )


def _info(train: Pair, test: Pair, test_note: str) -> dict[str, Any]:
    y = train[1]
    info: dict[str, Any] = {
        "n_train": input_count(train[0]),
        "n_test": input_count(test[0]),
        "test": test_note,
    }
    if isinstance(train[0], (Mapping, tuple)):
        shapes = {k: list(v.shape[1:]) for k, v in input_tensors(train[0]).items()}
        info["input_shape"] = next(iter(shapes.values()))
        info["input_keys"] = shapes
    else:
        info["input_shape"] = list(train[0].shape[1:])
    if y.is_floating_point():
        info["task"] = "regression"
        info["out_dim"] = int(y[0].numel())
    elif y.dim() == 1:
        info["task"] = "classification"
        info["n_classes"] = int(y.max()) + 1
    else:
        info["task"] = "sequence"
    return info


def load_spec(spec: Mapping[str, Any] | str) -> DatasetSplit:
    """The dataset a spec describes (see the module docstring), as a :class:`DatasetSplit` whose
    ``config`` is the normalised spec. Bad specs raise ``ValueError`` naming the spec."""
    spec = normalize_data_spec(spec)
    kind = data_spec_kind(spec)
    if kind == "name":
        cfg = dict(spec)
        return load(cfg.pop("name"), **cfg)
    if kind == "file":
        path = Path(spec["file"]).expanduser()
        test_file = spec.get("test_file")

        def read(p: Path) -> Pair:
            if p.suffix.lower() in TABLE_SUFFIXES:
                return _read_table(p, spec["label"], spec)
            return _read_tensor_file(p, (spec["x"], spec["y"]), spec)

        train = read(path)
        test = read(Path(test_file).expanduser()) if test_file else train
        note = f"'{test_file}'" if test_file else "same as train (no test_file)"
        return DatasetSplit(train=train, test=test, config=spec, info=_info(train, test, note))
    out = call_factory(spec["factory"], spec["kwargs"], what="data factory")
    if isinstance(out, Mapping) and ("train" in out or "test" in out):
        if "train" not in out:
            raise ValueError(f"data spec {dict(spec)}: the factory returned a dict without 'train'")
        train = _materialize(out["train"], spec, "the factory's 'train'")
        test = _materialize(out["test"], spec, "the factory's 'test'") if "test" in out else train
        note = "the factory's 'test'" if "test" in out else "same as train (the factory gave no 'test')"
    else:
        train = test = _materialize(out, spec, "the factory")
        note = "same as train (the factory gave no 'test')"
    return DatasetSplit(train=train, test=test, config=spec, info=_info(train, test, note))


def _file_digest(path: str | None) -> str | None:
    """sha256 of a file, cached by (path, inode, size, mtime, ctime) so a changed file is hashed again."""
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        return None
    st = p.stat()
    return _digest(str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """What a cache key holds for ``spec``: the normalised spec, plus ``file_sha256`` /
    ``test_file_sha256`` for file specs and the factory's file sha256 for ``file.py:function``."""
    try:
        out = normalize_data_spec(spec)
    except ValueError:
        return dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    kind = data_spec_kind(out)
    if kind == "file":
        out["file_sha256"] = _file_digest(out["file"])
        if out.get("test_file"):
            out["test_file_sha256"] = _file_digest(out["test_file"])
    elif kind == "factory":
        out["factory_code"] = ref_fingerprint(out["factory"])
    return out
