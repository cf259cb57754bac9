"""Model outputs → logits, by one stated rule.

Probes differentiate a tensor. Models that return something else are reduced by :func:`logits_of`:

1. a tensor is the logits;
2. an object with a tensor attribute ``logits`` (Hugging Face ``ModelOutput``), or a mapping with a tensor
   under ``"logits"``, gives that tensor;
3. otherwise the first tensor of a tuple/list, or the first tensor value of a mapping (in its order).

:func:`attach_logits_rule` registers the rule as a forward hook on a model (the module's parameters and
their names are unchanged, so its checkpoints still fit) and records the rule that applied in
``model.dynascope_output_rule`` (probes copy it into ``.meta["outputs"]``). Inside :func:`raw_outputs`
the hook passes the output through unchanged, so a probe's ``output=`` can choose another part of it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["OUTPUT_RULE", "logits_of", "output_rule", "attach_logits_rule", "raw_outputs", "RULE_ATTR"]

_RAW = contextvars.ContextVar("dynascope_raw_outputs", default=False)


@contextlib.contextmanager
def raw_outputs(on: bool = True) -> Iterator[None]:
    """Within the block, models with the logits hook return their whole output (``on=False``: no change)."""
    token = _RAW.set(on or _RAW.get())
    try:
        yield
    finally:
        _RAW.reset(token)

OUTPUT_RULE = "tensor as is; else .logits / ['logits']; else the first tensor of the tuple or dict"
RULE_ATTR = "dynascope_output_rule"


def output_rule(out: Any) -> str:
    """Which branch of the rule ``out`` takes: ``"tensor"``, ``"logits"`` or ``"first tensor: [key] of keys
    [...]"`` (``[i] of n`` for a tuple), naming the tensor taken and the others."""
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return "logits"
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return "logits"
    if isinstance(out, Mapping):  # say which one, and what else there was (output= chooses another)
        keys = list(out.keys())
        first = next((k for k in keys if isinstance(out[k], torch.Tensor)), None)
        return f"first tensor: [{first!r}] of keys {keys}"
    if isinstance(out, (tuple, list)):
        first_i = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor)), None)
        return f"first tensor: [{first_i}] of {len(out)}"
    return "first tensor"


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output (module docstring); ``ValueError`` when it holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError(f"the model returned {type(out).__name__}, which holds no tensor; rule: {OUTPUT_RULE}")


def _logits_hook(module: nn.Module, args: Any, out: Any) -> Any:
    if _RAW.get():
        return out
    if not isinstance(out, torch.Tensor):
        object.__setattr__(module, RULE_ATTR, output_rule(out))
        return logits_of(out)
    return out


def attach_logits_rule(model: nn.Module) -> nn.Module:
    """Register :func:`logits_of` as ``model``'s forward hook (once) and return ``model``."""
    if not getattr(model, "_dynascope_logits_hook", False):
        model.register_forward_hook(_logits_hook)
        object.__setattr__(model, "_dynascope_logits_hook", True)
    return model
