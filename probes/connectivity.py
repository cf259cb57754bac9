"""Linear mode connectivity: loss and accuracy along the straight line between two networks.

``θ(α) = (1 − α) θ_A + α θ_B`` for every floating parameter and floating buffer, ``α`` on a uniform grid
of ``n_points`` values in [0, 1] (ends included). Integer buffers (BatchNorm's ``num_batches_tracked``)
are never interpolated: they keep model A's values. The loss ``L(θ) = (1/N) Σ_i ℓ_i`` is the mean over
the whole dataset (batches weighted by sample count), evaluated in eval mode.

* loss barrier ``B = max_α [ L(θ(α)) − ((1 − α) L(θ(0)) + α L(θ(1))) ]`` (≥ 0, as the ends are on the grid);
* accuracy barrier ``max_α [ ((1 − α) A(θ(0)) + α A(θ(1))) − A(θ(α)) ]`` (the drop below the chord);
* layer-wise barriers: for each layer group ``g`` (default: the modules that own parameters), the same
  barrier along the path that interpolates only ``g``'s tensors while all others stay at model A's
  values (the chord joins that path's own end points);
* BatchNorm statistics are re-estimated at every ``α`` (``reset_bn=True``): running statistics are reset,
  then one pass over ``bn_reset_data`` with only the BatchNorm modules in train mode and no gradients,
  with momentum ``n_b / n_seen`` for a batch of ``n_b`` samples — the sample-weighted average of the batch
  means and of the (unbiased) batch variances, which equals PyTorch's ``momentum=None`` average for equal
  batch sizes. Integer buffers are restored to model A's values afterwards.

Alignment before interpolation (``align=``): ``"weights"`` (weight matching) or ``"activations"``
(activation matching, on ``data``) permutes model B's hidden units first (see ``alignment``); the
unaligned path is then computed as well for comparison (``compare_unaligned=True``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..datasets.batching import BatchSource, as_batches
from ..models.outputs import logits_of
from .functional import ModeGuard, check_finite, forward
from .losses import Loss, resolve_loss
from .results import Result, make_meta
from .validation import check_choice, check_int

__all__ = ["LMCResult", "lmc_barrier", "interpolate_state", "reestimate_batchnorm", "evaluate", "barrier_of"]


@dataclass(frozen=True, kw_only=True)
class LMCResult(Result):
    """Loss/accuracy along the linear path (after alignment, if any) and the barriers (module docstring)."""

    alphas: list[float]
    losses: list[float]
    accuracies: list[float] | None
    barrier: float
    barrier_accuracy: float | None
    align: str | None
    losses_unaligned: list[float] | None = None
    accuracies_unaligned: list[float] | None = None
    barrier_unaligned: float | None = None
    barrier_accuracy_unaligned: float | None = None
    layerwise: dict[str, float] | None = None
    layerwise_losses: dict[str, list[float]] | None = None

    def to_frame(self):  # -> pandas.DataFrame
        """One row per α: loss, accuracy (and the unaligned path's when computed), barriers repeated."""
        import pandas as pd

        cols: dict[str, Any] = {"alpha": self.alphas, "loss": self.losses}
        if self.accuracies is not None:
            cols["accuracy"] = self.accuracies
        if self.losses_unaligned is not None:
            cols["loss_unaligned"] = self.losses_unaligned
        if self.accuracies_unaligned is not None:
            cols["accuracy_unaligned"] = self.accuracies_unaligned
        frame = pd.DataFrame(cols)
        frame["barrier"] = self.barrier
        if self.barrier_unaligned is not None:
            frame["barrier_unaligned"] = self.barrier_unaligned
        return frame

    def layerwise_frame(self):  # -> pandas.DataFrame
        """One row per layer group (empty when not computed): ``barrier`` (the rise above the chord, as
        for the whole path), ``max_rise`` = max_α L(α) − L(0), the loss increase over model A when only
        that group moves towards B, and ``end_loss`` = L(1), A's network with B's group. The barrier is 0
        when the path stays under its chord, e.g. when swapping the group alone breaks the network."""
        import pandas as pd

        items = list((self.layerwise or {}).items())
        paths = self.layerwise_losses or {}
        rise = [max(paths[k]) - paths[k][0] if paths.get(k) else None for k, _ in items]
        end = [paths[k][-1] if paths.get(k) else None for k, _ in items]
        return pd.DataFrame(
            {
                "group": [k for k, _ in items],
                "barrier": [v for _, v in items],
                "max_rise": rise,
                "end_loss": end,
            }
        )


# --------------------------------------------------------------------------- building blocks
def interpolate_state(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    alpha: float,
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``(1 − α) a + α b`` for floating tensors (restricted to ``keys`` when given); everything else,
    integer buffers included, is model A's value."""
    out = {}
    for k, a in state_a.items():
        if a.is_floating_point() and (keys is None or k in keys):
            b = state_b[k].to(device=a.device, dtype=a.dtype)
            out[k] = a.clone() if alpha == 0 else b.clone() if alpha == 1 else torch.lerp(a, b, float(alpha))
        else:
            out[k] = a.clone()
    return out


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def reestimate_batchnorm(model: nn.Module, data: BatchSource | Any) -> int:
    """Reset and re-estimate every BatchNorm's running statistics in place (module docstring): one pass,
    only BatchNorm modules in train mode, no gradients, sample-weighted momentum. Integer buffers
    (``num_batches_tracked``) are restored. Returns the number of samples seen (0: no BatchNorm)."""
    bns = _batchnorms(model)
    if not bns:
        return 0
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
    seen = 0
    try:
        with ModeGuard(model, "eval"), torch.no_grad():
            for bn in bns:
                bn.reset_running_stats()
                bn.train()
            for batch in data:
                if batch.n < 2:
                    continue  # train-mode BatchNorm needs more than one value per channel
                seen += batch.n
                for bn in bns:
                    bn.momentum = batch.n / seen
                forward(model, batch.x)
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
    if seen == 0:
        raise ValueError("BatchNorm re-estimation needs batches of at least 2 samples")
    return seen


def _is_onehot(y: torch.Tensor, out: torch.Tensor) -> bool:
    return (
        y.is_floating_point()
        and y.dim() == 2
        and y.shape == out.shape
        and y.shape[1] > 1
        and bool(((y == 0) | (y == 1)).all())
        and bool((y.sum(1) == 1).all())
    )


def evaluate(model: nn.Module, data: BatchSource, loss: Loss) -> tuple[float, float | None]:
    """Dataset-mean loss ``(1/N) Σ_i ℓ_i`` (float64 accumulation) and accuracy (``None`` unless targets
    are integer labels or one-hot rows with outputs ``[B, C]``), in eval mode without gradients."""
    total, correct, n, classification = 0.0, 0, 0, True
    with ModeGuard(model, "eval"), torch.no_grad():
        for batch in data:
            raw = forward(model, batch.x)
            out = raw if loss.takes_batch else logits_of(raw)
            total += float(loss.losses(out, batch.y, batch.x).to(torch.float64).sum())
            n += batch.n if loss.counts_samples else loss.count(batch.y)
            if classification:
                if not loss.counts_samples:
                    classification = False
                elif not batch.y.is_floating_point() and batch.y.dim() == 1 and out.dim() == 2:
                    correct += int((out.argmax(1) == batch.y).sum())
                elif _is_onehot(batch.y, out):
                    correct += int((out.argmax(1) == batch.y.argmax(1)).sum())
                else:
                    classification = False
    if n == 0:
        raise ValueError("the data holds no samples")
    return total / n, (correct / n if classification else None)


def barrier_of(alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """``max_α [v(α) − chord(α)]`` (loss) or ``max_α [chord(α) − v(α)]`` (accuracy).

    The chord runs through the two end values."""
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    chord = v[0] + a * (v[-1] - v[0])  # exact when both ends are equal
    gap = chord - v if higher_is_better else v - chord
    return float(gap.max())


def exact_spectral_norms(model: nn.Module) -> int:
    """Set every spectral-norm parametrization's power-iteration vectors ``u, v`` to the leading singular
    vectors of its weight (SVD), so that the eval-mode ``σ = uᵀ W v`` is the exact ``σ_max(W)`` of the
    current weights; ``u, v`` are functions of the weights, not state to interpolate. Returns how many."""
    from torch.nn.utils import parametrize

    n = 0
    with torch.no_grad():
        for module in model.modules():
            if not parametrize.is_parametrized(module):
                continue
            for plist in module.parametrizations.values():
                for p in plist:
                    if type(p).__name__ != "_SpectralNorm" or not hasattr(p, "_u"):
                        continue
                    W = p._reshape_weight_to_matrix(plist.original)
                    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
                    p._u.copy_(U[:, 0])
                    p._v.copy_(Vh[0])
                    n += 1
    return n


def _path(
    work: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    alphas: np.ndarray,
    data: BatchSource,
    bn_data: BatchSource | None,
    loss: Loss,
    keys: set[str] | None = None,
) -> tuple[list[float], list[float] | None]:
    losses, accs = [], []
    for alpha in alphas:
        work.load_state_dict(interpolate_state(state_a, state_b, float(alpha), keys))
        exact_spectral_norms(work)
        if bn_data is not None:
            reestimate_batchnorm(work, bn_data)
        value, acc = evaluate(work, data, loss)
        losses.append(value)
        accs.append(acc)
    return losses, (None if any(a is None for a in accs) else [float(a) for a in accs])


def _layer_groups(model: nn.Module) -> dict[str, set[str]]:
    """Default layer groups: state keys (parameters and floating buffers) grouped by owning module, for
    modules that own parameters."""
    owners = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
    groups: dict[str, set[str]] = {}
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        if owner in owners:
            groups.setdefault(owner or "(root)", set()).add(key)
    return groups


def _pair_states(model_a: nn.Module, model_b: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Model A's state (a copy) and model B's, after checking both are finite modules of one architecture."""
    for label, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{label} must be a torch.nn.Module; got {type(m).__name__}")
        check_finite(m, label)
    state_a = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
    state_b = model_b.state_dict()
    if state_a.keys() != state_b.keys():
        missing = sorted(set(state_a) ^ set(state_b))[:5]
        raise ValueError(f"model_a and model_b have different state dict keys (e.g. {missing})")
    for k, v in state_a.items():
        if v.shape != state_b[k].shape:
            raise ValueError(
                f"model_a and model_b disagree on {k!r}: {tuple(v.shape)} vs {tuple(state_b[k].shape)}"
            )
    return state_a, state_b


def _aligned_state(
    model_a: nn.Module, model_b: nn.Module, align: str | None, source: Any, max_iter: int, seed: int
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Model B's state, its hidden units permuted to match model A's when ``align``, and what the
    alignment reported."""
    if align is None:
        return {k: v.detach() for k, v in model_b.state_dict().items()}, None
    from .alignment import activation_matching_permutations, apply_permutations, weight_matching_permutations

    if align == "weights":
        al = weight_matching_permutations(model_a, model_b, max_iter=max_iter, seed=seed)
    else:
        al = activation_matching_permutations(model_a, model_b, source)
    aligned = apply_permutations(model_b, al.perms)
    info = {"method": al.method, "n_iter": al.n_iter, "converged": al.converged, "objective": al.objective}
    return {k: v.detach() for k, v in aligned.state_dict().items()}, info


def _groups(
    layerwise: bool | Mapping[str, Sequence[str]], model_a: nn.Module, state_a: Mapping[str, Tensor]
) -> dict[str, set[str]]:
    """The state-dict keys of each layer group: the given prefixes, or the modules owning parameters."""
    if not isinstance(layerwise, Mapping):
        return _layer_groups(model_a)
    groups = {
        g: {k for k in state_a if any(k == pre or k.startswith(pre + ".") for pre in prefixes)}
        for g, prefixes in layerwise.items()
    }
    empty = [g for g, keys in groups.items() if not keys]
    if empty:
        raise ValueError(f"layer groups {empty} match no state-dict keys")
    return groups


# --------------------------------------------------------------------------- probe
def lmc_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    n_points: int = 25,
    align: str | None = None,
    loss: str | Any = "auto",
    bn_reset_data: Any = None,
    reset_bn: bool = True,
    layerwise: bool | Mapping[str, Sequence[str]] = False,
    compare_unaligned: bool = True,
    batch_size: int | None = 1024,
    max_iter: int = 100,
    seed: int = 0,
) -> LMCResult:
    """Loss / accuracy along ``θ(α) = (1−α)θ_A + αθ_B`` and the barriers (module docstring).

    ``align``: ``None``, ``"weights"`` or ``"activations"`` (permute model B first). ``bn_reset_data``:
    data for BatchNorm re-estimation (default ``data``). ``layerwise``: ``True`` for the default groups
    (modules owning parameters) or a mapping group → state-key prefixes. ``max_iter``/``seed``: weight
    matching. The inputs are not modified (a copy of model A is evaluated).
    """
    started = time.perf_counter()
    check_int("n_points", n_points, min=2)
    check_choice("align", align, (None, "weights", "activations"))
    state_a, state_b_raw = _pair_states(model_a, model_b)
    p = next(iter(model_a.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    source = as_batches(data, batch_size, device=device)
    first = next(iter(source), None)
    if first is None:
        raise ValueError("the data holds no samples")
    resolved = resolve_loss(loss, first.y, model=model_a, inputs=first.x)
    has_bn = reset_bn and bool(_batchnorms(model_a))
    bn_source = as_batches(bn_reset_data if bn_reset_data is not None else data, batch_size, device=device)
    bn_source = bn_source if has_bn else None
    alphas = np.linspace(0.0, 1.0, n_points)
    work = copy.deepcopy(model_a)
    n_spectral = exact_spectral_norms(work)

    state_b, alignment_info = _aligned_state(model_a, model_b, align, source, max_iter, seed)
    state_b = {k: v.to(device) for k, v in state_b.items()}

    losses, accs = _path(work, state_a, state_b, alphas, source, bn_source, resolved)
    extra: dict[str, Any] = {}
    if align is not None and compare_unaligned:
        raw = {k: v.detach().to(device) for k, v in state_b_raw.items()}
        lu, au = _path(work, state_a, raw, alphas, source, bn_source, resolved)
        extra.update(
            losses_unaligned=lu,
            accuracies_unaligned=au,
            barrier_unaligned=barrier_of(alphas, lu),
            barrier_accuracy_unaligned=barrier_of(alphas, au, higher_is_better=True) if au else None,
        )
    if layerwise:
        groups = _groups(layerwise, model_a, state_a)
        lw, lw_losses = {}, {}
        for g, keys in groups.items():
            lg, _ = _path(work, state_a, state_b, alphas, source, bn_source, resolved, keys)
            lw[g], lw_losses[g] = barrier_of(alphas, lg), lg
        extra.update(layerwise=lw, layerwise_losses=lw_losses)

    meta = make_meta(
        "lmc_barrier",
        model=model_a,
        params={
            "n_points": n_points,
            "align": align,
            "reset_bn": reset_bn,
            "batch_size": batch_size,
            "layerwise": bool(layerwise),
            "max_iter": max_iter,
            "seed": seed,
        },
        started=started,
        mode="eval",
        loss=resolved.name,
        reduction="mean over the dataset (batches weighted by sample count)",
        batchnorm_reestimated=has_bn,
        integer_buffers="model A's values, never interpolated",
        spectral_norm=(
            f"σ of {n_spectral} spectral-norm weight(s) recomputed exactly (SVD) at every point and end"
            if n_spectral else None
        ),
        alignment=alignment_info,
        checkpoint_hash_b=getattr(model_b, "dynascope_checkpoint_hash", None),
    )
    return LMCResult(
        meta=meta,
        alphas=alphas.tolist(),
        losses=losses,
        accuracies=accs,
        barrier=barrier_of(alphas, losses),
        barrier_accuracy=barrier_of(alphas, accs, higher_is_better=True) if accs else None,
        align=align,
        **extra,
    )
