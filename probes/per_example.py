"""Per-example gradients ``g_i = ∇_θ ℓ(f(x_i; θ), y_i)`` by ``vmap(grad(functional_call))``, in chunks.

``g_i`` is the gradient of the *per-sample* loss (not divided by N), flattened in
``named_parameters`` order over the selected parameter block. The model is evaluated in eval
mode (BatchNorm running statistics, no dropout; a single-sample forward pass in train mode
would not be a per-example quantity) and the mode is restored afterwards.

Memory is bounded by ``chunk_size · P`` numbers: :func:`iter_per_example_gradients` yields one
``[B, P]`` block at a time, and :class:`GradientMoments` streams the sums a coherence / noise
scale estimate needs (``S = Σ g_i`` and ``Q = Σ ‖g_i‖²``), never an ``[N, N]`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from ..datasets.batching import Inputs, map_inputs, slice_inputs
from .functional import FunctionalModel, ParamSpace
from .losses import Loss, resolve_loss
from .validation import check_int


@dataclass
class PerExampleContext:
    """A resolved model/data/loss triple ready for per-example gradients (see :func:`prepare`).

    ``fm`` is the model's functional view (selected block, fixed tensors, eval mode); ``source`` the
    data in chunks on its device; ``backend`` ``"vmap"`` until an op without a vmap rule forces ``"loop"``.
    """

    fm: FunctionalModel
    loss: Loss
    source: Any
    backend: str = "vmap"

    @property
    def model(self) -> nn.Module:
        return self.fm.model

    @property
    def space(self) -> ParamSpace:
        return self.fm.space

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.fm.params

    def single_loss_fn(self) -> Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]:
        """``ℓ(params, x_i, y_i)`` for one sample (inputs without the batch dimension; every key of a
        dict of inputs is one sample's slice). A token loss is the mean over the sample's counted tokens
        (:meth:`Loss.count`), as the batch-mean loss of the other probes weighs them."""
        fm, loss = self.fm, self.loss

        def f(p: dict[str, torch.Tensor], x: Inputs, y: torch.Tensor) -> torch.Tensor:
            x1, y1 = map_inputs(x, lambda t: t.unsqueeze(0)), y.unsqueeze(0)
            li = loss.losses(fm(p, x1), y1, x1)[0]
            return li if loss.counts_samples else li / loss.counter(y1).clamp(min=1)

        return f


def prepare(
    model: nn.Module,
    data: Any,
    *,
    loss: str | Callable | Loss = "auto",
    params: Sequence[str] | str | None = None,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PerExampleContext:
    """Resolve parameters, batches (``chunk_size`` samples each) and the loss for per-example work."""
    check_int("chunk_size", chunk_size, min=1)
    fm = FunctionalModel(model, params=params, mode="eval", dtype=dtype, device=device)
    source = fm.batches(data, chunk_size)
    first_batch = next(iter(source))
    resolved = resolve_loss(loss, first_batch.y, model=fm.model, inputs=first_batch.x)
    fm.raw = resolved.takes_batch
    return PerExampleContext(fm=fm, loss=resolved, source=source)


def _loop_gradients(ctx: PerExampleContext, x: Inputs, y: torch.Tensor) -> torch.Tensor:
    """Reference/fallback: one autograd call per sample."""
    f = ctx.single_loss_fn()
    rows = []
    for i in range(y.shape[0]):
        p = {n: t.detach().requires_grad_(True) for n, t in ctx.params.items()}
        li = f(p, slice_inputs(x, i), y[i])
        gs = torch.autograd.grad(li, list(p.values()), allow_unused=True)
        rows.append(
            ctx.space.flatten([torch.zeros_like(t) if g is None else g for g, t in zip(gs, p.values())])
        )
    return torch.stack(rows)


def iter_per_example_gradients(
    ctx: PerExampleContext, *, out: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(G [B, P], y [B])`` per chunk; rows of ``G`` are the per-example gradients ``g_i``.

    With ``out`` (``[N, P]``), each chunk is written into its rows and ``G`` is a view of them (one copy).
    """
    gfn = vmap(grad(ctx.single_loss_fn()), in_dims=(None, 0, 0))
    row = 0
    with torch.no_grad(), ctx.fm.guard():
        for b in ctx.source:
            target = out[row : row + b.n] if out is not None else None
            row += b.n
            G = None
            if ctx.backend == "vmap":
                try:
                    with torch.enable_grad():
                        gd = gfn(ctx.params, b.x, b.y)
                    blocks = [gd[n].reshape(b.n, -1) for n in ctx.space.names]
                    G = (
                        torch.cat(blocks, dim=1, out=target)
                        if target is not None
                        else torch.cat(blocks, dim=1)
                    )
                except (RuntimeError, NotImplementedError):
                    ctx.backend = "loop"  # an op without a vmap rule: per-sample autograd from here on
            if G is None:
                with torch.enable_grad():
                    G = _loop_gradients(ctx, b.x, b.y)
                if target is not None:
                    target.copy_(G)
                    G = target
            yield G.detach(), b.y


def per_example_gradients(
    model: nn.Module,
    data: Any,
    *,
    loss: str | Callable | Loss = "auto",
    params: Sequence[str] | str | None = None,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """All per-example gradients as one ``[N, P]`` matrix (small problems; otherwise stream them
    with :func:`iter_per_example_gradients` / :class:`GradientMoments`)."""
    ctx = prepare(model, data, loss=loss, params=params, chunk_size=chunk_size, dtype=dtype, device=device)
    out = torch.empty(ctx.source.num_samples(), ctx.space.size, dtype=ctx.fm.dtype, device=ctx.fm.device)
    lo = 0
    for G, _ in iter_per_example_gradients(ctx, out=out):
        lo += G.shape[0]
    return out[:lo]


class GradientMoments:
    """Streamed first and second moments of a set of vectors ``g_1..g_N``, optionally per group.

    Keeps ``n``, ``S = Σ g_i`` (float64 ``[P]``) and ``Q = Σ ‖g_i‖²`` (float64); per group ``c``
    the same restricted to ``{i : group_i = c}``. Everything the coherence and noise-scale
    estimators need is a function of ``(n, ‖S‖², Q)``.
    """

    def __init__(self, size: int, n_groups: int = 0, device: torch.device | str | None = None) -> None:
        self.n = 0
        self.S = torch.zeros(size, dtype=torch.float64, device=device)
        self.Q = 0.0
        self.n_groups = n_groups
        self.group_n = torch.zeros(n_groups, dtype=torch.long)
        self.group_S = torch.zeros(n_groups, size, dtype=torch.float64, device=device) if n_groups else None
        self.group_Q = torch.zeros(n_groups, dtype=torch.float64)

    def update(self, G: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Add the rows of ``G [B, P]``; ``groups`` (int ``[B]``) assigns each row to a group."""
        G64 = G.to(torch.float64)
        sq = (G64 * G64).sum(dim=1)
        self.n += G64.shape[0]
        self.S += G64.sum(dim=0)
        self.Q += float(sq.sum())
        if self.group_S is not None and groups is not None:
            gi = groups.to(device=G64.device, dtype=torch.long)
            self.group_S.index_add_(0, gi, G64)
            self.group_n += torch.bincount(gi.cpu(), minlength=self.n_groups)
            self.group_Q.index_add_(0, gi.cpu(), sq.cpu())


__all__ = [
    "GradientMoments",
    "PerExampleContext",
    "iter_per_example_gradients",
    "per_example_gradients",
    "prepare",
]
