"""Dense float64 references shared by the tests: a symmetric matrix of given spectrum, a model as a function
of its flattened parameters, and the Hessian of a token loss by ``torch.autograd.functional.hessian`` (not
``torch.func.hessian``, wrong through LayerNorm in torch 2.13)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def flat_params(model: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """``(θ, unflat)``: the parameters flattened (detached) and ``unflat(θ')`` as ``{name: tensor}``."""
    named = list(model.named_parameters())
    shapes, numels = [p.shape for _, p in named], [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflat(th: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for (n, _), t, s in zip(named, torch.split(th, numels), shapes)}

    return theta, unflat


def flat_call(model: nn.Module) -> tuple[torch.Tensor, Callable[..., Any]]:
    """``(θ, call)``: the parameters flattened (detached) and ``call(θ', *inputs)``, the model's forward at
    parameters ``θ'`` (buffers as they are; attention on the math SDPA backend, which has double backward)."""
    theta, unflat = flat_params(model)

    def call(th: torch.Tensor, *inputs: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(model, unflat(th), inputs)

    return theta, call


def token_loss_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of the next-token cross-entropy (targets ``y`` shifted by one, ``-100`` ignored, mean
    over the counted tokens) in the model's parameters."""
    theta, call = flat_call(model)

    def f(th: torch.Tensor) -> torch.Tensor:
        out = call(th, x)
        o, t = out[:, :-1], y[:, 1:]
        ll = torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1), reduction="sum")
        return ll / (t != -100).sum()

    return torch.autograd.functional.hessian(f, theta)


def random_symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` (float64) with ``Q`` the orthogonal factor of a seeded Gaussian matrix."""
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(eigenvalues.double()) @ Q.T
