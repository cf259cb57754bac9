"""The one checkpoint loop and the one get-or-compute path shared by the notebook, the CLI and the app.

A *probe evaluation* is a registered probe (:data:`PROBES`) applied to one or more checkpoints:
per-checkpoint probes call ``function(model, data, **params)``; ``ntk_trajectory`` gets the models of
several checkpoints of one run, ``lmc_barrier`` the models of two checkpoints (possibly of two runs).
:func:`plan` resolves everything that determines the number, :func:`run_probe` looks it up in the
run's :class:`~dynascope.store.ResultStore` and computes it only on a miss
(:meth:`ResultStore.get_or_compute`), and :func:`sweep` is the single loop over checkpoints, with a
``progress(i, n, step, cached, seconds)`` callback that the CLI's and notebook's tqdm and the app's
progress bar adapt.

The cache key is the sha256 of the canonical JSON of the stored parameters, which hold everything
that determines the result:

* ``checkpoint_sha256`` — every checkpoint file involved (several for multi-checkpoint probes) and,
  for preconditioned sharpness, ``optimizer_state``: the optimizer file's sha256;
* ``model_spec`` — the resolved model spec each checkpoint is built from (registry defaults filled in; a
  factory spec: its reference, kwargs and seed, plus the sha256 of a ``file.py`` factory; an ``hf`` spec: the
  folder, plus the sha256 of its ``config.json`` and weights file);
* ``data_spec`` — the resolved data spec (registry defaults filled in, seed included; a file spec: its path
  and keys plus the sha256 of the file and of the test file; a factory: reference and kwargs, plus a
  ``file.py`` factory's sha256), ``split``, ``max_samples`` and ``sample`` (the first samples of the
  split; for a class-stratified subset ``sample="stratified"`` joins the key);
* the probe parameters: the function's defaults, overridden by the spec's, overridden by the caller's,
  with the run's ``loss`` for probes that take one;
* ``compute_dtype`` (the ``dtype`` parameter, else torch's default dtype the model is built in; it
  stands for the parameter in the key, so ``dtype=None`` and the default dtype share a row),
  ``device_class`` (``cpu``/``cuda``/``mps``, not the index) and ``probe_version``
  (:attr:`ProbeSpec.version`).

A cached row whose key differs in any of these is never returned. ``reduce_fn`` and data sharding over
ranks are not in the key: a sharded product equals the one-process one to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dynascope.datasets.batching import BatchSource, slice_inputs
from dynascope.datasets.factory import is_factory_ref
from dynascope.distributed import SHARDED_MODEL_PROBES, shard_model
from dynascope.models import Run
from dynascope.models.checkpoints import file_sha256
from dynascope.probes.results import Result, to_jsonable
from dynascope.store import ResultStore

#: What the runner passes besides ``model, data``; never part of ``--param`` nor the cache key. ``spec``: the
#: runner passes a curvature probe's operator as its keywords (``loss``, ``operator``, ``params`` ...), which
#: are JSON and join the key; an ``OperatorSpec`` object would not.
RESERVED_PARAMS = ("device", "reduce_fn", "v0", "model", "steps", "spec")


class Progress(Protocol):
    """``progress(i, n, step, cached, seconds)`` after checkpoint ``i`` of ``n`` (1-based) is done."""

    def __call__(self, i: int, n: int, step: int | None, cached: bool, seconds: float) -> None: ...


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature``, once per function (every cache lookup asks for the probe's parameters)."""
    return inspect.signature(fn)


