"""Shared plumbing of the Hessian-spectrum probes: operator construction, product recording, ``.meta``.

Every spectral probe (:mod:`.hessian`, :mod:`.trace`, :mod:`.density`) builds one
:class:`~dynascope.probes.operators.CurvatureOperator`, wraps it in :class:`RecordingOperator`
(which counts its products and checks afterwards that a product comes out the same twice) and
fills ``.meta`` with :func:`spectral_meta`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .operators import OPERATOR_KINDS, CurvatureOperator, LinearOperator, make_operator, random_vectors
from .results import make_meta


class RecordingOperator(LinearOperator):
    """Delegates to ``op``, counting only the products requested through it; :meth:`determinism`
    checks afterwards that a product comes out the same twice."""

    #: Products one determinism check costs (holding nothing while the algorithm runs).
    DETERMINISM_MATVECS = 2

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.size, op.dtype, op.device)
        self.inner = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.inner.matmat(V)

    def determinism(self, seed: int = 0) -> float:
        """``‖A v − A v‖ / ‖A v‖`` for one seeded random ``v`` evaluated twice in the same shape
        (a batched and a one-vector product may differ in rounding; that is not nondeterminism)."""
        v = random_vectors(self.size, 1, seed=seed, dtype=self.dtype, device=self.device)
        first, again = self.inner.matmat(v), self.inner.matmat(v)
        return float((again - first).norm()) / (float(first.norm()) or 1.0)


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

    ``n_matvecs`` counts the algorithm's operator-vector products; the determinism check (two
    more products, when enabled) is counted separately in ``determinism_matvecs``.
    """
    n_matvecs = rec.n_matvecs if rec is not None else op.n_matvecs
    n_passes = rec.n_passes if rec is not None else op.n_passes
    wall = time.perf_counter() - started
    det = rec.determinism() if (check_determinism and rec is not None) else None
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
        determinism_matvecs=RecordingOperator.DETERMINISM_MATVECS if det is not None else 0,
        deterministic=None if det is None else bool(det <= 1e-6),
        **extra,
    )


def now() -> float:
    return time.perf_counter()
