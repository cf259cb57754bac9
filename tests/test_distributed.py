"""Data-sharded probes over torch.distributed (two local gloo processes) equal the one-process results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fresh_process import failure, rendezvous, run_fresh

from dynascope import distributed as D
from dynascope.datasets.batching import BatchSource
from dynascope.models import Run, build

N_SAMPLES = 37  # over 2 ranks: shards of 19 and 18
WORLD = 2
DATASET = {"name": "xor", "n_train": N_SAMPLES, "n_test": 8, "seed": 3}
MODEL = {"name": "mlp", "in_dim": 2, "width": 5, "depth": 1, "out_dim": 2, "seed": 1}


def _model_and_data() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from dynascope.datasets import load

    model = build(**MODEL).double()
    x, y = load(**DATASET).train
    return model, (x.double(), y)


def _probes(model, data, reduce_fn=None) -> dict[str, torch.Tensor]:
    """Hessian top-k, trace and SLQ density (float64), single-batch (graph) and batched (func) paths."""
    from dynascope import probes

    eig = probes.hessian_eigenvalues(model, data, k=3, tol=1e-10, reduce_fn=reduce_fn)
    eig_b = probes.hessian_eigenvalues(model, data, k=1, tol=1e-10, batch_size=10, reduce_fn=reduce_fn)
    tr = probes.hessian_trace(model, data, n_matvecs=24, reduce_fn=reduce_fn)
    den = probes.hessian_density(model, data, n_probes=3, lanczos_steps=12, reduce_fn=reduce_fn)
    diag = probes.hessian_diagonal(model, data, n_matvecs=16, reduce_fn=reduce_fn)
    return {
        "diagonal": diag.values, "diagonal_stderr": diag.stderr,
        "eig": eig.values, "eig_batched": eig_b.values, "eig_matvecs": torch.tensor(eig.n_matvecs),
        "trace": torch.tensor([tr.estimate, tr.stderr]), "ritz_values": den.ritz_values,
        "ritz_weights": den.ritz_weights, "density": den.density,
        "n_samples": torch.tensor(eig.meta["n_samples"]),
    }  # fmt: skip


def _worker(rank: int, init_method: str, out_dir: str, run_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        model, data = _model_and_data()
        shard = D.shard_data(data, rank, WORLD)
        assert shard.num_samples() == (19 if rank == 0 else 18)
        torch.save(_probes(model, shard, reduce_fn=D.allreduce_sum), Path(out_dir) / f"rank{rank}.pt")
        # checkpoint sweeps through the runner: data-sharded and split across ranks; only rank 0 writes
        ctx = D.DistContext(rank=rank, world_size=WORLD)
        run = Run.open(run_dir)
        from dynascope.store import ResultStore

        for strategy in ("data", "checkpoints"):
            store = ResultStore(Path(out_dir) / f"store_{strategy}")
            rows = D.distributed_sweep(
                run, "hessian_trace", run.steps(), ctx, strategy=strategy, store=store,
                params={"n_matvecs": 12, "dtype": torch.float64},
            )  # fmt: skip
            assert (rows is None) == (rank != 0)
        torch.distributed.barrier()  # both ranks done with every collective before the group goes away
    finally:
        torch.distributed.destroy_process_group()


def _make_run(path: Path, model: dict | None = None) -> Run:
    run = Run.create(path, model=model or MODEL, dataset=DATASET, optimizer={"name": "sgd", "lr": 0.5})
    model = run.build_model()
    for i, step in enumerate((0, 5)):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + 0.1 * i)
        run.save_checkpoint(model, step)
    return run


def _spawn(init_method: str, out_dir: str, run_dir: str) -> None:
    mp.spawn(_worker, args=(init_method, out_dir, run_dir), nprocs=WORLD, join=True)


@pytest.mark.slow  # two spawned processes importing torch: ~10 s idle, more on a loaded machine
def test_sharded_probes_equal_single_process(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    # the ranks start from a fresh interpreter (tests/fresh_process.py)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_distributed as t; t._spawn(*sys.argv[2:])"
    )
    args = [str(Path(__file__).resolve().parent), rendezvous(tmp_path), str(tmp_path), str(run.path)]
    proc = run_fresh(code, args)
    assert proc.returncode == 0, failure(proc)
    model, data = _model_and_data()
    ref = _probes(model, data)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert int(r0["n_samples"]) == N_SAMPLES
    for key in ("eig", "eig_batched", "trace", "ritz_values", "ritz_weights", "density", "diagonal",
                "diagonal_stderr"):  # fmt: skip
        torch.testing.assert_close(r0[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
        torch.testing.assert_close(r1[key], r0[key], rtol=0, atol=0, msg=f"ranks disagree on {key}")
    assert int(r0["eig_matvecs"]) == int(ref["eig_matvecs"])

    from dynascope.runner import run_probe
    from dynascope.store import ResultStore

    params = {"n_matvecs": 12, "dtype": torch.float64}
    one = ResultStore(tmp_path / "one")
    single = {s: run_probe(run, "hessian_trace", step=s, params=params, store=one)[0]
              for s in run.steps()}  # fmt: skip
    for strategy in ("data", "checkpoints"):
        store = ResultStore(tmp_path / f"store_{strategy}")
        stored = store.list("hessian_trace")
        assert sorted(s.step for s in stored) == run.steps(), strategy  # one row per checkpoint: one writer
        for s in stored:
            assert s.result.estimate == pytest.approx(single[s.step].estimate, rel=1e-10), strategy
            # the sweep used the runner's cache key: the runner finds the stored row
            hit, cached = run_probe(run, "hessian_trace", step=s.step, params=params, store=store)
            assert cached and hit.estimate == s.result.estimate


def test_helpers_without_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in D.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    ctx = D.init_from_env()
    assert not ctx.active and ctx.is_main and ctx.world_size == 1 and D.is_main()
    assert D.broadcast_object([1, 2], ctx) == [1, 2] and D.gather_objects("x", ctx) == ["x"]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_from_env()
    assert D.split_steps([0, 10, 20, 30, 40], 0, 2) == [0, 20, 40]
    assert D.split_steps([0, 10, 20, 30, 40], 1, 2) == [10, 30]
    assert D.choose_strategy("auto", shardable=True, n_todo=5, world=2) == "checkpoints"
    assert D.choose_strategy("auto", shardable=True, n_todo=1, world=2) == "data"
    assert D.choose_strategy("auto", shardable=False, n_todo=1, world=2) == "checkpoints"
    with pytest.raises(ValueError, match="cannot shard"):
        D.choose_strategy("data", shardable=False, n_todo=1, world=2)
    x, y = torch.arange(37.0)[:, None], torch.zeros(37, dtype=torch.long)
    shards = [D.shard_data((x, y), r, 3) for r in range(3)]
    assert [s.num_samples() for s in shards] == [13, 12, 12]
    assert torch.equal(torch.cat([s.tensors()[0] for s in shards]), x)  # contiguous, complete, disjoint
    assert isinstance(shards[0], BatchSource)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun"
)
def test_torchrun_cli_matches_single_process(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m dynascope probe ...` shards the data and writes once."""
    run = _make_run(tmp_path / "run")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dynascope", "probe",  # its own free port
           "hessian_eigenvalues", str(run.path), "--step", "5", "--param", "k=2",
           "--param", "dtype=float64"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("hessian_eigenvalues step 5") == 1  # only rank 0 prints
    assert "over 2 ranks" in proc.stdout
    from dynascope.runner import run_probe
    from dynascope.store import ResultStore

    rows = ResultStore(run.path).list("hessian_eigenvalues")
    assert len(rows) == 1
    single, _ = run_probe(run, "hessian_eigenvalues", step=5, params={"k": 2, "dtype": torch.float64},
                          store=ResultStore(tmp_path / "single"))  # fmt: skip
    torch.testing.assert_close(rows[0].result.values, single.values, rtol=1e-9, atol=1e-12)
