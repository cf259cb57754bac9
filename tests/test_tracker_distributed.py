"""dynascope.Tracker under a real torch.distributed process group: two gloo ranks train a DDP model and
both call the tracker with the same run folder; only rank 0 writes, and the folder is complete."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fresh_process import failure, rendezvous, run_fresh

import dynascope
from dynascope.tracker import run_status

WORLD = 2
STEPS = 12
LR = 0.1


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)


def _worker(rank: int, init_method: str, run_dir: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from dynascope.models import build

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x, y = _data()
        xs, ys = x[rank::WORLD], y[rank::WORLD]  # each rank trains on its shard
        threads_before = threading.active_count()
        tr = dynascope.Tracker(run_dir, model, data=(x, y), loss="cross_entropy", optimizer=opt, budget=None,
                               schedule="linear", checkpoint_every=4, probes={"lambda_max": 6})  # fmt: skip
        tr.step(0)
        for s in range(1, STEPS + 1):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            loss.backward()  # all-reduces the gradients: both ranks hold the same weights
            opt.step()
            tr.step(s, metrics={"train_loss": loss})
        tr.close()
        info = {
            "writer": tr.writer, "has_run": tr.run is not None, "writes": tr._writes,
            "new_threads": threading.active_count() - threads_before, "pid": os.getpid(),
        }  # fmt: skip
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(info))
        torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _spawn(init_method: str, run_dir: str, out_dir: str) -> None:
    mp.spawn(_worker, args=(init_method, run_dir, out_dir), nprocs=WORLD, join=True)


def _train(tmp_path: Path, spawn: str) -> tuple[Path, Path]:
    """Run ``spawn`` (a function of this module) in a fresh interpreter: ``(run folder, rank outputs)``."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_tracker_distributed as t; "
        f"t.{spawn}(*sys.argv[2:])"
    )
    here = str(Path(__file__).resolve().parent)
    proc = run_fresh(code, [here, rendezvous(tmp_path), str(run_dir), str(out)])
    assert proc.returncode == 0, failure(proc)
    return run_dir, out


@pytest.mark.slow  # two spawned processes importing torch: ~10 s idle, more on a loaded machine
def test_only_rank_zero_writes_under_a_gloo_process_group(tmp_path: Path) -> None:
    run_dir, out = _train(tmp_path, "_spawn")
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["writer"] and r0["has_run"] and r0["writes"]
    # rank 1: no run object, no writer (thread or worker), nothing written (the status file is rank 0's)
    assert not r1["writer"] and not r1["has_run"] and not r1["writes"] and r1["new_threads"] == 0
    status = run_status(run_dir)
    assert status["state"] == "finished" and status["pid"] == r0["pid"] and status["step"] == STEPS
    run = dynascope.open_run(run_dir)
    assert run.steps == [0, 4, 6, 8, 12]  # "linear" every 4, the probe steps (6, 12), the last step
    m = run.metrics
    assert m["step"].tolist() == list(range(STEPS + 1))  # one writer: no duplicated rows
    assert m["train_loss"].notna().sum() == STEPS and m["lambda_max"].notna().sum() == 3
    assert len(run.cached("sharpness")) == 3
    # rank 0 probed model.module on the whole batch: reopened in one process, step 0 (no warm start) agrees
    from dynascope import probes

    x, y = _data()
    again = probes.sharpness(run.model(0), (x, y), lr=LR, k=1, tol=1e-3, trace=False, loss="cross_entropy")
    assert float(m.loc[m["step"] == 0, "lambda_max"].iloc[0]) == pytest.approx(again.lambda_max, rel=1e-6)
    # the checkpoints hold the (DDP-synchronised) weights, saved under the module's names
    final = torch.load(out / "rank1.pt")
    for k, v in run.model(STEPS).state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)
    assert not list(run_dir.glob("**/.*.tmp"))  # no write left half-done


#: FSDP's product is a finite difference of gradients: a smooth activation (ReLU's kinks break it)
SMOOTH_MLP = {"name": "mlp", "in_dim": 4, "width": 8, "depth": 2, "out_dim": 3, "seed": 0,
              "activation": "tanh"}  # fmt: skip


def _fsdp_worker(rank: int, init_method: str, run_dir: str, out_dir: str) -> None:
    from dynascope.distributed import shard_model
    from dynascope.models import build

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        model = shard_model(build(**SMOOTH_MLP).double(), "fsdp")
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x, y = _data()
        x = x.double()
        tr = dynascope.Tracker(run_dir, model, data=(x, y), loss="cross_entropy", optimizer=opt, budget=None,
                               schedule="linear", checkpoint_every=4,
                               probes={"lambda_max": {"every": 6, "tol": 1e-10}})  # fmt: skip
        tr.step(0)
        for s in range(1, STEPS + 1):
            opt.zero_grad()
            # each rank its contiguous half; FSDP averages the gradients: the full-batch mean gradient
            half = slice(rank * 16, (rank + 1) * 16)
            loss = torch.nn.functional.cross_entropy(model(x[half]), y[half])
            loss.backward()
            opt.step()
            tr.step(s, metrics={"train_loss": loss})
        tr.close()
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # a collective on every rank
        info = {"writer": tr.writer, "writes": tr._writes}
        (Path(out_dir) / f"fsdp_rank{rank}.json").write_text(json.dumps(info))
        torch.save(full, Path(out_dir) / f"fsdp_rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _spawn_fsdp(init_method: str, run_dir: str, out_dir: str) -> None:
    mp.spawn(_fsdp_worker, args=(init_method, run_dir, out_dir), nprocs=WORLD, join=True)


@pytest.mark.slow
def test_tracking_an_fsdp_model_probes_collectively_and_reopens_in_one_process(tmp_path: Path) -> None:
    """FSDP2 training on 2 gloo ranks: λ_max is a collective probe (each rank its half of the probe batch),
    rank 0 writes the full state dict; reopened in one process, the exact λ_max of each checkpoint equals
    the tracked one."""
    from dynascope import probes
    from dynascope.models import Run, build, load_weights

    run_dir, out = _train(tmp_path, "_spawn_fsdp")
    r0, r1 = (json.loads((out / f"fsdp_rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["writer"] and r0["writes"] and not r1["writer"] and not r1["writes"]
    assert run_status(run_dir)["state"] == "finished"
    run = dynascope.open_run(run_dir)
    assert run.steps == [0, 4, 6, 8, 12]
    m = run.metrics
    assert m["step"].tolist() == list(range(STEPS + 1)) and m["lambda_max"].notna().sum() == 3
    x, y = _data()
    for step in (0, 6, 12):
        model = build(**SMOOTH_MLP).double()
        load_weights(Run.open(run_dir).checkpoint(step).path, model)
        exact = probes.sharpness(model, (x.double(), y), lr=LR, trace=False, tol=1e-10, loss="cross_entropy")
        tracked = float(m.loc[m["step"] == step, "lambda_max"].iloc[0])
        assert tracked == pytest.approx(exact.lambda_max, rel=1e-6), step
    final = torch.load(out / "fsdp_rank1.pt")  # the checkpoint is the full (gathered) state dict
    load_weights(Run.open(run_dir).checkpoint(STEPS).path, model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)
