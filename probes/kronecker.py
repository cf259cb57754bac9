"""KFAC and EKFAC: Kronecker-factored approximations of the GGN for ``nn.Linear`` and ``nn.Conv2d`` layers
(Martens & Grosse 2015; Grosse & Martens 2016; George et al. 2018; the KFAC-expand convention of
Eschenhagen et al. 2023 for shared positions).

For the mean loss ``L = (1/N) Σ_n ℓ(f(x_n), y_n)`` with a model output ``f ∈ ℝ^C`` and ``S_n`` a square
root of the output Hessian, ``S_n S_nᵀ = ∇²_f ℓ_n`` (MSE in PyTorch's convention ``ℓ = (1/C) Σ_i (f_i −
y_i)²``: ``S = √(2/C) I``; cross-entropy: ``S = diag(√p) − p √pᵀ``), a layer with inputs ``a_{n,s}`` and
outputs ``z_{n,s}`` at ``s = 1 … T`` shared positions (``T = 1`` for a Linear on ``[N, d]``; the output
pixels of a convolution, whose inputs are the unfolded patches) has the would-be output gradients
``u_{n,s,c} = (∂f(x_n)/∂z_{n,s})ᵀ S_n e_c`` and the factors

    A = (1/(N T)) Σ_{n,s} a_{n,s} a_{n,s}ᵀ,        B = (1/N) Σ_{n,c} Σ_s u_{n,s,c} u_{n,s,c}ᵀ.

KFAC approximates the layer's diagonal GGN block by ``A ⊗ B``: a weight direction ``M`` (``[out, in]``)
maps to ``B M A`` and a bias direction ``m`` to ``B m`` (weight and bias as separate blocks; the other
layers' blocks are zero). EKFAC keeps the eigenbases ``A = Q_A diag(α) Q_Aᵀ``, ``B = Q_B diag(β) Q_Bᵀ`` and
replaces the eigenvalues ``β_i α_j`` by the second moments of the per-example gradients in that basis,

    Λ_ij = (1/N) Σ_{n,c} [Q_Bᵀ G_{n,c} Q_A]_ij²,    G_{n,c} = Σ_s u_{n,s,c} a_{n,s}ᵀ,

the diagonal of the exact GGN block in the KFAC eigenbasis; a weight direction maps to
``Q_B (Λ ⊙ (Q_Bᵀ M Q_A)) Q_Aᵀ`` (bias: ``Λ_i = (1/N) Σ_{n,c} [Q_Bᵀ Σ_s u_{n,s,c}]_i²``). These equal
curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` with ``fisher_type="type-2"``,
``kfac_approx="expand"`` and a ``reduction="mean"`` loss (``bench/bench_kfac.py``).

Memory: ``A`` and ``B`` per layer (``d_in² + d_out²``), the per-example gradients of one batch for EKFAC.
The eigenvalues of either operator (:meth:`KFACOperator.eigenvalues`) are the cheap spectrum at scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .operators import LinearOperator

_LOSSES = ("mse", "cross_entropy")
LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class _Layer:
    name: str
    module: nn.Linear | nn.Conv2d
    A: torch.Tensor | None = None  # [d_in, d_in] (weight) — None until computed
    B: torch.Tensor | None = None  # [d_out, d_out]
    alpha: torch.Tensor | None = None  # eigenvalues / vectors of A and B
    QA: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    QB: torch.Tensor | None = None
    lam_w: torch.Tensor | None = None  # EKFAC [d_out, d_in]
    lam_b: torch.Tensor | None = None  # EKFAC [d_out]


def _inputs_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, T, d_in]``: a Linear's inputs with the shared positions flattened, a Conv2d's unfolded
    patches (channel-major, the order of ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                "kfac: Conv2d with groups > 1, a padding mode or string padding is not supported"
            )
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _outputs_2d(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """``[N, T, d_out]`` of a layer's output (gradients), positions flattened."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _output_hessian_sqrt(out: torch.Tensor, loss: str) -> torch.Tensor:
    """``[N, C, C]`` square roots ``S_n`` of the per-example output Hessians (module docstring)."""
    n, c = out.shape
    if loss == "mse":
        return (2.0 / c) ** 0.5 * torch.eye(c, dtype=out.dtype, device=out.device).expand(n, c, c)
    p = out.softmax(dim=1)
    sp = p.sqrt()
    return torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]


