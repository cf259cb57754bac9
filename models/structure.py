"""A model as data: ``nn.Sequential`` trees of ``torch.nn`` layers described by their constructor arguments.

A model defined inline in a notebook or script (``nn.Sequential(nn.Linear(4, 8), nn.ReLU(), ...)``) has no
importable factory, so a run folder could not rebuild it. :func:`describe_module` writes such a model as a
JSON spec ``{"structure": {"type": "Sequential", "names": [...], "layers": [...]}}`` whose layers are
``{"type": "Linear", "in_features": 4, "out_features": 8, "bias": true}``; :func:`build_structure` builds it
again. Only the classes of :data:`LAYERS` (all of ``torch.nn``) can appear, so building runs no code a file
chose. A model with any other module (a class of your own, a library's layer) is not described: the caller
falls back to a factory spec and says why.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["LAYERS", "describe_module", "build_structure", "plain_class", "StructureError"]

#: The torch.nn classes a structure spec may name: Sequential, linear/conv/norm/embedding layers,
#: activations, pooling, dropout and reshaping layers (their state is parameters and buffers only).
LAYERS: dict[str, type[nn.Module]] = {
    c.__name__: c
    for c in (
        nn.Sequential, nn.Identity, nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
        nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.Dropout,
        nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Flatten, nn.Unflatten, nn.ReLU, nn.ReLU6,
        nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
        nn.Hardtanh, nn.Hardswish,
        nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.Upsample,
    )
}  # fmt: skip
_SKIP = {"self", "device", "dtype", "_weight", "_freeze"}
_JSON = (bool, int, float, str, type(None))


class StructureError(ValueError):
    """A module cannot be described as a structure spec, or a structure spec cannot be built."""


def _json_arg(value: Any) -> Any:
    if isinstance(value, _JSON):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _JSON) for v in value):
        return list(value)
    raise StructureError(f"argument {value!r} is not a number, string or list of them")


def plain_class(cls: type) -> type:
    """The class itself, or for a module sharded by FSDP2's ``fully_shard`` (which swaps ``module.__class__``
    for a subclass ``FSDP<Name>`` of ``FSDPModule`` and the original) the original class."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


def _plain_repr(model: nn.Module) -> str:
    """``repr(model)`` with FSDP2's ``FSDP<Name>`` class names read as the original ``<Name>``."""
    text = repr(model)
    for cls in {type(m) for m in model.modules()}:
        if plain_class(cls) is not cls:
            text = text.replace(f"{cls.__name__}(", f"{plain_class(cls).__name__}(")
    return text


def _layer_args(module: nn.Module, cls: type[nn.Module]) -> dict[str, Any]:
    """Constructor arguments of ``module`` read back from its attributes (``bias``: whether it has one)."""
    args: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in _SKIP or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "bias" and isinstance(getattr(module, "bias", None), (nn.Parameter, type(None))):
            args["bias"] = module.bias is not None
        elif name == "affine" and cls is nn.LayerNorm:
            continue
        elif hasattr(module, name):
            try:
                args[name] = _json_arg(getattr(module, name))
            except StructureError as e:
                raise StructureError(f"{type(module).__name__}.{name}: {e}") from None
        elif p.default is p.empty:
            raise StructureError(f"{type(module).__name__}: cannot read back its argument {name!r}")
    return args


def _describe(module: nn.Module, where: str) -> dict[str, Any]:
    cls = plain_class(type(module))
    if LAYERS.get(cls.__name__) is not cls:
        what = f"{cls.__module__}.{cls.__qualname__}"
        raise StructureError(f"{where or 'the model'} is a {what}, not a torch.nn layer")
    if cls is nn.Sequential:
        names = list(module._modules)
        layers = [_describe(m, f"{where}.{n}".lstrip(".")) for n, m in module._modules.items()]
        return {"type": "Sequential", "names": names, "layers": layers}
    if module._modules:
        raise StructureError(f"{where}: a {cls.__name__} with submodules")
    return {"type": cls.__name__, **_layer_args(module, cls)}


def build_structure(spec: Mapping[str, Any], where: str = "structure") -> nn.Module:
    """The module a structure spec describes (module docstring); ``StructureError`` naming the layer."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise StructureError(f"{where}: a layer must be an object with a 'type'; got {spec!r:.80}")
    cls = LAYERS.get(spec["type"])
    if cls is None:
        raise StructureError(f"{where}: {spec['type']!r} is not one of the torch.nn layers {sorted(LAYERS)}")
    if cls is nn.Sequential:
        layers, names = spec.get("layers"), spec.get("names")
        if not isinstance(layers, list) or not isinstance(names, list) or len(names) != len(layers):
            raise StructureError(f"{where}: a Sequential needs 'layers' and as many 'names'")
        if not all(isinstance(n, str) and n and "." not in n for n in names) or len(set(names)) != len(names):
            raise StructureError(f"{where}: Sequential names must be distinct strings without dots")
        children = [(n, build_structure(s, f"{where}.{n}")) for n, s in zip(names, layers, strict=True)]
        return nn.Sequential(OrderedDict(children))
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    bad = [k for k, v in kwargs.items() if not isinstance(v, _JSON) and not isinstance(v, list)]
    if bad:
        raise StructureError(f"{where}: arguments {bad} of {spec['type']} must be numbers, strings or lists")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    except Exception as e:  # noqa: BLE001 - torch's own argument errors, named
        raise StructureError(f"{where}: {spec['type']}({kwargs}) failed ({type(e).__name__}: {e})") from None


def describe_module(model: nn.Module) -> dict[str, Any]:
    """``{"structure": ...}`` for a tree of :data:`LAYERS`; ``StructureError`` saying why not. The spec is
    checked by building it again: the same ``repr`` (every constructor argument) and state-dict shapes."""
    spec = _describe(model, "")
    rebuilt = build_structure(spec)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rebuilt_shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if repr(rebuilt) != _plain_repr(model) or rebuilt_shapes != shapes:
        raise StructureError("the model rebuilt from its description differs from it")
    return {"structure": spec}
