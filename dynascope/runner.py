"""Run a named probe on a checkpoint of a run folder, through the result store.

This is the one path the app, the CLI and notebooks share: resolve the checkpoint, build the
model, load the run's dataset (a deterministic subset if asked), call the probe with the run's
training loss, and cache the result keyed by (probe, checkpoint sha256, parameters).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from dynascope.datasets.batching import BatchSource
from dynascope.models import Run
from dynascope.models.checkpoints import file_sha256
from dynascope.probes.results import Result
from dynascope.store import ResultStore


@dataclass(frozen=True)
class ProbeSpec:
    """A probe the app and CLI can run on one checkpoint: ``function(model, data, **params)``."""

    name: str
    function: str  # attribute of dynascope.probes
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    uses_loss: bool = True
    classification_only: bool = False

    def resolve(self) -> Callable[..., Result]:
        return getattr(importlib.import_module("dynascope.probes"), self.function)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The probe function's keyword parameters (after ``model`` and ``data``)."""
        params = list(inspect.signature(self.resolve()).parameters.values())[2:]
        return {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def accepts(self, name: str) -> bool:
        """Whether the probe function takes keyword ``name`` (e.g. ``reduce_fn``, ``seed``)."""
        return name in self.parameters()

    @property
    def shardable(self) -> bool:
        """Data-parallel over ranks: the probe sums its per-shard products with a ``reduce_fn``."""
        return self.accepts("reduce_fn")


PROBES: dict[str, ProbeSpec] = {
    spec.name: spec
    for spec in [
        ProbeSpec("hessian_eigenvalues", "hessian_eigenvalues", {"k": 5, "tol": 1e-4},
                  "top-k Hessian eigenvalues (Lanczos)"),
        ProbeSpec("hessian_trace", "hessian_trace", {"n_matvecs": 60, "method": "hutch++"},
                  "Hessian trace (Hutch++) with standard error"),
        ProbeSpec("hessian_density", "hessian_density", {"n_probes": 4, "lanczos_steps": 40},
                  "spectral density (stochastic Lanczos quadrature)"),
        ProbeSpec("layerwise_hessian", "layerwise_hessian", {"k": 1},
                  "per-layer top eigenvalue and trace"),
        ProbeSpec("sharpness", "sharpness", {}, "λ_max, trace and the 2/η stability thresholds"),
        ProbeSpec("gradient_coherence", "gradient_coherence", {}, "gradient coherence and noise scale"),
        ProbeSpec("ntk", "ntk_probe", {"k": 10}, "empirical NTK spectrum and label alignment",
                  uses_loss=False),
        ProbeSpec("neural_collapse", "neural_collapse", {}, "neural-collapse metrics NC1–NC4",
                  uses_loss=False, classification_only=True),
    ]
}  # fmt: skip


def probe_data(
    run: Run, *, split: str = "train", max_samples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's dataset split as tensors; ``max_samples`` keeps the first samples (deterministic)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    ds = run.load_dataset()
    x, y = getattr(ds, split)
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    return x, y


def _as_run(run: Any) -> Any:
    """A :class:`Run` from a path; run objects (or anything with the Run interface) pass through."""
    return Run.open(run) if isinstance(run, (str, os.PathLike)) else run


def _plan(
    run: Any, probe: str, step: int | None, params: dict[str, Any] | None, split: str, max_samples: int | None
) -> tuple[ProbeSpec, Any, dict[str, Any], dict[str, Any]]:
    """``(spec, checkpoint info, call kwargs, cache-key parameters)`` for one probe evaluation."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {sorted(PROBES)}")
    spec = PROBES[probe]
    info = run.checkpoint(step)
    call = {**spec.defaults, **(params or {})}
    if spec.uses_loss and "loss" not in call:
        call["loss"] = run.loss or "auto"
    key = {**call, "split": split, "max_samples": max_samples}
    return spec, info, call, key


def cached_result(
    run: Run | str,
    probe: str,
    *,
    step: int | None = None,
    params: dict[str, Any] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    store: ResultStore | None = None,
) -> Result | None:
    """The result ``run_probe`` would return from the cache, or ``None`` (nothing is computed)."""
    run = _as_run(run)
    _, info, _, key = _plan(run, probe, step, params, split, max_samples)
    store = store if store is not None else ResultStore(run.path)
    return _stored(store, probe, file_sha256(info.path), key)


def _stored(store: ResultStore, probe: str, digest: str, key: dict[str, Any]) -> Result | None:
    hit = store.get(probe, digest, key)
    return hit.result if hit is not None and isinstance(hit.result, Result) else None


def run_probe(
    run: Run | str,
    probe: str,
    *,
    step: int | None = None,
    params: dict[str, Any] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    store: ResultStore | None = None,
    recompute: bool = False,
    device: str | None = None,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
    write: bool = True,
) -> tuple[Result, bool]:
    """Run ``probe`` on checkpoint ``step`` (last if None) of ``run``; returns ``(result, was_cached)``.

    Results go to ``store`` (default: the run folder's ``results.sqlite``). ``params`` override the
    probe's defaults; with ``split``, ``max_samples`` and the loss they form the cache key.

    Data-parallel use (see :mod:`dynascope.distributed`): with ``world_size > 1`` this process sees
    only shard ``rank`` of the data (contiguous, sizes differing by at most one) and the probe sums
    its per-shard products with ``reduce_fn`` (e.g. an ``all_reduce``); only probes that take a
    ``reduce_fn`` can be sharded. ``write=False`` skips the store write (every rank but 0).
    The device, ``reduce_fn`` and sharding are not part of the cache key.
    """
    run = _as_run(run)
    spec, info, call, key = _plan(run, probe, step, params, split, max_samples)
    store = store if store is not None else ResultStore(run.path)
    digest = file_sha256(info.path)
    if not recompute and (hit := _stored(store, probe, digest, key)) is not None:
        return hit, True
    if world_size > 1 and not spec.shardable:
        raise ValueError(f"probe {probe!r} cannot shard its data over ranks (it takes no reduce_fn)")
    model = run.load_model(info.step)
    if device is not None:
        model = model.to(device)
        call["device"] = device
    data: Any = probe_data(run, split=split, max_samples=max_samples)
    if world_size > 1:
        data = BatchSource(data, rank=rank, world_size=world_size)
    if reduce_fn is not None:
        call["reduce_fn"] = reduce_fn
    result = spec.resolve()(model, data, **call)
    if write:
        store.put(probe, digest, key, result, step=info.step)
    return result, False


def sweep(
    run: Run | str,
    probe: str,
    *,
    steps: Iterable[int] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    **kwargs: Any,
) -> list[tuple[int, Result, bool]]:
    """``run_probe`` over several checkpoints (all by default); ``progress(i, n, step)`` after each."""
    run = _as_run(run)
    steps = list(steps) if steps is not None else run.steps()
    out = []
    for i, s in enumerate(steps):
        result, cached = run_probe(run, probe, step=s, **kwargs)
        out.append((s, result, cached))
        if progress is not None:
            progress(i + 1, len(steps), s)
    return out
