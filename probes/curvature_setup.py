"""Shared plumbing of the Hessian-spectrum probes: operator construction, product recording, ``.meta``.

Every spectral probe (:mod:`.hessian`, :mod:`.trace`, :mod:`.density`) builds one
:class:`~dynascope.probes.operators.CurvatureOperator`, wraps it in :class:`RecordingOperator`
(which keeps the first product so that a determinism check costs one extra product, not two) and
fills ``.meta`` with :func:`spectral_meta`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .operators import OPERATOR_KINDS, CurvatureOperator, LinearOperator, make_operator
from .results import make_meta


class RecordingOperator(LinearOperator):
    """Delegates to ``op``; remembers the first column product ``(v, A v)`` for :meth:`determinism`.

    ``n_matvecs`` / ``n_passes`` count only the products requested through this wrapper.
    """

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.size, op.dtype, op.device)
        self.inner = op
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.inner.matmat(V)
        if self._first is None:
            self._first = (V[:, 0].clone(), out[:, 0].clone())
        return out

    def determinism(self) -> float:
        """``‖A v − A v‖ / ‖A v‖`` between the first recorded product and a recomputation (1 product)."""
        if self._first is None:
            return float("nan")
        v, av = self._first
        again = self.inner.matvec(v)
        return float((again - av).norm()) / (float(av.norm()) or 1.0)


def check_common(operator: str, mode: str, seed: Any) -> None:
    """Validate the arguments every spectral probe shares (clear errors before any work)."""
    if operator not in OPERATOR_KINDS:
        raise ValueError(f"unknown operator {operator!r}; choose one of {OPERATOR_KINDS}")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")


def build_operator(
    model: nn.Module,
    data: Any,
    *,
    operator: str,
    loss: Any,
    params: Sequence[str] | str | None,
    batch_size: int | None,
    mode: str,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    reduce_fn: Callable | None,
    seed: Any = 0,
    backend: str = "auto",
) -> CurvatureOperator:
    """Validate the shared arguments and build the curvature operator."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_common(operator, mode, seed)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise TypeError(f"batch_size must be an int or None; got {batch_size!r}")
    return make_operator(
        model,
        data,
        operator=operator,
        loss=loss,
        params=params,
        batch_size=batch_size,
        mode=mode,
        dtype=dtype,
        device=device,
        reduce_fn=reduce_fn,
        backend=backend,
    )


def spectral_meta(
    probe: str,
    model: nn.Module,
    op: CurvatureOperator,
    rec: RecordingOperator | None,
    *,
    started: float,
    seed: int,
    settings: dict[str, Any],
    check_determinism: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The ``.meta`` block of a spectral probe.

    ``n_matvecs`` counts the algorithm's operator-vector products; the determinism check (one
    more product, when enabled) is counted separately in ``determinism_matvecs``.
    """
    n_matvecs = rec.n_matvecs if rec is not None else op.n_matvecs
    n_passes = rec.n_passes if rec is not None else op.n_passes
    wall = time.perf_counter() - started
    det = rec.determinism() if (check_determinism and rec is not None) else None
    stochastic = _stochastic_modules(model) if op.mode == "train" else []
    _warn_nondeterministic(probe, det, stochastic)
    return make_meta(
        probe,
        model=model,
        params=settings,
        operator=op.kind,
        loss=op.loss.name,
        reduction=f"mean over {op.num_samples} samples",
        n_samples=op.num_samples,
        n_params=op.size,
        n_matvecs=n_matvecs,
        n_passes=n_passes,
        wall_time_s=wall,
        dtype=str(op.dtype),
        device=str(op.device),
        seed=seed,
        mode=op.mode,
        backend=op.backend,
        determinism_rel_diff=det,
        determinism_matvecs=1 if det is not None else 0,
        deterministic=None if det is None else bool(det <= 1e-6),
        stochastic_modules=stochastic,
        **extra,
    )


def _stochastic_modules(model: nn.Module) -> list[str]:
    """Dropout modules with p > 0: in train mode each product draws new masks."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0
    ]


def _warn_nondeterministic(probe: str, det: float | None, stochastic: list[str]) -> None:
    if stochastic or (det is not None and det > 1e-6):
        why = f"mode='train' with dropout ({', '.join(stochastic[:5])})" if stochastic else "the model"
        measured = f"; two products of the same vector differ by {det:.2g} (relative)" if det else ""
        warnings.warn(
            f"{probe}: {why} makes the curvature operator random, so results change between calls"
            f"{measured}. Use mode='eval' for reproducible numbers (recorded in .meta: "
            "'stochastic_modules', 'determinism_rel_diff')",
            UserWarning,
            stacklevel=4,
        )


def now() -> float:
    return time.perf_counter()
