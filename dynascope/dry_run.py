"""A dry run of a model / data / loss spec triple before a run is created from it.

:func:`dry_run` builds the model from its spec, loads the first checkpoint (prefixes fitted, tied weights
filled), loads the data, runs one forward pass on the first samples (under the math SDPA backend, outputs
reduced to logits by the stated rule) and evaluates the loss on it, checking its shape: one finite value
per sample. Each failure is a ``ValueError`` naming the spec at fault and what was expected, so the CLI
(``dynascope import``) and the app's Runs page can refuse a bad triple before anything is written.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dynascope.datasets import load_spec
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
    input_shape: list[int]
    output_shape: list[int]
    target_shape: list[int]
    output_rule: str
    loss: str
    loss_value: float
    checkpoint: str | None = None
    prefixes: list[str] = field(default_factory=list)
    tied_filled: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph a person reads before accepting the run."""
        parts = [
            f"dry run ok: {self.n_params:,} parameters; inputs {self.input_shape} → outputs "
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
    x, y = split.train[0][:n_samples], split.train[1][:n_samples]
    net.eval()
    try:
        with torch.no_grad(), attention_kernels():
            raw = net(x)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"the data (spec {data!r}) does not fit the model (spec {model!r}): the forward pass on inputs "
            f"{list(x.shape)} ({x.dtype}) failed: {type(e).__name__}: {first}"
        ) from None
    rule = getattr(net, RULE_ATTR, None) or output_rule(raw)
    out = logits_of(raw)
    loss_spec = loss if loss is not None else "auto"
    try:
        resolved = resolve_loss(loss_spec, y)
        per = resolved.per_sample(out, y)
    except (ValueError, RuntimeError, IndexError) as e:
        raise ValueError(
            f"the loss {loss_spec!r} does not fit the model outputs {list(out.shape)} and targets "
            f"{list(y.shape)} ({y.dtype}): {str(e).splitlines()[0]}"
        ) from None
    if tuple(per.shape) != (x.shape[0],):
        raise ValueError(
            f"the loss {loss_spec!r} gave shape {list(per.shape)} on outputs {list(out.shape)}; "
            f"expected one value per sample ({x.shape[0]})"
        )
    count = resolved.count(y)
    value = float(per.double().sum()) / max(count, 1)
    if not math.isfinite(value):
        raise ValueError(f"the loss {loss_spec!r} is not finite on the first {x.shape[0]} samples ({value})")
    return DryRunReport(
        n_params=sum(p.numel() for p in net.parameters()),
        input_shape=list(x.shape),
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
