"""Comparing kernels with each other and with labels; parameter movement across checkpoints.

* Centering: ``K_c = C K C`` with ``C = I − 11ᵀ/N`` (for a full ``[N·O, N·O]`` kernel,
  ``C = (I_N − 11ᵀ/N) ⊗ I_O``: each output is centered over samples).
* Centered alignment (Cortes, Mohri & Rostamizadeh 2012):
  ``A(K, K') = ⟨K_c, K'_c⟩_F / (‖K_c‖_F ‖K'_c‖_F)`` ∈ [−1, 1] (∈ [0, 1] for PSD kernels).
* :func:`kernel_distance` ``= 1 − A(K0, K1)``. Fort et al. (2020) use the *uncentered* form
  ``1 − ⟨K0, K1⟩/(‖K0‖‖K1‖)``; we center by default (the constant direction that dominates an
  uncentered NTK would otherwise hide changes), ``centered=False`` gives their definition.
* :func:`kernel_alignment`: ``A(K, Y Yᵀ)`` (kernel-target alignment) with ``Y`` one-hot for integer
  labels, the targets themselves (as columns) for regression.
A degenerate kernel (zero norm after centering) gives ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _square(K: Any, what: str) -> torch.Tensor:
    if not isinstance(K, torch.Tensor):
        try:
            K = torch.as_tensor(K)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} must be a tensor or array; got {type(K).__name__}") from None
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty square matrix; got shape {tuple(K.shape)}")
    if not K.is_floating_point():
        K = K.double()
    if not bool(torch.isfinite(K).all()):
        raise ValueError(f"{what} has non-finite entries")
    return K.detach().double()


def center_kernel(K: torch.Tensor, n_outputs: int = 1) -> torch.Tensor:
    """``C K C`` with ``C = (I_N − 11ᵀ/N) ⊗ I_O`` for a sample-major kernel of size ``N·O``."""
    M = K.shape[0]
    if M % n_outputs:
        raise ValueError(f"kernel size {M} is not a multiple of n_outputs={n_outputs}")
    N, O = M // n_outputs, n_outputs
    K4 = K.reshape(N, O, N, O)
    K4 = K4 - K4.mean(dim=0, keepdim=True)
    K4 = K4 - K4.mean(dim=2, keepdim=True)
    return K4.reshape(M, M)


def center_targets(Y: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over samples (dim 0)."""
    return Y - Y.mean(dim=0, keepdim=True)