def _second_moments(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Σ_{c,n} (Σ_t u_{c,n,t} a_{n,t}ᵀ)²`` (elementwise square) for ``u`` ``[C, N, T, d_out]`` and ``a``
    ``[N, T, d_in]``. With one position the gradient ``u aᵀ`` has rank one and its square is ``u² (a²)ᵀ``:
    no ``[N, d_out, d_in]`` tensor is formed; otherwise one column ``c`` at a time."""
    if a.shape[1] == 1:
        return torch.einsum("cni,nj->ij", u[:, :, 0].square(), a[:, 0].square())
    return sum(torch.einsum("nti,ntj->nij", uc, a).square().sum(dim=0) for uc in u)


class KFACOperator(LinearOperator):
    """KFAC (``ekfac=False``) or EKFAC of the GGN of ``model`` on ``data`` (module docstring) over the
    parameters of its ``nn.Linear`` / ``nn.Conv2d`` layers, in ``named_parameters`` order."""

    def __init__(self, model: nn.Module, data: Any, *, loss: str = "auto", ekfac: bool = False,
                 batch_size: int | None = None) -> None:  # fmt: skip
        from ..datasets.batching import as_batches

        self.model, self.ekfac = model, ekfac
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.layers = [_Layer(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]
        blocks = self._blocks()
        owned = {f"{lay.name}.{k}".lstrip(".") for lay, k, _ in blocks}
        other = [n for n, _ in params if n not in owned]
        if other:
            raise ValueError(
                f"kfac covers nn.Linear and nn.Conv2d layers only; {other} belong to other modules"
            )
        if not self.layers:
            raise ValueError("kfac: the model has no nn.Linear or nn.Conv2d layer")
        if len({id(p) for _, _, p in blocks}) != len(blocks):
            raise ValueError("kfac: layers that share a parameter (tied weights) are not supported")
        p0 = params[0][1]
        super().__init__(sum(p.numel() for _, p in params), p0.dtype, p0.device)
        self.source = as_batches(data, batch_size, device=p0.device)
        self.loss = self._resolve_loss(loss)
        self._factors()
        if ekfac:
            self._corrections()

    def _resolve_loss(self, loss: str) -> str:
        if loss == "auto":
            y = self.source.targets()
            return "cross_entropy" if not torch.is_floating_point(y) else "mse"
        if loss not in _LOSSES:
            raise ValueError(f"kfac supports the losses {_LOSSES} (or 'auto'); got {loss!r}")
        return loss

    def _columns(self, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """For one batch: each layer's inputs ``[n, T, d_in]`` and would-be output gradients
        ``[C, n, T, d_out]`` (one slice per column of ``S``)."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def fn(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                if name in inputs:
                    raise ValueError(
                        f"kfac: layer {name!r} is called more than once per forward (not supported)"
                    )
                inputs[name] = _inputs_2d(module, args[0].detach())
                outputs[name] = out

            return fn

        handles = [lay.module.register_forward_hook(hook(lay.name)) for lay in self.layers]
        try:
            out = self.model(batch.x)
        finally:
            for h in handles:
                h.remove()
        if out.dim() != 2:
            raise ValueError(f"kfac needs a [N, C] model output; got shape {tuple(out.shape)}")
        S = _output_hessian_sqrt(out.detach(), self.loss)
        zs = [outputs[lay.name] for lay in self.layers]
        cols: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in self.layers}
        for c in range(S.shape[-1]):
            grads = torch.autograd.grad(out, zs, grad_outputs=S[:, :, c], retain_graph=c < S.shape[-1] - 1)
            for lay, g in zip(self.layers, grads):
                cols[lay.name].append(_outputs_2d(lay.module, g))
        return inputs, {k: torch.stack(v) for k, v in cols.items()}

    def _factors(self) -> None:
        """``A`` and ``B`` of every layer, summed over batches (module docstring)."""
        n = self.source.num_samples()
        for batch in self.source:
            inputs, cols = self._columns(batch)
            for lay in self.layers:
                a, u = inputs[lay.name], cols[lay.name]
                A = torch.einsum("nti,ntj->ij", a, a) / (n * a.shape[1])
                B = torch.einsum("cnti,cntj->ij", u, u) / n
                lay.A = A if lay.A is None else lay.A + A
                lay.B = B if lay.B is None else lay.B + B
        for lay in self.layers:
            lay.alpha, lay.QA = torch.linalg.eigh(lay.A)
            lay.beta, lay.QB = torch.linalg.eigh(lay.B)

    def _corrections(self) -> None:
        """EKFAC's ``Λ`` of every layer from the per-example gradients in the KFAC eigenbasis."""
        n = self.source.num_samples()
        for batch in self.source:
            inputs, cols = self._columns(batch)
            for lay in self.layers:
                a, u = inputs[lay.name] @ lay.QA, cols[lay.name] @ lay.QB  # rotated
                lam_w = _second_moments(u, a) / n
                lam_b = u.sum(dim=2).square().sum(dim=(0, 1)) / n
                lay.lam_w = lam_w if lay.lam_w is None else lay.lam_w + lam_w
                lay.lam_b = lam_b if lay.lam_b is None else lay.lam_b + lam_b

    def _blocks(self) -> list[tuple[_Layer, str, torch.Tensor]]:
        return [
            (lay, k, p) for lay in self.layers for k, p in lay.module.named_parameters() if p.requires_grad
        ]

    def _apply(self, lay: _Layer, kind: str, M: torch.Tensor) -> torch.Tensor:
        """The block of ``lay``'s ``kind`` ("weight" ``[out, in, K]`` or "bias" ``[out, K]``) times ``M``."""
        if not self.ekfac:
            out = torch.einsum("ij,j...k->i...k", lay.B, M)
            return torch.einsum("ijk,jl->ilk", out, lay.A) if kind == "weight" else out
        if kind == "weight":
            rot = torch.einsum("ji,jlk,lm->imk", lay.QB, M, lay.QA) * lay.lam_w[:, :, None]
            return torch.einsum("ij,jlk,ml->imk", lay.QB, rot, lay.QA)
        return lay.QB @ ((lay.QB.T @ M) * lay.lam_b[:, None])

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out, lo = [], 0
        for lay, kind, p in self._blocks():
            hi = lo + p.numel()
            M = V[lo:hi].reshape(p.shape[0], -1, V.shape[1]) if kind == "weight" else V[lo:hi]
            out.append(self._apply(lay, kind, M).reshape(hi - lo, V.shape[1]))
            lo = hi
        return torch.cat(out)

    def eigenvalues(self) -> torch.Tensor:
        """Every eigenvalue of the operator, descending: ``β_i α_j`` (KFAC) or ``Λ_ij`` (EKFAC) per weight
        block and ``β_i`` / ``Λ_i`` per bias block."""
        vals = []
        for lay, kind, _ in self._blocks():
            if self.ekfac:
                vals.append((lay.lam_w if kind == "weight" else lay.lam_b).reshape(-1))
            else:
                vals.append(torch.outer(lay.beta, lay.alpha).reshape(-1) if kind == "weight" else lay.beta)
        return torch.cat(vals).sort(descending=True).values


def kfac(model: nn.Module, data: Any, *, loss: str = "auto", batch_size: int | None = None) -> KFACOperator:
    """The KFAC operator of ``model``'s GGN on ``data`` (module docstring)."""
    return KFACOperator(model, data, loss=loss, batch_size=batch_size)


def ekfac(model: nn.Module, data: Any, *, loss: str = "auto", batch_size: int | None = None) -> KFACOperator:
    """The EKFAC operator of ``model``'s GGN on ``data`` (module docstring)."""
    return KFACOperator(model, data, loss=loss, ekfac=True, batch_size=batch_size)


__all__ = ["KFACOperator", "ekfac", "kfac"]
