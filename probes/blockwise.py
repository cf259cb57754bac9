"""Blockwise Hessian spectra and their heterogeneity (Zhang et al., 2024, "Why Transformers Need Adam: A
Hessian Perspective").

For parameter blocks ``θ_b`` (default: one per module that holds parameters,
:func:`~dynascope.probes.operators.parameter_groups`; or ``groups={name: [parameter names or module
prefixes]}``) the diagonal block ``H_bb = ∂²L/∂θ_b²`` (the other blocks fixed) gets its SLQ density ``ρ_b``
(:func:`~dynascope.probes.density.hessian_density` with ``params=θ_b``; each measure integrates to 1).
The blocks are compared on one λ axis: every measure is broadened with one width ``σ`` (the median of the
blocks' default widths, :func:`~dynascope.probes.density.slq_sigma`) on one grid ``t_1 … t_G`` spanning
every block's Ritz values ± 4σ, and discretised to a probability vector ``p_b(t_i) ∝ ρ_b(t_i)``. Then

    JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = (p + q)/2    (natural log, so 0 ≤ JS ≤ ln 2)

for every pair of blocks, and ``heterogeneity`` is its mean over the pairs ``b < c``. Zhang et al. find it
large in transformers, whose embedding, attention and MLP blocks have spectra far apart, and small in
CNNs, where SGD does as well as Adam.

Cost: ``n_probes · min(lanczos_steps, P_b)`` products per block, each a full forward and double backward
restricted to the block. Memory: one block at a time, within ``memory_budget`` bytes of vectors (default
half the available memory, :mod:`~dynascope.probes.budget`): each block's SLQ is planned by
:func:`~dynascope.probes.density.plan_slq` for its own ``P_b`` — ``n_probes · lanczos_steps · P_b`` numbers
(full reorthogonalisation, all probes together) where that fits, else fewer probes at a time, then a
bounded reorthogonalisation window (:data:`~dynascope.probes.density.SLQ_FORMULA`). ``meta['block_plans']``
holds each block's plan and ``orthogonality_loss``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .budget import resolve_budget
from .density import SLQ_FORMULA, DensityResult, hessian_density
from .functional import parameter_groups, select_parameters
from .memory import peak_memory
from .results import Result, make_meta
from .validation import check_int


@dataclass(frozen=True, kw_only=True)
class BlockwiseSpectraResult(Result):
    """``blocks`` names, ``n_params`` their sizes; per block ``lambda_max`` / ``lambda_min``, the extreme
    Ritz values (bounds on the block's extreme eigenvalues that are exact once ``lanczos_steps ≥ P_b``)
    and ``trace`` = ``P_b`` × the measure's mean (an unbiased estimate of ``tr H_bb``); ``grid`` ``[G]``
    and ``densities`` ``[B, G]`` on the shared axis with width ``sigma``; ``js`` ``[B, B]`` the
    Jensen–Shannon divergences and ``heterogeneity`` their mean over pairs (module docstring)."""

    blocks: list[str]
    n_params: list[int]
    lambda_max: torch.Tensor
    lambda_min: torch.Tensor
    trace: torch.Tensor
    grid: torch.Tensor
    densities: torch.Tensor
    sigma: float
    js: torch.Tensor
    heterogeneity: float
    n_matvecs: int

    def to_frame(self):  # -> pandas.DataFrame
        """One row per block: ``block, n_params, lambda_max, lambda_min, trace, mean_js`` (mean divergence
        from the other blocks)."""
        import pandas as pd

        n = len(self.blocks)
        others = self.js.sum(dim=1) / max(n - 1, 1)
        return pd.DataFrame(
            {"block": self.blocks, "n_params": self.n_params, "lambda_max": self.lambda_max.tolist(),
             "lambda_min": self.lambda_min.tolist(), "trace": self.trace.tolist(), "mean_js": others.tolist()}
        )  # fmt: skip


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon divergence of two probability vectors (natural log; 0 for equal ones, ln 2 for
    disjoint supports)."""
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> float:
        keep = a > 0
        return float((a[keep] * (a[keep] / m[keep]).log()).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def shared_axis(
    densities: Sequence[DensityResult], *, n_grid: int = 1000, sigma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(grid, [B, G] probability vectors, σ)``: the blocks' measures broadened with one ``σ`` (default:
    the median of their own widths) on one grid over all their Ritz values ± 4σ."""
    if sigma is None:
        sigma = statistics.median(float(d.sigma) for d in densities)
    values = torch.cat([d.ritz_values.to(torch.float64) for d in densities])
    lo, hi = float(values.min()) - 4 * sigma, float(values.max()) + 4 * sigma
    grid = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    rows = [d.resmooth(sigma=sigma, grid=grid, log_scale=False).density.to(torch.float64) for d in densities]
    probs = torch.stack([r / r.sum() for r in rows])
    return grid, probs, float(sigma)


def blockwise_spectra(
    model: nn.Module,
    data: Any,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    n_probes: int = 10,
    lanczos_steps: int = 80,
    n_grid: int = 1000,
    sigma: float | None = None,
    loss: str | Callable = "auto",
    operator: str = "hessian",
    seed: int = 0,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reduce_fn: Callable | None = None,
    memory_budget: int | None = None,
) -> BlockwiseSpectraResult:
    """SLQ spectra of every diagonal block ``H_bb`` and their Jensen–Shannon heterogeneity (module
    docstring); ``sigma`` overrides the shared broadening width; ``memory_budget``: bytes of vectors each
    block's SLQ may hold (module docstring)."""
    check_int("n_grid", n_grid, min=16)
    blocks = dict(groups) if groups is not None else parameter_groups(model)
    if len(blocks) < 2:
        raise ValueError(f"blockwise_spectra needs at least two parameter blocks; got {list(blocks)}")
    t0 = time.perf_counter()
    budget = resolve_budget(memory_budget, device)
    names, sizes, per = [], [], []
    with peak_memory(device) as peak:
        for i, (name, members) in enumerate(blocks.items()):
            size = sum(p.numel() for _, p in select_parameters(model, list(members)))
            per.append(
                hessian_density(
                    model, data, n_probes=n_probes, lanczos_steps=min(lanczos_steps, size),
                    params=list(members), loss=loss, operator=operator, seed=seed + i, batch_size=batch_size,
                    mode=mode, dtype=dtype, device=device, reduce_fn=reduce_fn, check_determinism=i == 0,
                    memory_budget=budget,
                )
            )  # fmt: skip
            names.append(name)
            sizes.append(int(size))
    grid, probs, width = shared_axis(per, n_grid=n_grid, sigma=sigma)
    js = torch.zeros(len(per), len(per), dtype=torch.float64)
    for b in range(len(per)):
        for c in range(b + 1, len(per)):
            js[b, c] = js[c, b] = js_divergence(probs[b], probs[c])
    pairs = js[torch.triu_indices(len(per), len(per), 1).unbind()]
    n_matvecs = sum(d.n_matvecs for d in per)
    settings = {"groups": {n: list(v) for n, v in blocks.items()}, "n_probes": n_probes, "n_grid": n_grid,
                "lanczos_steps": lanczos_steps, "sigma": sigma, "batch_size": batch_size,
                "memory_budget": memory_budget}  # fmt: skip
    plan_keys = ("vector_bytes", "block_used", "reorth_window", "probes_held", "budget_binds",
                 "orthogonality_loss")  # fmt: skip
    plans = {n: {k: d.meta[k] for k in plan_keys} for n, d in zip(names, per)}
    first = per[0].meta
    meta = make_meta(
        "blockwise_spectra", model=model, params=settings, started=t0, operator=operator, n_matvecs=n_matvecs,
        seed=seed, mode=mode, n_params=sum(sizes),
        **{k: first[k] for k in ("loss", "reduction", "n_samples", "dtype", "device") if k in first},
        note="diagonal blocks H_bb (other blocks fixed); JS in nats on one grid with one broadening width",
        memory_budget=budget, memory_formula=f"per block, one at a time: {SLQ_FORMULA}", block_plans=plans,
        budget_binds=any(p["budget_binds"] for p in plans.values()),
        orthogonality_loss=max(p["orthogonality_loss"] for p in plans.values()),
        measured_peak_bytes=peak.bytes, measured_peak_how=peak.how,
    )  # fmt: skip
    return BlockwiseSpectraResult(
        blocks=names,
        n_params=sizes,
        lambda_max=torch.tensor([float(d.ritz_values.max()) for d in per], dtype=torch.float64),
        lambda_min=torch.tensor([float(d.ritz_values.min()) for d in per], dtype=torch.float64),
        trace=torch.tensor(
            [n * float((d.ritz_values * d.ritz_weights).sum()) for n, d in zip(sizes, per)],
            dtype=torch.float64,
        ),
        grid=grid,
        densities=probs / (grid[1] - grid[0]),
        sigma=width,
        js=js,
        heterogeneity=float(pairs.mean()) if pairs.numel() else math.nan,
        n_matvecs=n_matvecs,
        meta=meta,
    )


__all__ = ["BlockwiseSpectraResult", "blockwise_spectra", "js_divergence", "shared_axis"]