def target_matrix(y: Any, n_classes: int | None = None) -> torch.Tensor:
    """Targets as a float64 matrix ``[N, C]``: one-hot for integer labels ``[N]`` (``C = n_classes`` or
    ``max(y)+1``), a column for float ``[N]``, float ``[N, d]`` as is."""
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    y = y.detach()
    if y.dim() == 0 or y.shape[0] == 0:
        raise ValueError(f"targets need a leading, non-empty sample dimension; got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or not (y.is_floating_point() or y.is_complex()):
        if y.dim() != 1:
            raise ValueError(f"integer labels must be 1-D [N]; got shape {tuple(y.shape)}")
        if bool((y < 0).any()):
            raise ValueError("integer labels must be non-negative class indices")
        C = int(y.max()) + 1 if n_classes is None else n_classes
        if int(y.max()) >= C:
            raise ValueError(f"label {int(y.max())} is out of range for n_classes={C}")
        return torch.nn.functional.one_hot(y.long(), C).double()
    y = y.double()
    return y[:, None] if y.dim() == 1 else y.reshape(y.shape[0], -1)


def _alignment(A: torch.Tensor, B: torch.Tensor) -> float:
    na, nb = A.norm(), B.norm()
    if float(na) == 0.0 or float(nb) == 0.0:
        return math.nan
    return float((A * B).sum() / (na * nb))


def kernel_distance(K0: Any, K1: Any, *, centered: bool = True, n_outputs: int = 1) -> float:
    """``1 − ⟨K0c, K1c⟩_F / (‖K0c‖_F ‖K1c‖_F)``: 0 for proportional kernels, invariant to scaling.

    ``n_outputs`` > 1 centers a full sample-major ``[N·O, N·O]`` kernel per output.
    """
    A, B = _square(K0, "K0"), _square(K1, "K1")
    if A.shape != B.shape:
        raise ValueError(f"K0 and K1 must have the same shape; got {tuple(A.shape)} and {tuple(B.shape)}")
    if centered:
        A, B = center_kernel(A, n_outputs), center_kernel(B, n_outputs)
    return 1.0 - _alignment(A, B)


def kernel_alignment(K: Any, y: Any, *, centered: bool = True, n_classes: int | None = None) -> float:
    """Centered kernel-target alignment ``⟨K_c, T_c⟩_F / (‖K_c‖_F ‖T_c‖_F)``.

    ``y``: integer labels ``[N]`` (one-hot ``Y``), float ``[N]`` or ``[N, d]`` targets.
    ``K`` of size ``N``: target kernel ``T = Y Yᵀ``. ``K`` of size ``N·d`` (a full, sample-major NTK with
    ``d = O`` outputs): ``T = vec(Y) vec(Y)ᵀ`` with ``vec`` row-major, centered per output.
    """
    Kd = _square(K, "K")
    Y = target_matrix(y, n_classes).to(Kd.device)
    N, d = Y.shape
    M = Kd.shape[0]
    if M == N:
        O = 1
        if centered:
            Kd, Y = center_kernel(Kd), center_targets(Y)
        T = Y @ Y.T
    elif M == N * d:
        O = d
        if centered:
            Kd, Y = center_kernel(Kd, O), center_targets(Y)
        t = Y.reshape(-1)
        T = torch.outer(t, t)
    else:
        raise ValueError(
            f"kernel of size {M} does not match {N} targets (expected {N}, or {N}·{d} for a full kernel)"
        )
    return _alignment(Kd, T)


def kernel_velocity(
    Ks: Sequence[Any], steps: Sequence[float] | None = None, *, centered: bool = True, n_outputs: int = 1
) -> list[float]:
    """``d(K_t, K_{t+1}) / (s_{t+1} − s_t)`` for consecutive kernels (``len(Ks) − 1`` values);
    ``steps`` default ``0, 1, 2, …`` (then the plain consecutive distance). Steps must increase."""
    Ks = list(Ks)
    if len(Ks) < 2:
        raise ValueError(f"kernel_velocity needs at least two kernels; got {len(Ks)}")
    s = list(range(len(Ks))) if steps is None else [float(v) for v in steps]
    if len(s) != len(Ks):
        raise ValueError(f"got {len(Ks)} kernels but {len(s)} steps")
    if any(b <= a for a, b in zip(s, s[1:])):
        raise ValueError(f"steps must be strictly increasing; got {s}")
    return [
        kernel_distance(Ks[i], Ks[i + 1], centered=centered, n_outputs=n_outputs) / (s[i + 1] - s[i])
        for i in range(len(Ks) - 1)
    ]


def _param_tensors(obj: Any, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return {n: p.detach() for n, p in obj.named_parameters() if p.requires_grad}
    if isinstance(obj, Mapping):
        return {
            str(n): t.detach()
            for n, t in obj.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        }
    raise TypeError(f"{what} must be an nn.Module or a state dict; got {type(obj).__name__}")


def relative_param_change(model: Any, model0: Any) -> float:
    """``‖θ − θ0‖ / ‖θ0‖`` over the trainable parameters of a module (or the floating tensors of a
    state dict; a module and a state dict can be mixed: the module's parameter names are used)."""
    a, b = _param_tensors(model, "model"), _param_tensors(model0, "model0")
    names = list(a) if isinstance(model, nn.Module) else list(b) if isinstance(model0, nn.Module) else list(a)
    missing = [n for n in names if n not in a or n not in b]
    if missing:
        raise ValueError(f"model and model0 do not share parameters {missing[:5]}")
    diff = torch.zeros((), dtype=torch.float64)
    ref = torch.zeros((), dtype=torch.float64)
    for n in names:
        if a[n].shape != b[n].shape:
            raise ValueError(f"parameter {n!r} has shape {tuple(a[n].shape)} vs {tuple(b[n].shape)}")
        diff = diff + (a[n].double().cpu() - b[n].double().cpu()).pow(2).sum()
        ref = ref + b[n].double().cpu().pow(2).sum()
    if float(ref) == 0.0:
        return math.nan
    return float(diff.sqrt() / ref.sqrt())
