"""A dry run of a model / data / loss spec triple before a run is created from it.

:func:`dry_run` builds the model from its spec, loads the first checkpoint (prefixes fitted, tied weights
filled), loads the data, runs one forward pass on the first samples (under the math SDPA backend; a dict
of inputs — every key of Hugging Face style items but the targets — as keyword arguments; outputs reduced
to logits by the stated rule) and evaluates the loss on it, checking its shape: one finite value per
sample. The report names every input key and its shape, and the trainable / frozen parameter counts.
Each failure is a ``ValueError`` naming the spec at fault and what was expected, so the CLI
(``dynascope import``) and the app's Runs page can refuse a bad triple before anything is written.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dynascope.datasets import describe_inputs, input_tensors, load_spec, slice_inputs
from dynascope.models import build_from_spec, load_weights, logits_of
from dynascope.models.outputs import RULE_ATTR, output_rule
from dynascope.probes.functional import attention_kernels
from dynascope.probes.losses import resolve_loss

__all__ = ["DryRunReport", "dry_run"]


@dataclass
class DryRunReport:
    """What the dry run saw: parameter count, input / output / target shapes, the output rule, the loss and
    its value on the batch, what checkpoint loading had to do (prefixes, tied weights) and the seconds."""

    n_params: int
    input_shape: list[int]  # the first input's (a dict's first key)
    output_shape: list[int]
    target_shape: list[int]
    output_rule: str
    loss: str
    loss_value: float
    checkpoint: str | None = None
    prefixes: list[str] = field(default_factory=list)
    tied_filled: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    inputs: dict[str, list[int]] = field(default_factory=dict)  # every input key and its shape
    n_trainable: int | None = None

    def summary(self) -> str:
        """One paragraph a person reads before accepting the run."""
        keyed = list(self.inputs) != ["x"] and bool(self.inputs)
        shown = ", ".join(f"{k} {v}" for k, v in self.inputs.items()) if keyed else str(self.input_shape)
        frozen = (f" ({self.n_trainable:,} trainable, {self.n_params - self.n_trainable:,} frozen)"
                  if self.n_trainable is not None and self.n_trainable != self.n_params else "")  # fmt: skip
        parts = [
            f"dry run ok: {self.n_params:,} parameters{frozen}; inputs {shown} → outputs "
            f"{self.output_shape} ({self.output_rule}); targets {self.target_shape}; "
            f"{self.loss} = {self.loss_value:.4g} on this batch ({self.seconds:.1f} s)"
        ]
        if self.checkpoint:
            parts.append(f"checkpoint {self.checkpoint} loaded")
        if self.prefixes:
            parts.append(f"key prefixes fitted: {', '.join(self.prefixes)}")
        if self.tied_filled:
            tied = ", ".join(f"{k} ← {v}" for k, v in self.tied_filled.items())
            parts.append(f"tied weights filled from their tie: {tied}")
        return "; ".join(parts)


def dry_run(
    model: Any,
    data: Any,
    loss: Any = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    n_samples: int = 4,
) -> DryRunReport:
    """Check that ``model``, ``data`` and ``loss`` specs fit together (module docstring)."""
    t0 = time.perf_counter()
    net = build_from_spec(model)
    prefixes: list[str] = []
    tied: dict[str, str] = {}
    if checkpoint is not None:
        rec = load_weights(checkpoint, net)
        prefixes = [p for p in rec.stripped_prefixes]
        tied = dict(rec.metadata.get("tied_filled") or {})
    split = load_spec(data)
    x, y = slice_inputs(split.train[0], slice(None, n_samples)), split.train[1][:n_samples]
    net.eval()
    try:
        with torch.no_grad(), attention_kernels():
            raw = net(**x) if isinstance(x, dict) else net(x)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        dtypes = ", ".join(str(t.dtype).replace("torch.", "") for t in input_tensors(x).values())
        raise ValueError(
            f"the data (spec {data!r}) does not fit the model (spec {model!r}): the forward pass on inputs "
            f"{describe_inputs(x)} ({dtypes}) failed: {type(e).__name__}: {first}"
        ) from None
    rule = getattr(net, RULE_ATTR, None) or output_rule(raw)
    out = logits_of(raw)
    loss_spec = loss if loss is not None else "auto"
    try:
        resolved = resolve_loss(loss_spec, y)
        per = resolved.losses(raw if resolved.takes_batch else out, y, x)
    except (ValueError, RuntimeError, IndexError) as e:
        raise ValueError(
            f"the loss {loss_spec!r} does not fit the model outputs {list(out.shape)} and targets "
            f"{list(y.shape)} ({y.dtype}): {str(e).splitlines()[0]}"
        ) from None
    n = int(y.shape[0])
    if tuple(per.shape) != (n,):
        raise ValueError(
            f"the loss {loss_spec!r} gave shape {list(per.shape)} on outputs {list(out.shape)}; "
            f"expected one value per sample ({n})"
        )
    count = resolved.count(y)
    value = float(per.double().sum()) / max(count, 1)
    if not math.isfinite(value):
        raise ValueError(f"the loss {loss_spec!r} is not finite on the first {n} samples ({value})")
    shapes = {k: list(t.shape) for k, t in input_tensors(x).items()}
    return DryRunReport(
        n_params=sum(p.numel() for p in net.parameters()),
        n_trainable=sum(p.numel() for p in net.parameters() if p.requires_grad),
        inputs=shapes,
        input_shape=next(iter(shapes.values())),
        output_shape=list(out.shape),
        target_shape=list(y.shape),
        output_rule=rule,
        loss=resolved.name,
        loss_value=value,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        prefixes=prefixes,
        tied_filled=tied,
        seconds=time.perf_counter() - t0,
    )
