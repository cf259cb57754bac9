"""Probes over ``torch.distributed``: data-sharded operators and checkpoint sweeps split across ranks.

Two ways to spread work over ``W`` processes (``torchrun --nproc_per_node=W -m dynascope probe ...``):

* **data**: every rank holds the same model and a contiguous shard of the data (sizes differ by at
  most one). A curvature product is ``A v = (1/N) Σ_r Σ_{i ∈ shard r} ∂²ℓ_i v``: each rank computes its
  partial sum, :func:`allreduce_sum` adds them, and every rank then runs the same (deterministic)
  Lanczos / Hutch++ / SLQ iteration on identical vectors. Random probe vectors come from seeded CPU
  generators, so they agree across ranks without communication. Ring and tree all-reduce hand every
  rank the same bits, so convergence decisions agree too. Only probes that take ``reduce_fn`` shard.
* **checkpoints**: the steps still missing from the cache are dealt round-robin to the ranks, each
  rank runs the probe on the full data, and the results are gathered on rank 0.
* **sharded model** (``--shard fsdp`` / ``--shard ddp``): every rank reads the whole checkpoint, then the
  model is sharded with FSDP2 (``fully_shard``: each rank keeps its shard of every parameter) or wrapped in
  DDP (:func:`shard_model`); each rank passes its data shard and the probe runs on the sharded model
  (:mod:`dynascope.probes.sharded`: its Krylov vectors sharded too). Only the Hessian spectral probes
  (:data:`SHARDED_MODEL_PROBES`) take a sharded model.

Only rank 0 reads the cache decision (then broadcasts it) and writes results, so the store sees a
single writer. Outside ``torchrun`` (no ``WORLD_SIZE``) everything degrades to one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node), the torch
    ``device`` to compute on, the collective ``backend`` and whether we initialised the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shutdown(self) -> None:
        """Destroy the process group if :func:`init_from_env` created it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(device: str | None = None, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a one-process
    context is returned. ``device``: ``None``/``"cpu"`` → gloo on CPU; ``"cuda"`` → NCCL with this
    process on ``cuda:LOCAL_RANK``; an explicit ``"cuda:i"`` is kept. An already initialised default
    group is reused (its backend decides).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    use_cuda = device is not None and str(device).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available on this node")
        device = f"cuda:{local_rank}" if str(device) == "cuda" else str(device)
        torch.cuda.set_device(torch.device(device))
    dist = torch.distributed
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if use_cuda:
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local_rank, device, backend, owns_group=True)


def is_main() -> bool:
    """True on rank 0 of the default group, or when ``torch.distributed`` is not in use."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_ranks t`` on every rank (a new tensor; the input is left alone). The ``reduce_fn`` for probes."""
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


SHARD_KINDS = ("fsdp", "ddp")
#: Probes that take an FSDP2-sharded or DDP-wrapped model (their operator is built by ``OperatorSpec.build``).
SHARDED_MODEL_PROBES = ("hessian_eigenvalues", "hessian_trace", "hessian_density", "sharpness")


