"""Model specs: JSON-able descriptions of a model, built by :func:`build_from_spec`.

Forms:

* ``{"name": "mlp", ...}`` — a registered architecture (:func:`dynascope.models.build`);
* ``{"factory": "pkg.module:function" | "path/to/file.py:function", "kwargs": {...}, "seed": 0}`` — a
  function (or class) returning an ``nn.Module``, called with ``kwargs`` inside a CPU RNG forked and seeded
  with ``seed``. A factory is imported only from the Python environment or a file path on this machine,
  never from an uploaded file;
* ``{"hf": "path/to/save_pretrained_dir", "seed": 0}`` — a Hugging Face model: ``AutoConfig`` read from the
  local folder (``local_files_only=True``; the hub is never contacted), the class named by
  ``config.architectures[0]`` (the task head, e.g. ``GPT2LMHeadModel``; ``AutoModel`` when none is named),
  built with random weights, then the folder's ``model.safetensors`` / ``pytorch_model.bin`` loaded with
  tied weights filled (:func:`~dynascope.models.weights.load_weights`). ``use_cache`` is turned off;
* ``{"structure": {...}}`` — a ``Sequential`` of ``torch.nn`` layers (:mod:`dynascope.models.structure`);
* ``{"exported": "path/to/model.export.json"}`` — a ``torch.export`` program in JSON with its tensors in
  safetensors beside it (:mod:`dynascope.models.exported`; read without unpickling anything; eval mode).

Every form may add ``"trainable": [patterns]`` or ``"frozen": [patterns]`` (:mod:`dynascope.models.freezing`):
the built model's ``requires_grad`` flags follow them, so every front end probes the same parameters.

Models built from a factory or a Hugging Face folder get the output rule of
:mod:`dynascope.models.outputs` (``.logits``, else the first tensor) as a forward hook. Every built model
carries its normalised spec in ``model.dynascope_config`` (so ``model_config(model)`` returns it).
:func:`model_fingerprint` is what a cache key holds: the spec, plus the sha256 of a factory's file and of
the Hugging Face folder's config and weights, or of an exported program's files (so a changed file changes
the key).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets.factory import (
    call_factory,
    is_factory_ref,
    normalize_factory_spec,
    ref_fingerprint,
)
from .checkpoints import file_sha256
from .exported import export_fingerprint, load_exported
from .freezing import apply_freezing, freeze_patterns
from .outputs import attach_logits_rule
from .registry import CONFIG_ATTR, build, normalize_config
from .structure import build_structure

__all__ = [
    "MODEL_SPEC_FORMS",
    "is_model_spec",
    "model_spec_kind",
    "normalize_model_spec",
    "build_from_spec",
    "model_fingerprint",
    "hf_weights_file",
]

MODEL_SPEC_FORMS = ("name", "factory", "hf", "structure", "exported")


def is_model_spec(spec: Any) -> bool:
    """Whether ``spec`` has the shape of a model spec: a dict naming a registry model, factory or HF folder
    (a string), or a structure (a dict); not whether it builds."""
    return isinstance(spec, Mapping) and (
        any(isinstance(spec.get(k), str) for k in ("name", "factory", "hf", "exported"))
        or isinstance(spec.get("structure"), Mapping)
    )
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def model_spec_kind(spec: Any) -> str:
    """``"name"``, ``"factory"`` or ``"hf"``; ``ValueError`` naming the spec for anything else."""
    kinds = [k for k in MODEL_SPEC_FORMS if k in spec] if isinstance(spec, Mapping) else []
    if len(kinds) != 1:
        raise ValueError(
            "model config must be a dict with a string 'name' (registry), or exactly one of 'factory' "
            "('pkg.module:function' or 'path/file.py:function'), 'hf' (a save_pretrained folder), "
            "'structure' (torch.nn layers, dynascope.models.structure) or 'exported' (a torch.export "
            "program, dynascope.models.exported); "
            f"got {spec!r}"
        )
    return kinds[0]


def _seed(spec: Mapping[str, Any]) -> int:
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"model spec {dict(spec)}: seed must be an int, got {seed!r}")
    return seed


def normalize_model_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """The complete JSON-able spec (registry defaults, ``seed``, ``kwargs`` filled in; an ``hf`` path made
    absolute). A string ``"module:function"`` is a factory spec; another string a registry name."""
    if isinstance(spec, str):
        spec = {"factory": spec} if is_factory_ref(spec) else {"name": spec}
    kind = model_spec_kind(spec)
    freeze = freeze_patterns(spec)  # "trainable" / "frozen" name patterns (models.freezing), any form
    out = {k: v for k, v in spec.items() if k not in freeze}
    if kind == "name":
        name = out.pop("name")
        if not isinstance(name, str):
            raise ValueError(f"model spec {dict(spec)}: 'name' must be a string")
        return {**normalize_config(name, **out), **freeze}
    allowed = {
        "factory": {"factory", "kwargs", "seed"},
        "hf": {"hf", "seed", "max_params"},
        "structure": {"structure", "seed"},
        "exported": {"exported", "seed"},
    }[kind]
    extra = sorted(set(out) - allowed)
    if extra:
        raise ValueError(
            f"model spec {dict(spec)}: unknown keys {extra}; a {kind!r} spec takes {sorted(allowed)}"
        )
    out["seed"] = _seed(out)
    limit = out.get("max_params")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"model spec {dict(spec)}: max_params must be a positive int, got {limit!r}")
    if kind == "factory":
        return {**normalize_factory_spec(out, spec, "model"), **freeze}
    if kind == "structure":
        if not isinstance(out["structure"], Mapping):
            raise ValueError(f"model spec {dict(spec)}: 'structure' must be a layer object")
        return {**out, **freeze}
    if kind == "exported":
        if not isinstance(out["exported"], str) or not out["exported"]:
            raise ValueError(f"model spec {dict(spec)}: 'exported' must be the path of a model.export.json")
        out["exported"] = str(Path(out["exported"]).expanduser().resolve())
        return {**out, **freeze}
    if not isinstance(out["hf"], str) or not out["hf"]:
        raise ValueError(f"model spec {dict(spec)}: 'hf' must be the path of a save_pretrained folder")
    out["hf"] = str(Path(out["hf"]).expanduser().resolve())
    return {**out, **freeze}


def hf_weights_file(folder: str | Path) -> Path | None:
    """The weights file of a ``save_pretrained`` folder (``model.safetensors`` first), or ``None``."""
    for name in HF_WEIGHT_FILES:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


#: Config attributes that count repeated layers; a parameter estimate scales each linearly.
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer", "encoder_layers",
               "decoder_layers", "num_encoder_layers")  # fmt: skip


def available_memory_bytes() -> int:
    """Memory this process can still use: Linux ``MemAvailable``, else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_params() -> int:
    """The largest model a spec builds by default: 16 bytes per parameter (float32 weights, gradients and
    two probe vectors) must fit the available memory."""
    return available_memory_bytes() // 16


