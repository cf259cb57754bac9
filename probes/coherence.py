"""Gradient coherence, m-coherence and the gradient noise scale from streamed per-example gradients.

With per-example gradients ``g_1..g_N`` (of the per-sample loss), ``S = Σ_i g_i`` and
``Q = Σ_i ‖g_i‖²`` (one pass, no pairwise matrix; note ``Σ_{i≠j} g_i·g_j = ‖S‖² − Q``):

* coherence over **distinct pairs** (i = j excluded; the U-statistic, an unbiased estimate of
  ``E[g·g'] / E[g·g]`` for independent examples g, g')::

      α = E_{i≠j}[g_i·g_j] / E_i[‖g_i‖²] = (‖S‖² − Q) / ((N − 1) Q)          ∈ [−1/(N−1), 1]

* the same with i = j pairs counted (independent draws with replacement, Chatterjee & Zielinski's
  α of a finite sample)::  ``α_self = ‖S‖² / (N Q) = ‖mean g‖² / mean ‖g‖²``.
* m-coherence (Chatterjee & Zielinski 2022, "On the generalization mystery in deep learning"):
  ``m · α_self`` of a sample of m examples — 1 for orthogonal equal-norm gradients, m for identical
  ones. For a uniformly random m-subset M of the N examples the ratio of expectations is exact::

      α_m = E‖Σ_{i∈M} g_i‖² / E Σ_{i∈M} ‖g_i‖² = 1 + (m − 1) α            (m = N: ‖S‖²/Q)

* gradient noise scale (McCandlish et al. 2018) ``B_simple = tr(Σ) / ‖G‖²`` with the unbiased
  estimators ``tr(Σ) = (Q − ‖S‖²/N)/(N − 1)`` (sample covariance of the g_i) and
  ``‖G‖² = ‖S/N‖² − tr(Σ)/N = (‖S‖² − Q)/(N(N − 1))``. Since ``tr(Σ) + ‖G‖² = Q/N``, the identity
  ``α = 1 / (1 + B_simple)`` holds exactly for these estimators.

The unbiased estimators go negative when the mean gradient is below the noise level of N samples
(‖S‖² < Q; common for large models, e.g. transformers): α < 0, ‖G‖² < 0 and B_simple < 0 together.
The plug-in (biased, never negative) estimates are reported beside them: ``alpha_with_self`` (the
plug-in α), ``grad_norm_sq_plugin = ‖S/N‖²``, ``trace_cov_plugin = Q/N − ‖S/N‖²`` and
``noise_scale_plugin = trace_cov_plugin / grad_norm_sq_plugin = N Q/‖S‖² − 1``; a negative unbiased
estimate raises a ``UserWarning`` and is listed in ``meta["negative_unbiased"]``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .losses import Loss
from .per_example import GradientMoments, iter_per_example_gradients, prepare
from .results import Result, make_meta
from .validation import check_int


def coherence_stats(n: int, s_sq: float, q: float, m: int | None = None) -> dict[str, float]:
    """All coherence / noise-scale estimators from ``N``, ``‖S‖²`` and ``Q`` (see the module docstring).

    Undefined quantities (N < 2, Q = 0, ‖G‖² = 0) are NaN / ±inf rather than errors.
    """
    nan = float("nan")
    m_eff = n if m is None else int(m)
    out = {
        "n": n,
        "m": m_eff,
        "alpha": nan,
        "alpha_with_self": nan,
        "m_coherence": nan,
        "noise_scale": nan,
        "trace_cov": nan,
        "grad_norm_sq": nan,
        "mean_sq_norm": q / n if n > 0 else nan,
        "trace_cov_plugin": nan,
        "grad_norm_sq_plugin": nan,
        "noise_scale_plugin": nan,
    }
    if n >= 1:
        out["grad_norm_sq_plugin"] = s_sq / n**2
        out["trace_cov_plugin"] = max(q / n - s_sq / n**2, 0.0)  # ≥ 0 by Cauchy–Schwarz; clip rounding
        if s_sq > 0:
            out["noise_scale_plugin"] = out["trace_cov_plugin"] / out["grad_norm_sq_plugin"]
        elif q > 0:
            out["noise_scale_plugin"] = math.inf
    if n >= 1 and q > 0:
        out["alpha_with_self"] = s_sq / (n * q)
    if n >= 2:
        tr = (q - s_sq / n) / (n - 1)
        g2 = (s_sq - q) / (n * (n - 1))
        out["trace_cov"], out["grad_norm_sq"] = tr, g2
        if q > 0:
            alpha = (s_sq - q) / ((n - 1) * q)
            out["alpha"] = alpha
            out["m_coherence"] = 1.0 + (m_eff - 1) * alpha
        if g2 != 0:
            out["noise_scale"] = tr / g2
        elif tr > 0:
            out["noise_scale"] = math.inf
    return out


@dataclass(frozen=True, kw_only=True)
class CoherenceResult(Result):
    """Gradient coherence of a dataset (definitions in :mod:`dynascope.probes.coherence`).

    ``alpha`` counts distinct pairs only (i ≠ j); ``alpha_with_self`` counts i = j too;
    ``m_coherence = 1 + (m − 1)·alpha``; ``noise_scale`` is B_simple with unbiased estimators, so
    ``alpha == 1 / (1 + noise_scale)``. The ``*_plugin`` fields (and ``alpha_with_self``, the plug-in
    α) are the biased, never negative estimates; see the module docstring for when the unbiased ones
    go negative. ``per_class``: one dict per class with the same fields (``m`` there is the class size
    unless ``m`` was given).
    """

    alpha: float
    alpha_with_self: float
    m: int
    m_coherence: float
    noise_scale: float
    trace_cov: float
    grad_norm_sq: float
    mean_sq_norm: float
    n_samples: int
    trace_cov_plugin: float = float("nan")
    grad_norm_sq_plugin: float = float("nan")
    noise_scale_plugin: float = float("nan")
    per_class: list[dict[str, Any]] = field(default_factory=list)

    def to_frame(self):  # -> pandas.DataFrame
        """One row for the whole dataset (``group="all"``) and one per class (``group="class <c>"``)."""
        import pandas as pd

        keys = ("alpha", "alpha_with_self", "m", "m_coherence", "noise_scale", "trace_cov", "grad_norm_sq",
                "noise_scale_plugin", "trace_cov_plugin", "grad_norm_sq_plugin")  # fmt: skip
        rows = [{"group": "all", "class": None, "n": self.n_samples, **{k: getattr(self, k) for k in keys}}]
        for r in self.per_class:
            rows.append(
                {"group": f"class {r['class']}", "class": r["class"], **{k: r[k] for k in ("n", *keys)}}
            )
        return pd.DataFrame(rows)


def _class_labels(y: torch.Tensor) -> torch.Tensor | None:
    """Integer class labels: integer targets as they are, one-hot/probability targets by argmax."""
    if not y.is_floating_point() and y.dim() == 1:
        return y.long()
    if y.is_floating_point() and y.dim() == 2 and y.shape[1] > 1:
        return y.argmax(dim=1)
    return None


def gradient_coherence(
    model: nn.Module,
    data: Any,
    *,
    loss: str | Callable | Loss = "auto",
    chunk_size: int = 256,
    per_class: bool = True,
    m: int | None = None,
    params: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CoherenceResult:
    """Coherence α, m-coherence and noise scale B_simple of the per-example gradients over ``data``.

    Per-example gradients come from ``vmap(grad(...))`` over chunks of ``chunk_size`` samples
    (eval mode); only ``S = Σ g_i`` and ``Q = Σ ‖g_i‖²`` (and their per-class versions) are kept.
    ``m``: sample size of the m-coherence (default: the number of samples, resp. the class size).
    ``per_class``: also report each class (integer targets, or argmax of one-hot targets).
    """
    check_int("m", m, min=1, optional=True)
    started = time.perf_counter()
    ctx = prepare(model, data, loss=loss, params=params, chunk_size=chunk_size, dtype=dtype, device=device)
    n_classes = 0
    if per_class:
        labels = [_class_labels(b.y) for b in ctx.source]
        if all(lab is not None for lab in labels):
            n_classes = int(max(int(lab.max()) for lab in labels if lab.numel())) + 1  # type: ignore[union-attr]
    pdevice = next(iter(ctx.params.values())).device
    moments = GradientMoments(ctx.space.size, n_groups=n_classes, device=pdevice)
    for G, y in iter_per_example_gradients(ctx):
        moments.update(G, _class_labels(y) if n_classes else None)
    s_sq = float(moments.S @ moments.S)
    stats = coherence_stats(moments.n, s_sq, moments.Q, m)
    rows: list[dict[str, Any]] = []
    for c in range(n_classes):
        nc = int(moments.group_n[c])
        if nc == 0:
            continue
        Sc = moments.group_S[c]  # type: ignore[index]
        st = coherence_stats(nc, float(Sc @ Sc), float(moments.group_Q[c]), m)
        rows.append({"class": c, **st})
    negative = [k for k in ("alpha", "grad_norm_sq", "noise_scale") if stats[k] < 0]
    negative_classes = [r["class"] for r in rows if r["alpha"] < 0]
    if negative:
        warnings.warn(
            f"gradient_coherence: the unbiased estimates are negative (alpha={stats['alpha']:.3g}, "
            f"grad_norm_sq={stats['grad_norm_sq']:.3g}, noise_scale={stats['noise_scale']:.3g}): the mean "
            f"gradient is below the noise level of {moments.n} samples. Plug-in (biased, >= 0) estimates: "
            f"alpha_with_self={stats['alpha_with_self']:.3g}, grad_norm_sq_plugin="
            f"{stats['grad_norm_sq_plugin']:.3g}, noise_scale_plugin={stats['noise_scale_plugin']:.3g}"
            + (f"; {len(negative_classes)} class(es) negative too" if negative_classes else ""),
            UserWarning,
            stacklevel=2,
        )
    meta = make_meta(
        "gradient_coherence",
        model=ctx.model,
        params={
            "loss": ctx.loss.name,
            "chunk_size": chunk_size,
            "per_class": per_class,
            "m": m,
            "params": params,
        },
        started=started,
        mode="eval",
        backend=ctx.backend,
        n_params=ctx.space.size,
        reduction="per-example gradients of the per-sample loss (not divided by N)"
        + ("" if ctx.loss.counts_samples else "; a sample's loss is the mean over its counted tokens"),
        pairs="alpha: i != j pairs only; alpha_with_self: i = j included",
        estimators="tr(Sigma) unbiased (N-1); |G|^2 unbiased (|S|^2-Q)/(N(N-1)); alpha = 1/(1+B_simple)",
        plugin_estimators="alpha_with_self = |S|^2/(N Q); |G|^2 = |S/N|^2; tr(Sigma) = Q/N - |S/N|^2",
        negative_unbiased=negative,
        negative_unbiased_classes=negative_classes,
        **ctx.fm.kernel_meta(),
    )
    return CoherenceResult(
        alpha=stats["alpha"],
        alpha_with_self=stats["alpha_with_self"],
        m=stats["m"],
        m_coherence=stats["m_coherence"],
        noise_scale=stats["noise_scale"],
        trace_cov=stats["trace_cov"],
        grad_norm_sq=stats["grad_norm_sq"],
        mean_sq_norm=stats["mean_sq_norm"],
        n_samples=moments.n,
        trace_cov_plugin=stats["trace_cov_plugin"],
        grad_norm_sq_plugin=stats["grad_norm_sq_plugin"],
        noise_scale_plugin=stats["noise_scale_plugin"],
        per_class=rows,
        meta=meta,
    )


__all__ = ["CoherenceResult", "coherence_stats", "gradient_coherence"]
