"""Shared plumbing of the Hessian-spectrum probes: product recording, the determinism check, ``.meta``.

Every spectral probe (:mod:`.hessian`, :mod:`.trace`, :mod:`.density`) builds one
:class:`~dynascope.probes.operators.CurvatureOperator` from an
:class:`~dynascope.probes.operators.OperatorSpec`, wraps it in :class:`RecordingOperator` (which keeps
the first product so that a determinism check costs one extra product, not two) and fills ``.meta``
with :func:`spectral_meta` (the operator's keys from ``CurvatureOperator.meta()``, as in every probe
that uses an operator).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .operators import CurvatureOperator, LinearOperator
from .results import make_meta

#: A recomputed product is deterministic when it agrees with the first to within this many units of
#: the operator dtype's machine epsilon, relatively (float64: 1.8e-15, float32: 9.5e-7); products on
#: CPU repeat bit for bit, so the check flags nondeterministic kernels and train-mode randomness.
DETERMINISM_EPS_MULTIPLE = 8


def determinism_rtol(dtype: torch.dtype) -> float:
    """``DETERMINISM_EPS_MULTIPLE · eps(dtype)``: the largest relative difference still deterministic."""
    return DETERMINISM_EPS_MULTIPLE * torch.finfo(dtype).eps


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
    rtol = determinism_rtol(op.dtype)
    return make_meta(
        probe,
        model=model,
        params=settings,
        **op.meta(),
        n_matvecs=n_matvecs,
        n_passes=n_passes,
        wall_time_s=wall,
        seed=seed,
        determinism_rel_diff=det,
        determinism_matvecs=1 if det is not None else 0,
        determinism_rtol=rtol if det is not None else None,
        deterministic=None if det is None else bool(det <= rtol),
        **extra,
    )
