"""The probes a researcher computes by walking the app's pages with their defaults, on a demo run (the
report-size tests and the screenshots use it)."""

from __future__ import annotations

from typing import Any

from dynascope import runner
from dynascope.models import Run


def spread(steps: list[int], n: int) -> list[int]:
    """Up to ``n`` steps spread over ``steps`` (first and last included)."""
    if len(steps) <= n:
        return steps
    return [steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)]


def fill_like_the_pages(
    run: Run, *, landscape: bool = True, only: tuple[str, ...] | None = None
) -> dict[str, int]:
    """Compute, into the run's result store, what the Hessian, edge-of-stability, gradients,
    neural-collapse and landscape pages compute with their defaults (``only``: those probes); returns
    results per probe."""
    steps = run.steps()
    jobs: list[tuple[str, list[int], Any]] = [
        ("hessian_eigenvalues", spread(steps, 4), {"k": 3, "tol": 1e-3})
    ]
    if run.optimizer_config:  # not the double-descent sweep (a closed-form fit per model size)
        jobs.append(
            ("sharpness", spread(steps, 8), lambda s: {"k": 1, "tol": 1e-3, "lr": float(run.lr_at(s))})
        )
    jobs += [
        ("hessian_density", spread(steps, 4), {}),
        ("hessian_trace", spread(steps, 4), {"n_matvecs": 30, "method": "hutch++"}),
        ("gradient_coherence", spread(steps, 6), None),
        ("neural_collapse", spread(steps, 6), None),
    ]
    out = {}
    for probe, at, params in jobs:
        if only is not None and probe not in only:
            continue
        out[probe] = len(runner.sweep(run, probe, at, params=params))
    if landscape:
        runner.run_probe(run, "loss_landscape", step=steps[-1], params={"resolution": 11})
        out["loss_landscape"] = 1
    return out