def _hf_config_json(folder: Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` as data, refusing custom code (``auto_map``) before transformers reads it."""
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"model spec {dict(spec)}: '{path}' is not a JSON file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model spec {dict(spec)}: '{path}' must hold a JSON object")
    if "auto_map" in cfg:
        raise ValueError(
            f"model spec {dict(spec)}: '{path}' names custom model code (auto_map {cfg['auto_map']!r}); "
            "dynascope never runs code from a model folder (trust_remote_code=False). Build the model in "
            "your own code and pass it as a factory spec"
        )
    return cfg


def _hf_param_count(make: Any, config: Any) -> int:
    """The parameter count of ``make(config)`` without allocating it: built on the meta device with one
    layer, then with two of each layer kind; the count is linear in each layer count."""
    aliases = getattr(config, "attribute_map", {}) or {}
    counts: dict[str, int] = {}
    for key in _LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            counts[aliases.get(key, key)] = value

    def count(layers: Mapping[str, int]) -> int:
        c = copy.deepcopy(config)
        for k, v in layers.items():
            setattr(c, k, v)
        with torch.device("meta"):
            model = make(c)
        return sum(p.numel() for p in model.parameters())

    ones = dict.fromkeys(counts, 1)
    base = count(ones)
    return base + sum((n - 1) * (count({**ones, k: 2}) - base) for k, n in counts.items() if n > 1)


def _build_hf(spec: Mapping[str, Any]) -> nn.Module:
    folder = Path(spec["hf"])
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model spec {dict(spec)}: '{folder}' has no config.json (not a save_pretrained folder)"
        )
    _hf_config_json(folder, spec)
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"model spec {dict(spec)} needs Hugging Face transformers: pip install 'dynascope[hf]'"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"model spec {dict(spec)}: config.json could not be read ({type(e).__name__}: {e})"
        ) from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list):
        raise ValueError(f"model spec {dict(spec)}: config.json 'architectures' must be a list of names")
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None

    def make(c: Any) -> nn.Module:
        if cls is not None:
            return cls(c)
        return transformers.AutoModel.from_config(c, trust_remote_code=False)

    limit = spec.get("max_params") or default_max_params()
    try:
        n_params = _hf_param_count(make, config)
    except Exception as e:  # noqa: BLE001 - transformers' own errors on a bad config
        raise ValueError(
            f"model spec {dict(spec)}: the model of '{folder / 'config.json'}' cannot be built "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    if n_params > limit:
        raise ValueError(
            f"model spec {dict(spec)}: '{folder / 'config.json'}' describes a model of {n_params:,} "
            f"parameters, above the limit of {limit:,} ({limit * 16 / 2**30:.1f} GiB at 16 bytes per "
            "parameter, from the available memory); set \"max_params\" in the spec to build it anyway"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        try:
            model = make(config)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"model spec {dict(spec)}: building {archs[0] if cls else 'AutoModel'} from '{folder}' "
                f"failed ({type(e).__name__}: {e})"
            ) from None
    weights = hf_weights_file(folder)
    if weights is not None:
        from .weights import load_weights

        load_weights(weights, model)
    model.eval()
    return model


def build_from_spec(spec: Mapping[str, Any] | str) -> nn.Module:
    """The model a spec describes (module docstring). Bad specs raise ``ValueError`` naming the spec."""
    cfg = normalize_model_spec(spec)
    kind = model_spec_kind(cfg)
    freeze = freeze_patterns(cfg)
    if kind == "name":
        c = {k: v for k, v in cfg.items() if k not in freeze}
        model = build(c.pop("name"), **c)
        if freeze:
            apply_freezing(model, **freeze)
            object.__setattr__(model, CONFIG_ATTR, cfg)
        return model
    if kind == "factory":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = call_factory(cfg["factory"], copy.deepcopy(cfg["kwargs"]), what="model factory")
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model factory {cfg['factory']!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
    elif kind == "structure":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = build_structure(cfg["structure"])
    elif kind == "exported":
        model = load_exported(cfg["exported"])  # JSON and safetensors only
    else:
        model = _build_hf(cfg)
    if freeze:
        apply_freezing(model, **freeze)
    attach_logits_rule(model)
    object.__setattr__(model, CONFIG_ATTR, cfg)
    return model


def _digest_json(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def model_fingerprint(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a cache key holds for a model spec: the normalised spec (registry defaults filled in), plus
    ``factory_code`` (a file factory's sha256) or ``hf_config_sha256`` / ``hf_weights_sha256``."""
    try:
        cfg = normalize_model_spec(spec)
        kind = model_spec_kind(cfg)
    except (ValueError, TypeError):
        return dict(spec)
    if kind == "factory":
        cfg["factory_code"] = ref_fingerprint(cfg["factory"])
    elif kind == "exported":
        cfg.update(export_fingerprint(cfg["exported"]))
    elif kind == "hf":
        folder = Path(cfg["hf"])
        cfg["hf_config_sha256"] = _digest_json(folder / "config.json")
        w = hf_weights_file(folder)
        cfg["hf_weights_sha256"] = file_sha256(w) if w is not None else None
    return cfg
