"""Stochastic trace estimation of curvature operators at a fixed budget of products.

* Hutchinson: ``tr(A) ≈ (1/m) Σ_i z_iᵀ A z_i`` with Rademacher ``z_i``; standard error
  ``std(z_iᵀ A z_i) / √m`` (sample std, ``ddof=1``).
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): with ``m = 2r + s`` products, draw Rademacher
  ``S [P, r]``, take an orthonormal basis ``Q`` of ``A S`` (``r`` products), compute ``tr(Qᵀ A Q)``
  exactly (``r`` products) and estimate the rest by Hutchinson on the deflated residual
  ``(I − QQᵀ) A (I − QQᵀ)`` with ``s`` Rademacher probes. Conditional on ``S`` the low-rank part is
  exact, so the estimator is unbiased with variance coming only from the residual samples:
  ``Var(gᵀRg) = 2(‖R‖_F² − Σ_i R_ii²) ≤ 2‖R‖_F²`` for Rademacher ``g``. The reported standard error
  is ``√(2 ‖R‖_F² / s)`` with ``‖R‖_F²`` estimated without bias by ``mean_i ‖R g_i‖²`` (the products
  are at hand): a slightly conservative bound that, unlike the sample std of ``s ≈ m/3`` skewed
  samples, does not collapse when a few residual eigenvalues dominate (coverage of ±2 stderr measured
  on tiny-MLP Hessian/GGN/Fisher, 300 seeds: sample std 84–90 %, this bound 94–96 %). Hutch++ is more accurate
  than Hutchinson when a few large eigenvalues dominate (as in deep-network Hessians), at equal cost.

Products are taken in blocks (``matmat``): one data pass serves a whole block of probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .curvature_setup import RecordingOperator, build_operator, now, spectral_meta
from .operators import LinearOperator, random_vectors
from .results import Result

TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True, kw_only=True)
class TraceResult(Result):
    """A trace estimate ``estimate ± stderr`` from ``n_matvecs`` products.

    ``samples``: the Hutchinson samples ``zᵀ A z`` (of the deflated residual for Hutch++);
    ``lowrank_trace``: ``tr(Qᵀ A Q)`` for Hutch++ (0 for Hutchinson).
    """

    estimate: float
    stderr: float
    n_matvecs: int
    method: str
    samples: torch.Tensor
    lowrank_trace: float = 0.0

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            [{"method": self.method, "estimate": self.estimate, "stderr": self.stderr,
              "n_matvecs": self.n_matvecs, "lowrank_trace": self.lowrank_trace}]
        )  # fmt: skip

    def interval(self, z: float = 2.0) -> tuple[float, float]:
        """``estimate ± z · stderr``."""
        return self.estimate - z * self.stderr, self.estimate + z * self.stderr

    def figure(self, *, title: str | None = None):
        """Running estimate over the stochastic samples with a ±2 stderr band at the end."""
        import plotly.graph_objects as go

        s = self.samples.double()
        run = (self.lowrank_trace + torch.cumsum(s, 0) / torch.arange(1, s.numel() + 1)).tolist()
        x = list(range(1, s.numel() + 1))
        lo, hi = self.interval()
        fig = go.Figure(go.Scatter(x=x, y=run, mode="lines+markers", name="running estimate"))
        fig.add_hrect(
            y0=lo, y1=hi, fillcolor="orange", opacity=0.2, line_width=0, annotation_text="±2 stderr"
        )
        fig.add_hline(y=self.estimate, line_dash="dash")
        fig.update_layout(
            title=title
            or f"Trace ({self.method}, {self.n_matvecs} products): {self.estimate:.6g} ± {self.stderr:.2g}",
            xaxis_title="stochastic samples",
            yaxis_title="trace estimate",
            template="plotly_white",
        )
        return fig


def _blocks(total: int, block: int) -> list[int]:
    return [min(block, total - lo) for lo in range(0, total, block)]


def _quadratic_forms(op: LinearOperator, Z: torch.Tensor, block: int) -> torch.Tensor:
    """``z_iᵀ A z_i`` for the columns of ``Z`` (float64), one ``matmat`` per block of columns."""
    out = []
    for lo, n in zip(range(0, Z.shape[1], block), _blocks(Z.shape[1], block)):
        Zb = Z[:, lo : lo + n]
        out.append((Zb.double() * op.matmat(Zb).double()).sum(dim=0))
    return torch.cat(out).cpu()


def hutchinson(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32
) -> tuple[float, float, torch.Tensor]:
    """Hutchinson with Rademacher probes: ``(estimate, stderr, samples)``."""
    if n_matvecs < 2:
        raise ValueError(f"hutchinson needs n_matvecs >= 2 for a standard error; got {n_matvecs}")
    Z = random_vectors(op.size, n_matvecs, seed=seed, dtype=op.dtype, device=op.device, kind="rademacher")
    s = _quadratic_forms(op, Z, block)
    return float(s.mean()), float(s.std() / math.sqrt(s.numel())), s


def hutch_plus_plus(
    op: LinearOperator, n_matvecs: int, *, seed: int = 0, block: int = 32
) -> tuple[float, float, torch.Tensor, float]:
    """Hutch++: ``(estimate, stderr, residual samples, tr(QᵀAQ))`` using exactly ``n_matvecs`` products.

    Split ``n_matvecs = 2r + s`` with ``r = n_matvecs // 3`` (``s ≥ r``, ``s ≥ 2``).
    """
    if n_matvecs < 4:
        raise ValueError(
            f"hutch++ needs n_matvecs >= 4 (sketch, projection, >= 2 residual probes); got {n_matvecs}"
        )
    r = min(n_matvecs // 3, op.size)
    s = n_matvecs - 2 * r
    probes = random_vectors(op.size, r + s, seed=seed, dtype=op.dtype, device=op.device, kind="rademacher")
    S, G = probes[:, :r], probes[:, r:]
    AS = torch.cat(
        [op.matmat(S[:, lo : lo + n]) for lo, n in zip(range(0, r, block), _blocks(r, block))], dim=1
    )
    Q, _ = torch.linalg.qr(AS.double())
    Q = Q.to(op.dtype)
    AQ = torch.cat(
        [op.matmat(Q[:, lo : lo + n]) for lo, n in zip(range(0, r, block), _blocks(r, block))], dim=1
    )
    low = float((Q.double() * AQ.double()).sum())
    Gp = G - Q @ (Q.T @ G)  # (I − QQᵀ) g
    samples, sq_norms = [], []
    for lo, n in zip(range(0, s, block), _blocks(s, block)):
        Gb = Gp[:, lo : lo + n]
        RGb = op.matmat(Gb)
        RGb = RGb - Q @ (Q.T @ RGb)  # R g with R = (I−QQᵀ)A(I−QQᵀ)
        samples.append((Gb.double() * RGb.double()).sum(dim=0))
        sq_norms.append(RGb.double().pow(2).sum(dim=0))
    res = torch.cat(samples).cpu()
    frob2 = float(torch.cat(sq_norms).mean())  # unbiased estimate of ‖R‖_F²
    return low + float(res.mean()), math.sqrt(2.0 * frob2 / s), res, low


def estimate_trace(
    op: LinearOperator, n_matvecs: int, *, method: str = "hutch++", seed: int = 0, block: int = 32
) -> tuple[float, float, torch.Tensor, float]:
    """Trace of any symmetric :class:`LinearOperator`: ``(estimate, stderr, samples, lowrank_trace)``."""
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}; got {method!r}")
    if isinstance(n_matvecs, bool) or not isinstance(n_matvecs, int):
        raise TypeError(f"n_matvecs must be an int; got {n_matvecs!r}")
    if method == "hutchinson":
        est, se, s = hutchinson(op, n_matvecs, seed=seed, block=block)
        return est, se, s, 0.0
    return hutch_plus_plus(op, n_matvecs, seed=seed, block=block)


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    loss: str | Callable = "auto",
    n_matvecs: int = 100,
    method: str = "hutch++",
    operator: str = "hessian",
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block: int = 32,
    reduce_fn: Callable | None = None,
    check_determinism: bool = True,
) -> TraceResult:
    """``tr(A)`` of the Hessian / GGN / Fisher of the dataset-mean loss with exactly ``n_matvecs`` products.

    ``method="hutch++"`` (default) or ``"hutchinson"`` (see the module docstring for both estimators
    and their standard errors). ``block`` probes share one ``matmat`` (one data pass).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}; got {method!r}")
    if isinstance(n_matvecs, bool) or not isinstance(n_matvecs, int):
        raise TypeError(f"n_matvecs must be an int; got {n_matvecs!r}")
    t0 = now()
    op = build_operator(
        model, data, operator=operator, loss=loss, params=params, batch_size=batch_size, mode=mode,
        dtype=dtype, device=device, reduce_fn=reduce_fn, seed=seed,
    )  # fmt: skip
    rec = RecordingOperator(op)
    est, se, samples, low = estimate_trace(rec, n_matvecs, method=method, seed=seed, block=block)
    settings = {"n_matvecs": n_matvecs, "method": method, "params": params, "batch_size": batch_size,
                "block": block}  # fmt: skip
    meta = spectral_meta(
        "hessian_trace", model, op, rec, started=t0, seed=seed, settings=settings,
        check_determinism=check_determinism, probes="rademacher",
        stderr_definition=(
            "std(z^T A z)/sqrt(m), Rademacher z" if method == "hutchinson"
            else "sqrt(2 mean||R g_i||^2 / s), R=(I-QQ^T)A(I-QQ^T), s residual probes; tr(Q^T A Q) exact"
        ),
    )  # fmt: skip
    return TraceResult(
        estimate=est, stderr=se, n_matvecs=rec.n_matvecs, method=method, samples=samples, lowrank_trace=low,
        meta=meta,
    )  # fmt: skip


__all__ = ["TraceResult", "TRACE_METHODS", "estimate_trace", "hessian_trace", "hutch_plus_plus", "hutchinson"]