def shard_model(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """``model`` (already on its device, under an initialised process group) sharded for ``kind``:
    ``"fsdp"`` — ``fully_shard`` on every module that holds parameters itself, then on the root (FSDP2:
    each rank keeps dim-0 shards of every parameter; a module holding a tied parameter, such as a language
    model's embedding and head, is left to the root, since one FSDP unit must own a shared parameter);
    ``"ddp"`` — ``DistributedDataParallel`` (on CUDA, on the parameters' device). The backend is the
    process group's, chosen by the caller."""
    if kind not in SHARD_KINDS:
        raise ValueError(f"shard must be one of {SHARD_KINDS}; got {kind!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"--shard {kind} needs torch.distributed: start it with torchrun (WORLD_SIZE > 1)")
    device = next(model.parameters()).device
    if kind == "ddp":
        ids = [device] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    owners: dict[int, int] = {}  # parameter → how many modules hold it (tied weights: more than one)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if module is not model and own and all(owners[id(p)] == 1 for p in own):
            fully_shard(module)
    fully_shard(model)  # the root: its own parameters and any tied ones (e.g. GPT-2's embedding and head)
    return model


def shard_data(data: Any, rank: int, world: int, batch_size: int | None = None) -> Any:
    """Shard ``rank`` of ``world`` of ``data`` (tensors, Dataset or DataLoader) as a ``BatchSource``.

    Tensors and map-style Datasets: contiguous sample ranges (sizes differ by at most one);
    DataLoaders: batches dealt round-robin. Probes recognise the shard and combine it with ``reduce_fn``.
    """
    from .datasets.batching import as_batches

    return as_batches(data, batch_size, rank=rank, world_size=world)


def split_steps(steps: Sequence[int], rank: int, world: int) -> list[int]:
    """The checkpoint steps rank ``rank`` handles in a sweep: round-robin ``steps[rank::world]``."""
    return list(steps[rank::world])


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (identity in one process)."""
    if not ctx.active:
        return obj
    box = [obj if ctx.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list by rank), ``None`` on the others."""
    if not ctx.active:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def choose_strategy(strategy: str, *, shardable: bool, n_todo: int, world: int) -> str:
    """``"data"`` or ``"checkpoints"`` for ``strategy`` ``"auto"``/``"data"``/``"checkpoints"``.

    ``auto``: split checkpoints when there are at least as many to compute as ranks (no
    communication per product), otherwise shard the data when the probe supports it.
    """
    if strategy not in ("auto", "data", "checkpoints"):
        raise ValueError(f"distribute must be 'auto', 'data' or 'checkpoints'; got {strategy!r}")
    if strategy == "data" and not shardable:
        raise ValueError("this probe cannot shard its data over ranks (it takes no reduce_fn); "
                         "use --distribute checkpoints")  # fmt: skip
    if strategy != "auto":
        return strategy
    if n_todo >= world or not shardable:
        return "checkpoints"
    return "data"


def distributed_sweep(
    run: Any,
    probe: str,
    steps: Sequence[int],
    ctx: DistContext,
    *,
    strategy: str = "auto",
    store: Any = None,
    recompute: bool = False,
    progress: Callable[[int, int, int | None, bool, float], None] | None = None,
    **kwargs: Any,
) -> list[tuple[int, Any, bool]] | None:
    """Run ``probe`` on ``steps`` of ``run`` across the ranks of ``ctx``; ``[(step, result, cached)]``
    on rank 0 (in step order), ``None`` on the others. ``kwargs`` go to :func:`~dynascope.runner.run_probe`
    (``params``, ``split``, ``max_samples``, ``sample``, ``device``, ``shard``). In one process it is
    :func:`~dynascope.runner.sweep`.
    The loop, the cache key and the write are the runner's; ``progress(i, n, step, cached, seconds)``
    (the runner's callback) is called on rank 0 after each checkpoint it handles.
    """
    from .runner import PROBES, cached_results, plan, store_result, sweep
    from .store import ResultStore

    store = store if store is not None else ResultStore(run.path)
    steps = list(steps)
    if not ctx.active:
        return sweep(run, probe, steps, store=store, recompute=recompute, progress=progress, **kwargs)
    keys = ("params", "split", "max_samples", "sample", "device", "shard")
    lookup = {k: kwargs[k] for k in keys if k in kwargs}
    # rank 0 decides what is cached; everyone follows that decision (no diverging collectives)
    cached: dict[int, Any] = {}
    if ctx.is_main and not recompute:
        cached = cached_results(run, probe, steps, store=store, **lookup)
    todo = broadcast_object([s for s in steps if s not in cached], ctx)
    mode = choose_strategy(
        strategy, shardable=PROBES[probe].shardable, n_todo=len(todo), world=ctx.world_size
    )
    report = progress if ctx.is_main else None
    if kwargs.get("shard") is not None:  # the model is sharded over the ranks: every rank on every step
        rows = sweep(
            run, probe, todo, store=store, recompute=True, rank=ctx.rank, world_size=ctx.world_size,
            write=ctx.is_main, progress=report, **kwargs,
        )  # fmt: skip
        computed = {s: result for s, result, _ in rows}
    elif mode == "data":
        rows = sweep(
            run, probe, todo, store=store, recompute=True, reduce_fn=allreduce_sum, rank=ctx.rank,
            world_size=ctx.world_size, write=ctx.is_main, progress=report, **kwargs,
        )  # fmt: skip
        computed = {s: result for s, result, _ in rows}
    else:
        share = split_steps(todo, ctx.rank, ctx.world_size)
        rows = sweep(run, probe, share, store=store, recompute=True, write=False, progress=report, **kwargs)
        parts = gather_objects({s: result for s, result, _ in rows}, ctx)
        computed = {}
        if ctx.is_main:
            assert parts is not None
            for part in parts:
                computed.update(part)
            for s in todo:  # the single writer, under the runner's key
                store_result(plan(run, probe, step=s, **lookup), computed[s], store)
    if not ctx.is_main:
        return None
    return [(s, cached[s], True) if s in cached else (s, computed[s], False) for s in steps]


__all__ = [
    "DistContext",
    "allreduce_sum",
    "broadcast_object",
    "choose_strategy",
    "distributed_sweep",
    "gather_objects",
    "init_from_env",
    "is_main",
    "SHARDED_MODEL_PROBES",
    "SHARD_KINDS",
    "shard_data",
    "shard_model",
    "split_steps",
]