@dataclass(frozen=True)
class ProbeSpec:
    """A probe the runner can evaluate, by the way its function takes checkpoints (``inputs``):

    * ``"model"``: ``function(model, data, **params)`` on one checkpoint;
    * ``"pair"``: ``function(model_a, model_b, data, **params)`` on two checkpoints (of one or two runs),
      on the first run's data;
    * ``"checkpoints"``: ``function([model_0, ...], (x, y), steps=[...], **params)`` on several checkpoints
      of one run (``ntk_trajectory``, ``landscape_trajectory``, ``opposing_signals``; the one convention of
      :mod:`dynascope.probes.trajectory`).

    ``version`` joins the cache key: bump it when the function's numbers change for the same inputs.
    """

    name: str
    function: str  # attribute of dynascope.probes
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    uses_loss: bool = True
    inputs: str = "model"
    version: int = 1

    def resolve(self) -> Callable[..., Result]:
        return getattr(importlib.import_module("dynascope.probes"), self.function)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The probe function's keyword parameters (after the model(s) and data)."""
        skip = {"model": 2, "pair": 3, "checkpoints": 2}[self.inputs]
        params = list(_signature(self.resolve()).parameters.values())[skip:]
        return {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def accepts(self, name: str) -> bool:
        """Whether the probe function takes keyword ``name`` (e.g. ``reduce_fn``, ``seed``)."""
        return name in self.parameters()

    @property
    def shardable(self) -> bool:
        """Data-parallel over ranks: the probe sums its per-shard products with a ``reduce_fn``."""
        return self.accepts("reduce_fn")

    @property
    def n_checkpoints(self) -> tuple[int, int | None]:
        """``(fewest, most)`` checkpoints one evaluation takes (``None``: no upper bound)."""
        bounds = {"model": (1, 1), "pair": (2, 2), "checkpoints": (2, None)}
        return bounds[self.inputs]


PROBES: dict[str, ProbeSpec] = {
    spec.name: spec
    for spec in [
        ProbeSpec("hessian_eigenvalues", "hessian_eigenvalues", {"k": 5, "tol": 1e-4},
                  "top-k Hessian eigenvalues (Lanczos)"),
        ProbeSpec("hessian_trace", "hessian_trace", {"n_matvecs": 60, "method": "auto"},
                  "Hessian trace (Hutch++) with standard error"),
        ProbeSpec("hessian_density", "hessian_density", {"n_probes": 4, "lanczos_steps": 40, "deflate": 10},
                  "spectral density (stochastic Lanczos quadrature)"),
        ProbeSpec("layerwise_hessian", "layerwise_hessian", {"k": 1},
                  "per-layer top eigenvalue and trace"),
        ProbeSpec("blockwise_spectra", "blockwise_spectra", {"n_probes": 4, "lanczos_steps": 40},
                  "SLQ spectrum of each parameter block and their Jensen–Shannon heterogeneity"),
        ProbeSpec("sharpness", "sharpness", {},
                  "λ_max, trace and the 2/η stability thresholds; optimizer_state=true: λ_max(P⁻¹H) "
                  "from the optimizer state saved with the checkpoint"),
        ProbeSpec("gradient_coherence", "gradient_coherence", {}, "gradient coherence and noise scale"),
        ProbeSpec("ntk", "ntk_probe", {"k": 10}, "empirical NTK spectrum and label alignment",
                  uses_loss=False),
        ProbeSpec("neural_collapse", "neural_collapse", {}, "neural-collapse metrics NC1–NC4",
                  uses_loss=False),
        ProbeSpec("ntk_trajectory", "ntk_trajectory", {},
                  "NTK label alignment and kernel distance over several checkpoints (first = reference)",
                  uses_loss=False, inputs="checkpoints"),
        ProbeSpec("lmc_barrier", "lmc_barrier", {},
                  "loss barrier on the linear path between two checkpoints (possibly of two runs)",
                  inputs="pair"),
        ProbeSpec("hessian_diagonal", "hessian_diagonal", {"n_matvecs": 100, "method": "hutchinson"},
                  "Hessian diagonal (Hutchinson) with per-entry standard errors and per-layer means"),
        ProbeSpec("loss_landscape", "loss_landscape", {"directions": "random", "resolution": 21},
                  "2-D loss slice around a checkpoint (filter-normalised random or Hessian directions)"),
        ProbeSpec("landscape_trajectory", "landscape_trajectory", {"resolution": 21},
                  "loss on the PCA plane of several checkpoints (the last one the centre), path drawn on it",
                  inputs="checkpoints"),
        ProbeSpec("landscape_between", "landscape_between", {"resolution": 21},
                  "loss on the plane through a checkpoint, the direction to another one (optionally "
                  "permutation-aligned) and a random direction", inputs="pair"),
        ProbeSpec("opposing_signals", "opposing_signals", {},
                  "examples whose loss oscillates most over consecutive checkpoints, split by gradient sign "
                  "along the update (or top Hessian eigenvector)", inputs="checkpoints"),
    ]
}  # fmt: skip


# ------------------------------------------------------------------------------------------ inputs
SAMPLES = ("first", "stratified")


def class_labels(y: torch.Tensor) -> torch.Tensor | None:
    """The class of each example: integer labels as they are, the argmax of one-hot / score rows; ``None``
    for targets that are not classes (continuous regression)."""
    if y.dtype.is_floating_point and y.dim() == 2 and y.shape[1] > 1:
        return y.argmax(dim=1)
    if not y.dtype.is_floating_point and y.dim() == 1:
        return y
    return None


def stratified_indices(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of a deterministic class-stratified subset of size ``min(n, len(y))``, in file order.

    Classes are the integer labels (or the argmax of one-hot / score rows). Example r of a class of
    size c has share r/c; the subset is the ``n`` smallest shares (ties by class, then file order): the
    first example of every class comes first, so every class is present when ``n`` ≥ the number of
    classes, and class proportions are kept up to rounding.
    Non-class targets (continuous regression) get ``n`` evenly spaced examples."""
    total = int(y.shape[0])
    n = min(int(n), total)
    labels = class_labels(y)
    if labels is None:
        return torch.linspace(0, total - 1, n).round().long().unique()
    labels = labels.long() - int(labels.min())
    order = torch.argsort(labels, stable=True)  # by class, file order within a class
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total) - starts  # position of each example within its class
    counts = torch.bincount(labels)
    share = rank.double() / counts[labels].double()  # 0 for each class's first example
    chosen = order[torch.argsort(share[order], stable=True)][:n]
    return chosen.sort().values


def probe_data(
    run: Any, *, split: str = "train", max_samples: int | None = None, sample: str = "first"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's dataset split as tensors; ``max_samples`` keeps the first samples (``sample="first"``)
    or a class-stratified subset (``sample="stratified"``, :func:`stratified_indices`); deterministic."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if sample not in SAMPLES:
        raise ValueError(f"sample must be one of {SAMPLES}; got {sample!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):  # fmt: skip
        raise ValueError(f"max_samples must be a positive integer or None; got {max_samples!r}")
    ds = run.load_dataset()
    x, y = getattr(ds, split)
    if max_samples is not None:
        if sample == "stratified" and max_samples < len(y):
            idx = stratified_indices(y, max_samples)
            x, y = slice_inputs(x, idx), y[idx]
        else:
            x, y = slice_inputs(x, slice(None, max_samples)), y[:max_samples]
    return x, y


def _as_run(run: Any) -> Any:
    """A :class:`Run` from a path; run objects (or anything with the Run interface) pass through."""
    return Run.open(run) if isinstance(run, (str, os.PathLike)) else run


def resolved_model_spec(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A registry model config with every default filled in (``normalize_config``); configs the
    registry does not know are kept as given (building them reports the problem)."""
    from dynascope.models import normalize_config

    cfg = dict(cfg)
    if "name" not in cfg and ("factory" in cfg or "hf" in cfg or "exported" in cfg):
        from dynascope.models import model_fingerprint

        return to_jsonable(model_fingerprint(cfg))
    name = cfg.pop("name", None)
    if not isinstance(name, str):
        return to_jsonable({"name": name, **cfg})
    try:
        return to_jsonable(normalize_config(name, **cfg))
    except (ValueError, TypeError):
        return to_jsonable({"name": name, **cfg})


def resolved_data_spec(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A registry dataset config with every default (the seed included) filled in."""
    from dynascope.datasets.registry import defaults

    cfg = dict(cfg)
    if "name" not in cfg and ("factory" in cfg or "file" in cfg):
        from dynascope.datasets import data_fingerprint

        return to_jsonable(data_fingerprint(cfg))
    name = cfg.get("name")
    try:
        base = defaults(name) if isinstance(name, str) else {}
    except (ValueError, KeyError):
        base = {}
    return to_jsonable({**base, **cfg})


def device_class(device: str | torch.device | None) -> str:
    """``cpu``, ``cuda``, ``mps``, ...: the kind of device, not its index (``None`` → ``cpu``)."""
    return "cpu" if device is None else torch.device(device).type


def combined_hash(digests: Sequence[str]) -> str:
    """One digest for several checkpoint sha256s (order matters); a single one is itself."""
    if len(digests) == 1:
        return digests[0]
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Plan:
    """One probe evaluation, resolved: what to load, what to call and the cache key.

    ``checkpoints``: ``(run, CheckpointInfo)`` per checkpoint (data from the first run); ``call``: the
    probe's keyword arguments; ``key``: the stored parameters (everything that determines the number,
    see the module docstring), whose canonical-JSON sha256 with ``probe`` and ``checkpoint_hash`` is the
    row key; ``step``: the step stored for listing (the first checkpoint's; ``None`` for trajectories).
    """

    spec: ProbeSpec
    checkpoints: tuple[tuple[Any, Any], ...]
    call: dict[str, Any]
    key: dict[str, Any]
    checkpoint_hash: str
    step: int | None
    split: str
    max_samples: int | None
    sample: str = "first"
    allow: tuple[str, ...] = ()  # code references the caller gave (e.g. loss="pkg.mod:fn"): theirs to run

    @property
    def probe(self) -> str:
        return self.spec.name

    @property
    def run(self) -> Any:
        return self.checkpoints[0][0]


def _checkpoint_list(
    run: Any, spec: ProbeSpec, step: int | None, steps: Sequence[int] | None, other: tuple[Any, int] | None
) -> list[tuple[Any, Any]]:
    """``[(run, CheckpointInfo)]`` for the evaluation (``step`` / ``steps`` / ``other``)."""
    lo, hi = spec.n_checkpoints
    if spec.inputs == "model":
        if steps is not None or other is not None:
            raise ValueError(f"probe {spec.name!r} takes one checkpoint (step=), not steps=/other=")
        return [(run, run.checkpoint(step))]
    if spec.inputs == "checkpoints":
        if steps is None or other is not None:
            raise ValueError(f"probe {spec.name!r} takes steps=[...] of one run ({lo} or more checkpoints)")
        chosen = [(run, run.checkpoint(int(s))) for s in steps]
    else:
        if other is None or steps is not None:
            raise ValueError(f"probe {spec.name!r} takes step= and other=(run_b, step_b)")
        run_b, step_b = other
        chosen = [(run, run.checkpoint(step)), (_as_run(run_b), _as_run(run_b).checkpoint(step_b))]
    if len(chosen) < lo or (hi is not None and len(chosen) > hi):
        raise ValueError(f"probe {spec.name!r} needs at least {lo} checkpoints; got {len(chosen)}")
    return chosen


def _call_params(run: Any, spec: ProbeSpec, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The probe's keyword arguments: function defaults < spec defaults < ``params`` (+ the run's loss)."""
    accepted = spec.parameters()
    given = dict(params or {})
    reserved = sorted(set(given) & set(RESERVED_PARAMS))
    if reserved:
        raise ValueError(f"probe {spec.name!r}: {reserved} are set by the runner, not passed as parameters")
    bad = sorted(set(given) - set(accepted))
    if bad:
        valid = ", ".join(n for n in accepted if n not in RESERVED_PARAMS)
        raise ValueError(f"probe {spec.name!r} has no parameter(s) {bad}; valid: {valid}")
    call = {
        n: p.default for n, p in accepted.items() if n not in RESERVED_PARAMS and p.default is not p.empty
    }
    call.update(spec.defaults)
    if spec.uses_loss and "loss" in accepted and "loss" not in given:
        call["loss"] = run.loss or "auto"
    call.update(given)
    return call


def call_params(run: Run | str, probe: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments :func:`plan` resolves for ``probe`` on ``run`` (``plan(...).call``) without a
    checkpoint: function defaults < spec defaults < ``params``, plus the run's loss. ``ValueError`` for an
    unknown probe or parameter."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {sorted(PROBES)}")
    return _call_params(_as_run(run), PROBES[probe], params)


def schedule_lr(run: Any, step: int) -> float | None:
    """η at ``step`` from the run's schedule (or its optimizer's lr), ``None`` when the run records none;
    ``0.0`` at the end of a schedule that decays to zero (the sharpness then reports no threshold)."""
    try:
        lr = float(run.lr_at(step))
    except (ValueError, TypeError, AttributeError):
        return None
    return lr if lr >= 0 and lr == lr else None


def plan(
    run: Run | str,
    probe: str,
    *,
    step: int | None = None,
    steps: Sequence[int] | None = None,
    other: tuple[Any, int] | None = None,
    params: Mapping[str, Any] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    device: str | torch.device | None = None,
    sample: str = "first",
    shard: str | None = None,
) -> Plan:
    """Resolve one evaluation of ``probe``: checkpoint ``step`` of ``run`` (the last if None), or
    ``steps`` of ``run`` (trajectory probes), or ``step`` of ``run`` and ``other=(run_b, step_b)``
    (pair probes). Nothing is loaded but the checkpoint hashes. ``shard="fsdp"`` enters the key (its
    product is a finite difference, :mod:`dynascope.probes.sharded`); DDP's exact product does not."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {sorted(PROBES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if sample not in SAMPLES:
        raise ValueError(f"sample must be one of {SAMPLES}; got {sample!r}")
    spec = PROBES[probe]
    run = _as_run(run)
    chosen = _checkpoint_list(run, spec, step, steps, other)
    call = _call_params(run, spec, params)
    if spec.name == "sharpness" and "lr" not in (params or {}) and call.get("lr") is None:
        call["lr"] = schedule_lr(run, chosen[0][1].step)  # η of the run's schedule (lr=None: no threshold)
    digests = [file_sha256(info.path) for _, info in chosen]
    key = to_jsonable({k: v for k, v in call.items() if k not in ("optimizer_state", "dtype")})
    if call.get("optimizer_state") is not None:
        if call["optimizer_state"] is not True:
            raise ValueError(
                "optimizer_state: pass true to use the optimizer state saved with the checkpoint"
            )
        info = chosen[0][1]
        if info.optimizer_path is None:
            raise ValueError(f"checkpoint '{info.path}' has no optimizer state saved beside it")
        key["optimizer_state"] = file_sha256(info.optimizer_path)
    specs = [resolved_model_spec(r.model_config_at(info.step)) for r, info in chosen]
    dtype = call.get("dtype")
    key.update(
        split=split,
        max_samples=max_samples,
        checkpoint_sha256=digests if len(digests) > 1 else digests[0],
        model_spec=specs if len(specs) > 1 else specs[0],
        data_spec=resolved_data_spec(run.dataset_config),
        compute_dtype=str(dtype if dtype is not None else torch.get_default_dtype()),
        device_class=device_class(device),
        probe_version=spec.version,
    )
    if sample != "first" and max_samples is not None:  # the first-N key stays as it was
        key["sample"] = sample
    if shard == "fsdp":
        key["product"] = "finite differences of FSDP2 gradients"
    if spec.inputs != "model":
        key["checkpoint_steps"] = [info.step for _, info in chosen]
    return Plan(
        spec=spec,
        checkpoints=tuple(chosen),
        call=call,
        key=key,
        checkpoint_hash=combined_hash(digests),
        step=None if spec.inputs == "checkpoints" else chosen[0][1].step,
        split=split,
        max_samples=max_samples,
        sample=sample if max_samples is not None else "first",
        allow=tuple(v for v in (params or {}).values() if is_factory_ref(v)),
    )


# ------------------------------------------------------------------------------------------ compute
def compute(
    p: Plan,
    *,
    device: str | torch.device | None = None,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: Progress | None = None,
    shard: str | None = None,
) -> Result:
    """Load the plan's checkpoints and data and call the probe (no cache). ``progress`` is told of
    each checkpoint loaded by multi-checkpoint probes. Code named by the run's specs runs only if the
    run is trusted (:meth:`~dynascope.models.Run.code_scope`); ``UntrustedCodeError`` otherwise.
    ``shard`` (``"fsdp"``/``"ddp"``, under a process group): the loaded model is sharded by
    :func:`~dynascope.distributed.shard_model` (in the ``dtype`` parameter, when given) and this rank
    passes shard ``rank`` of the data."""
    with p.run.code_scope(allow=p.allow):
        return _compute(p, device, reduce_fn, rank, world_size, progress, shard)


def _compute(
    p: Plan,
    device: str | torch.device | None,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    rank: int,
    world_size: int,
    progress: Progress | None,
    shard: str | None = None,
) -> Result:
    spec, call = p.spec, dict(p.call)
    if world_size > 1 and not spec.shardable:
        raise ValueError(f"probe {spec.name!r} cannot shard its data over ranks (it takes no reduce_fn)")
    if shard is not None and spec.name not in SHARDED_MODEL_PROBES:
        these = ", ".join(SHARDED_MODEL_PROBES)
        raise ValueError(f"probe {spec.name!r} takes no sharded model (--shard); these do: {these}")
    models = []
    for i, (r, info) in enumerate(p.checkpoints):
        t0 = time.perf_counter()
        model = r.load_model(info.step)
        models.append(model.to(device) if device is not None else model)
        if progress is not None and spec.inputs != "model":
            progress(i + 1, len(p.checkpoints), info.step, False, time.perf_counter() - t0)
    if call.get("optimizer_state") is True:
        r, info = p.checkpoints[0]
        call["optimizer_state"] = r.load_optimizer_state(info.step)
    if device is not None and spec.accepts("device"):
        call["device"] = device
    if shard is not None:  # every rank read the whole checkpoint; now each keeps its shard
        dtype = call.pop("dtype", None)
        models[0] = shard_model(models[0].to(dtype) if dtype is not None else models[0], shard)
    if reduce_fn is not None:
        call["reduce_fn"] = reduce_fn
    data: Any = probe_data(p.run, split=p.split, max_samples=p.max_samples, sample=p.sample)
    fn = spec.resolve()
    if spec.inputs == "checkpoints":
        return fn(models, data, steps=[info.step for _, info in p.checkpoints], **call)
    if world_size > 1:
        data = BatchSource(data, rank=rank, world_size=world_size)
    if spec.inputs == "pair":
        return fn(models[0], models[1], data, **call)
    return fn(models[0], data, **call)


def cached(p: Plan, store: ResultStore | None = None) -> Result | None:
    """The plan's cached result, or ``None`` (nothing is computed)."""
    store = store if store is not None else ResultStore(p.run.path)
    hit = store.get(p.probe, p.checkpoint_hash, p.key)
    return hit.result if hit is not None and isinstance(hit.result, Result) else None


def store_result(p: Plan, result: Result, store: ResultStore | None = None) -> str:
    """Store ``result`` under the plan's key (the single write path); returns the row key."""
    store = store if store is not None else ResultStore(p.run.path)
    return store.put(p.probe, p.checkpoint_hash, p.key, result, step=p.step)


def ingest_pending(run: Run | str) -> int:
    """File the results that code below the runner queued in ``run`` (:meth:`Run.add_pending_result`, e.g.
    the edge-of-stability recipe's λ_max) into its result store under the runner's key of ``probe(name,
    step=s, **params)``; returns how many. A record whose checkpoint is missing stays queued; one that
    cannot be read or keyed is left in place with a warning naming the file."""
    from .store import _result_class

    run = _as_run(run)
    if not isinstance(run, Run):  # a bare checkpoint file queues nothing
        return 0
    done = 0
    for path in run.pending_results():
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            cls = _result_class(rec["result_class"])
            if cls is None:
                raise ValueError(f"unknown result class {rec['result_class']!r}")
            steps = run.steps()
            if rec["step"] not in steps:
                continue  # its checkpoint is not written yet
            store_result(plan(run, rec["probe"], step=rec["step"], params=rec["params"]),
                         cls.from_dict(rec["result"]))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{path}: queued result not stored ({type(e).__name__}: {e})", UserWarning,
                          stacklevel=2)  # fmt: skip
            continue
        path.unlink(missing_ok=True)
        done += 1
    return done


def get_or_compute(
    p: Plan,
    store: ResultStore | None = None,
    *,
    recompute: bool = False,
    write: bool = True,
    progress: Progress | None = None,
    **compute_kwargs: Any,
) -> tuple[Result, bool]:
    """``(result, was_cached)``: the cached result for the plan's key, else computed (and stored
    unless ``write=False``). The one get → compute → put path."""
    store = store if store is not None else ResultStore(p.run.path)

    def make() -> Result:
        return compute(p, progress=progress, **compute_kwargs)

    result, was_cached = store.get_or_compute(
        p.probe, p.checkpoint_hash, p.key, make, step=p.step, recompute=recompute, write=write
    )
    if not isinstance(result, Result):  # a row under this key whose Result class is gone: redo it
        result, was_cached = store.get_or_compute(
            p.probe, p.checkpoint_hash, p.key, make, step=p.step, recompute=True, write=write
        )
    return result, was_cached  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ front doors
def cached_result(
    run: Run | str, probe: str, *, store: ResultStore | None = None, **where: Any
) -> Result | None:
    """The result :func:`run_probe` would return from the cache, or ``None`` (nothing is computed).
    ``where``: :func:`plan`'s keywords (``step``/``steps``/``other``, ``params``, ``split``, ``max_samples``,
    ``device``)."""
    return cached(plan(run, probe, **where), store)


def cached_results(
    run: Run | str,
    probe: str,
    steps: Iterable[int],
    *,
    params: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
    store: ResultStore | None = None,
    **where: Any,
) -> dict[int, Result]:
    """``{step: result}`` for those of ``steps`` already in the cache (nothing is computed); ``params``
    as in :func:`sweep`, ``where`` as in :func:`cached_result`."""
    run = _as_run(run)
    store = store if store is not None else ResultStore(run.path)
    out = {}
    for s in steps:
        hit = cached_result(run, probe, step=s, params=params(s) if callable(params) else params, store=store,
                            **where)  # fmt: skip
        if hit is not None:
            out[s] = hit
    return out


def run_probe(
    run: Run | str,
    probe: str,
    *,
    step: int | None = None,
    steps: Sequence[int] | None = None,
    other: tuple[Any, int] | None = None,
    params: Mapping[str, Any] | None = None,
    split: str = "train",
    max_samples: int | None = None,
    sample: str = "first",
    store: ResultStore | None = None,
    recompute: bool = False,
    device: str | None = None,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
    write: bool = True,
    progress: Progress | None = None,
    shard: str | None = None,
) -> tuple[Result, bool]:
    """Run ``probe`` on checkpoint ``step`` (last if None) of ``run``; returns ``(result, was_cached)``.

    Multi-checkpoint probes take ``steps=[...]`` (``ntk_trajectory``) or ``other=(run_b, step_b)``
    (``lmc_barrier``). Results go to ``store`` (default: the run folder's ``results.sqlite``) under the
    full cache key (module docstring). ``params`` override the probe's defaults.

    Data-parallel use (see :mod:`dynascope.distributed`): with ``world_size > 1`` this process sees
    only shard ``rank`` of the data (contiguous, sizes differing by at most one) and the probe sums
    its per-shard products with ``reduce_fn`` (e.g. an ``all_reduce``); only probes that take a
    ``reduce_fn`` can be sharded. ``write=False`` skips the store write (every rank but 0). ``shard``
    (``"fsdp"``/``"ddp"``): the model is sharded over the ranks instead (:func:`compute`).
    """
    p = plan(run, probe, step=step, steps=steps, other=other, params=params, split=split,
             max_samples=max_samples, device=device, sample=sample, shard=shard)  # fmt: skip
    if write and store is None:
        ingest_pending(p.run)  # results a recipe queued may be this very key
    return get_or_compute(
        p, store, recompute=recompute, write=write, progress=progress, device=device, reduce_fn=reduce_fn,
        rank=rank, world_size=world_size, shard=shard,
    )  # fmt: skip


def sweep(
    run: Run | str,
    probe: str,
    steps: Iterable[int] | None = None,
    *,
    params: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> list[tuple[int, Result, bool]]:
    """THE checkpoint loop: :func:`run_probe` on each of ``steps`` (all checkpoints by default) →
    ``[(step, result, was_cached)]``; ``params`` may depend on the step (a callable);
    ``progress(i, n, step, cached, seconds)`` after each checkpoint. ``kwargs`` go to :func:`run_probe`."""
    run = _as_run(run)
    steps = list(steps) if steps is not None else run.steps()
    out = []
    for i, s in enumerate(steps):
        t0 = time.perf_counter()
        p = params(s) if callable(params) else params
        result, was_cached = run_probe(run, probe, step=s, params=p, **kwargs)
        out.append((s, result, was_cached))
        if progress is not None:
            progress(i + 1, len(steps), s, was_cached, time.perf_counter() - t0)
    return out


class TqdmProgress:
    """A :class:`Progress` drawing a tqdm bar (``close()`` when done); the CLI and notebook use it."""

    def __init__(self, desc: str, **tqdm_kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit="ckpt", **{"disable": None, **tqdm_kwargs})

    def __call__(self, i: int, n: int, step: int | None, cached: bool, seconds: float) -> None:
        self.bar.total = n
        self.bar.set_postfix_str(f"step {step}{' (cached)' if cached else ''}")
        self.bar.update(i - self.bar.n)

    def close(self) -> None:
        self.bar.close()


__all__ = [
    "PROBES",
    "Plan",
    "ProbeSpec",
    "Progress",
    "TqdmProgress",
    "cached",
    "cached_result",
    "cached_results",
    "call_params",
    "compute",
    "get_or_compute",
    "plan",
    "probe_data",
    "run_probe",
    "sweep",
    "store_result",
]
