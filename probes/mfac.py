"""M-FAC: products with the inverse of a damped empirical Fisher built from a window of ``m`` gradients
(Frantar, Kurtic & Alistarh, 2021).

With gradients ``g_1 … g_m`` (the rows of ``R ∈ ℝ^{m×d}``) and damping ``λ > 0``,

    F̂ = λ I + (1/m) Σ_i g_i g_iᵀ = λ I + Rᵀ R / m,
    F̂⁻¹ v = (v − Rᵀ (mλ I_m + R Rᵀ)⁻¹ R v) / λ        (Woodbury).

After an ``O(d m²)`` setup (the ``m × m`` Gram matrix ``R Rᵀ`` and its Cholesky factor) each product costs
``O(d m)``, two passes over ``R``: M-FAC's cost; its recursive rank-one (Sherman–Morrison) form computes
the same matrix. The spectrum of ``F̂`` is ``λ`` plus the eigenvalues of ``R Rᵀ / m`` (at most ``m`` of
them; the other ``d − m`` equal ``λ``), which makes it a cheap spectrum at scale. Memory: ``R``, ``d·m``
numbers.

:func:`gradient_window` makes the window from data: the mean loss gradients of ``m`` consecutive batches
(each ``g_i = ∇ (1/|B_i|) Σ_{n∈B_i} ℓ_n``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .operators import LinearOperator
from .validation import check_float, check_int


class MFACInverse(LinearOperator):
    """``F̂⁻¹ = (λI + RᵀR/m)⁻¹`` for gradient rows ``grads`` ``[m, d]`` and damping ``λ`` (module
    docstring); :meth:`fisher` is ``F̂`` itself and :meth:`eigenvalues` its top ``m`` eigenvalues."""

    def __init__(self, grads: torch.Tensor, damping: float) -> None:
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
            raise ValueError(
                f"grads must be an [m, d] tensor of m ≥ 1 gradients; got {getattr(grads, 'shape', grads)}"
            )
        if not bool(torch.isfinite(grads).all()):
            raise ValueError("grads hold NaN or Inf")
        self.damping = check_float("damping", damping, min=0.0)
        if self.damping <= 0:
            raise ValueError(f"damping must be > 0 (λI keeps F̂ invertible); got {damping!r}")
        super().__init__(grads.shape[1], grads.dtype, grads.device)
        self.R = grads
        self.m = grads.shape[0]
        gram = grads @ grads.T
        eye = torch.eye(self.m, dtype=grads.dtype, device=grads.device)
        self._chol = torch.linalg.cholesky(gram + self.m * self.damping * eye)
        self._gram = gram

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        inner = torch.cholesky_solve(self.R @ V, self._chol)
        return (V - self.R.T @ inner) / self.damping

    def fisher(self, V: torch.Tensor) -> torch.Tensor:
        """``F̂ V = λV + Rᵀ(RV)/m`` (``V`` ``[d, K]``)."""
        return self.damping * V + self.R.T @ (self.R @ V) / self.m

    def eigenvalues(self) -> torch.Tensor:
        """The ``min(m, d)`` largest eigenvalues of ``F̂`` (descending): ``λ + eig(R Rᵀ / m)``."""
        ev = torch.linalg.eigvalsh(self._gram / self.m).flip(0)[: min(self.m, self.size)]
        return self.damping + ev.clamp_min(0)


def gradient_window(
    model: nn.Module,
    data: Any,
    m: int,
    *,
    loss: str | Callable = "auto",
    params: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[m, P]``: the mean-loss gradients of ``m`` consecutive batches of ``data`` (sizes differ by at
    most one sample), over the parameters ``params`` (default: all that require grad)."""
    from .per_example import per_example_gradients

    check_int("m", m, min=1)
    G = per_example_gradients(model, data, loss=loss, params=params, dtype=dtype, device=device)
    if m > G.shape[0]:
        raise ValueError(
            f"gradient_window: m = {m} batches need at least {m} samples; the data has {G.shape[0]}"
        )
    return torch.stack([chunk.mean(dim=0) for chunk in torch.tensor_split(G, m)])


def mfac_inverse(
    model: nn.Module,
    data: Any,
    *,
    m: int = 32,
    damping: float = 1e-3,
    loss: str | Callable = "auto",
    params: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> MFACInverse:
    """:class:`MFACInverse` of the damped empirical Fisher of ``m`` batch gradients of ``data``
    (:func:`gradient_window`)."""
    grads = gradient_window(model, data, m, loss=loss, params=params, dtype=dtype, device=device)
    return MFACInverse(grads, damping)


__all__ = ["MFACInverse", "gradient_window", "mfac_inverse"]
