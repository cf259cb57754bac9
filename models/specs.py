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
  tied weights filled (:func:`~dynascope.models.weights.load_weights`). ``use_cache`` is turned off.

Every form may add ``"trainable": [patterns]`` or ``"frozen": [patterns]`` (:mod:`dynascope.models.freezing`):
the built model's ``requires_grad`` flags follow them, so every front end probes the same parameters.

Models built from a factory or a Hugging Face folder get the output rule of
:mod:`dynascope.models.outputs` (``.logits``, else the first tensor) as a forward hook. Every built model
carries its normalised spec in ``model.dynascope_config`` (so ``model_config(model)`` returns it).
:func:`model_fingerprint` is what a cache key holds: the spec, plus the sha256 of a factory's file and of
the Hugging Face folder's config and weights (so a changed file changes the key).
"""

from __future__ import annotations

import copy
import hashlib
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
from .freezing import apply_freezing, freeze_patterns
from .outputs import attach_logits_rule
from .registry import CONFIG_ATTR, build, normalize_config

__all__ = [
    "MODEL_SPEC_FORMS",
    "model_spec_kind",
    "normalize_model_spec",
    "build_from_spec",
    "model_fingerprint",
    "hf_weights_file",
]

MODEL_SPEC_FORMS = ("name", "factory", "hf")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def model_spec_kind(spec: Any) -> str:
    """``"name"``, ``"factory"`` or ``"hf"``; ``ValueError`` naming the spec for anything else."""
    kinds = [k for k in MODEL_SPEC_FORMS if k in spec] if isinstance(spec, Mapping) else []
    if len(kinds) != 1:
        raise ValueError(
            "model config must be a dict with a string 'name' (registry), or exactly one of 'factory' "
            "('pkg.module:function' or 'path/file.py:function') or 'hf' (a save_pretrained folder); "
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
    allowed = {"factory": {"factory", "kwargs", "seed"}, "hf": {"hf", "seed"}}[kind]
    extra = sorted(set(out) - allowed)
    if extra:
        raise ValueError(
            f"model spec {dict(spec)}: unknown keys {extra}; a {kind!r} spec takes {sorted(allowed)}"
        )
    out["seed"] = _seed(out)
    if kind == "factory":
        return {**normalize_factory_spec(out, spec, "model"), **freeze}
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


def _build_hf(spec: Mapping[str, Any]) -> nn.Module:
    folder = Path(spec["hf"])
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model spec {dict(spec)}: '{folder}' has no config.json (not a save_pretrained folder)"
        )
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"model spec {dict(spec)} needs Hugging Face transformers: pip install 'dynascope[hf]'"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"model spec {dict(spec)}: config.json could not be read ({type(e).__name__}: {e})"
        ) from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        if cls is not None:
            model = cls(config)
        else:
            model = transformers.AutoModel.from_config(config)
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
    elif kind == "hf":
        folder = Path(cfg["hf"])
        cfg["hf_config_sha256"] = _digest_json(folder / "config.json")
        w = hf_weights_file(folder)
        cfg["hf_weights_sha256"] = file_sha256(w) if w is not None else None
    return cfg
