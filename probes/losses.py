"""Loss resolution shared by every probe.

A probe's objective is always the mean over the whole dataset,
``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)``, i.e. batches are weighted by their sample count.
A :class:`Loss` therefore exposes the *per-sample* loss ``ℓ`` (shape ``[B]``); probes sum it
over a batch and divide by the global sample count ``N``.

Built-in losses (``loss=`` argument of every probe):

* ``"cross_entropy"``: ``ℓ_i = −log softmax(f_i)[y_i]`` (integer targets).
* ``"mse"``: ``ℓ_i = mean_o (f_io − y_io)²`` (PyTorch's ``mse_loss`` convention, mean over outputs).
* ``"half_sse"``: ``ℓ_i = ½ Σ_o (f_io − y_io)²`` (the convention of the edge-of-stability papers).
* ``"auto"``: integer targets → ``cross_entropy``, floating targets → ``mse``.
* a callable ``fn(outputs, targets) -> scalar`` returning the *batch mean*, like ``nn.CrossEntropyLoss()``;
  its per-sample form is obtained by evaluating it on single-sample batches (``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import vmap

PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A resolved loss: its name and its per-sample form ``ℓ(outputs [B, ...], targets [B, ...]) -> [B]``."""

    name: str
    per_sample: PerSample

    def total(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ_i ℓ_i over the batch (divide by the dataset size for the mean)."""
        return self.per_sample(outputs, targets).sum()


def _flat_pair(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out2 = out.reshape(out.shape[0], -1)
    y2 = y.reshape(y.shape[0], -1).to(out2.dtype)
    if out2.shape != y2.shape:
        raise ValueError(
            f"regression loss: outputs {tuple(out.shape)} and targets {tuple(y.shape)} do not match"
        )
    return out2, y2


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() != 2:
        raise ValueError(f"cross_entropy expects outputs [B, C]; got {tuple(out.shape)}")
    if y.dim() != 1:
        raise ValueError(f"cross_entropy expects integer targets [B]; got {tuple(y.shape)}")
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    o, t = _flat_pair(out, y)
    return ((o - t) ** 2).mean(dim=1)


def _half_sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    o, t = _flat_pair(out, y)
    return 0.5 * ((o - t) ** 2).sum(dim=1)


BUILTIN_LOSSES: dict[str, PerSample] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "half_sse": _half_sse,
}


def _from_batch_mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> PerSample:
    def single(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fn(o.unsqueeze(0), t.unsqueeze(0))

    return vmap(single)


def resolve_loss(loss: str | Callable | Loss, targets: torch.Tensor | None = None) -> Loss:
    """Turn a ``loss=`` argument into a :class:`Loss`; ``"auto"`` looks at the targets' dtype."""
    if isinstance(loss, Loss):
        return loss
    if callable(loss):
        return Loss(getattr(loss, "__name__", type(loss).__name__), _from_batch_mean(loss))
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name, a callable or a Loss; got {type(loss).__name__}")
    if loss == "auto":
        if targets is None:
            raise ValueError("loss='auto' needs the targets to choose cross-entropy or MSE")
        loss = "mse" if targets.is_floating_point() else "cross_entropy"
    if loss not in BUILTIN_LOSSES:
        raise ValueError(
            f"unknown loss {loss!r}; choose one of {sorted(BUILTIN_LOSSES)}, 'auto' or a callable"
        )
    return Loss(loss, BUILTIN_LOSSES[loss])
