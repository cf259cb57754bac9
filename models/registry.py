"""Architecture registry: build a model from a JSON-able config, deterministically.

``build(name, **config)`` calls the factory registered under ``name`` inside a forked CPU RNG
seeded with ``config["seed"]`` (default 0), so the same config gives bit-identical weights and the
caller's global RNG state is left untouched. The complete config (defaults filled in) is stored
on the model as ``model.dynascope_config = {"name": ..., "seed": ..., **kwargs}``;
``build(**model_config(model))`` rebuilds the same architecture with the same initial weights.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["register", "build", "normalize_config", "available", "param_count", "model_config", "CONFIG_ATTR"]

CONFIG_ATTR = "dynascope_config"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory (class or function returning an ``nn.Module``).

    The factory's keyword arguments form the model config; they must be JSON-able.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Sorted names of all registered architectures."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def _ensure_builtins() -> None:
    from . import architectures  # noqa: F401  (registers the built-in models on import)


def _jsonable(value: Any, where: str) -> Any:
    """Convert tuples to lists and numpy/torch scalars to Python; reject anything not JSON-able."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"config value {where}={value!r} is not finite")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _jsonable(value.item(), where)
    raise TypeError(f"config value {where}={value!r} (type {type(value).__name__}) is not JSON-able")


def normalize_config(name: str, **config: Any) -> dict[str, Any]:
    """The complete config ``{"name", "seed", **kwargs}`` (defaults filled in) without building.

    Unknown names or config keys raise ``ValueError`` listing what is accepted.
    """
    _ensure_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    seed = config.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    sig = inspect.signature(factory)
    params = {
        k: p
        for k, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k != "self"
    }
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ValueError(f"model {name!r}: unknown config keys {unknown}; accepted: {sorted(params)}")
    missing = sorted(k for k, p in params.items() if p.default is p.empty and k not in config)
    if missing:
        raise ValueError(f"model {name!r}: missing required config keys {missing}")
    full = {k: _jsonable(config.get(k, p.default), k) for k, p in params.items()}
    return {"name": name, "seed": seed, **full}


def build(name: str, **config: Any) -> nn.Module:
    """Build the architecture ``name`` from keyword ``config``; ``seed`` (default 0) fixes the init.

    Unknown names or config keys raise ``ValueError`` listing what is accepted.
    """
    cfg = normalize_config(name, **config)
    factory, seed = _REGISTRY[name], cfg["seed"]
    full = {k: v for k, v in cfg.items() if k not in ("name", "seed")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**copy.deepcopy(full))
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory for {name!r} returned {type(model).__name__}, not an nn.Module")
    json.dumps(cfg)  # guaranteed by _jsonable; fail loudly here rather than at save time
    object.__setattr__(model, CONFIG_ATTR, cfg)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    for _ in range(4):
        if hasattr(model, CONFIG_ATTR):
            return model
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able config ``{"name", "seed", **kwargs}`` that rebuilds ``model`` via ``build``."""
    cfg = getattr(_unwrap(model), CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError(
            f"{type(model).__name__} was not built by dynascope.models.build or build_from_spec, so it has "
            "no config; pass its spec instead (e.g. {'factory': 'my_pkg.nets:make', 'kwargs': {...}} or "
            "{'hf': 'save_pretrained folder'}) or build it with build_from_spec(spec)"
        )
    return copy.deepcopy(cfg)


def weight_norm(model: nn.Module) -> float:
    """‖θ‖₂ = (Σ_p Σ_i θ_{p,i}²)^½ over the model's parameters, accumulated in float64; buffers (e.g.
    BatchNorm running statistics) are not weights and are excluded; shared parameters count once."""
    with torch.no_grad():
        return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


def param_count(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers excluded); shared parameters counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
