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


@pytest.mark.slow
def test_lightning_model_parallel_strategy_tracks_an_fsdp_module_on_every_rank(tmp_path: Path) -> None:
    """Lightning's ``ModelParallelStrategy`` (FSDP2 via ``fully_shard`` in ``configure_model``) on 2 gloo
    ranks under real torchrun: both ranks join the tracker's collectives, rank 0 alone writes; reopened in
    one process, each λ_max equals the exact one of its checkpoint, the last checkpoint the final weights."""
    import shutil
    import subprocess
    import sys

    from dynascope import probes

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None
    script = Path(__file__).resolve().parent / "own" / "lightning_fsdp.py"
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [torchrun, "--standalone", "--nproc-per-node=2", str(script), str(run_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0 == {"tracked": True, "writer": True, "collective": True}
    assert r1 == {"tracked": True, "writer": False, "collective": True}  # joined, wrote nothing
    assert run_status(run_dir)["state"] == "finished"
    run = dynascope.open_run(run_dir)
    assert run.run.model_config["factory"].endswith("lightning_fsdp.py:ShardedNet")  # the class, not FSDP's
    assert run.steps == [0, 4, 6, 8, 12]
    m = run.metrics
    assert m["step"].tolist() == list(range(13)) and m["lambda_max"].notna().sum() == 3
    x, y = run.dataset().train
    for step in (0, 6, 12):
        exact = probes.sharpness(run.model(step), (x, y), lr=0.1, trace=False, tol=1e-10,
                                 loss="cross_entropy")  # fmt: skip
        tracked = float(m.loc[m["step"] == step, "lambda_max"].iloc[0])
        assert tracked == pytest.approx(exact.lambda_max, rel=1e-6), step
    final = torch.load(out / "final.pt")
    for k, v in run.model(12).state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)


def _hf_fsdp_worker(rank: int, init_method: str, run_dir: str, out_dir: str) -> None:
    """A GPT-2 sharded with ``fully_shard`` per block, trained on dict batches with an attention mask, with
    ``HFTracker``'s hooks called as the Trainer calls them (accelerate's FSDP needs an accelerator: on CPU the
    Trainer itself falls back to DDP, so the loop is written out)."""
    import transformers
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        model = _hf_model().double()
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        batch = _hf_batch()
        cb = dynascope.HFTracker(run_dir, data=batch, loss={"name": "token_cross_entropy", "shift": True},
                                 budget=None, schedule="linear", checkpoint_every=4,
                                 probes={"lambda_max": {"every": 3, "tol": 1e-10}})  # fmt: skip
        args, control = None, transformers.TrainerControl()
        state = transformers.TrainerState(max_steps=6, is_world_process_zero=rank == 0)
        cb.on_train_begin(args, state, control, model=model, optimizer=opt)
        half = slice(rank * 4, (rank + 1) * 4)
        for s in range(1, 7):
            opt.zero_grad()
            out = model(input_ids=batch["input_ids"][half], attention_mask=batch["attention_mask"][half])
            loss = _masked_token_loss(out.logits, batch["input_ids"][half], batch["attention_mask"][half])
            loss.backward()
            opt.step()
            state.global_step = s
            cb.on_step_end(args, state, control)
            cb.on_log(args, state, control, logs={"loss": float(loss)})
        cb.on_train_end(args, state, control)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        info = {"tracked": cb.tracker is not None, "writer": bool(cb.tracker and cb.tracker.writer)}
        (Path(out_dir) / f"hf_rank{rank}.json").write_text(json.dumps(info))
        torch.save(full, Path(out_dir) / f"hf_rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _hf_model() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=24, n_positions=8,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _hf_batch() -> dict[str, torch.Tensor]:
    """8 sequences of 8 tokens; the last three positions of sequences 0–2 are padding (mask 0): rank 0's half
    holds fewer tokens, so a mean of the ranks' means would differ from the mean over all tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 24, (8, 8), generator=g)
    mask = torch.ones(8, 8, dtype=torch.long)
    mask[:3, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _masked_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask[:, 1:].reshape(-1).bool()
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat[keep], ids[:, 1:].reshape(-1)[keep])


def _spawn_hf_fsdp(init_method: str, run_dir: str, out_dir: str) -> None:
    mp.spawn(_hf_fsdp_worker, args=(init_method, run_dir, out_dir), nprocs=WORLD, join=True)


@pytest.mark.slow
def test_hf_tracker_on_an_fsdp_sharded_transformer_with_masks(tmp_path: Path) -> None:
    """HFTracker on a GPT-2 sharded by FSDP2 at 2 gloo ranks, dict batches with attention masks: both ranks
    join, rank 0 writes; each λ_max equals the exact λ_max of the reopened checkpoint on the masked batch."""
    from dynascope import probes

    run_dir, out = _train(tmp_path, "_spawn_hf_fsdp")
    r0, r1 = (json.loads((out / f"hf_rank{r}.json").read_text()) for r in range(WORLD))
    assert r0 == {"tracked": True, "writer": True} and r1 == {"tracked": True, "writer": False}
    run = dynascope.open_run(run_dir)
    assert "hf" in run.run.model_config
    m = run.metrics
    assert m["step"].tolist() == list(range(7)) and m["lambda_max"].notna().sum() == 3
    batch = _hf_batch()
    loss = {"name": "token_cross_entropy", "shift": True}
    for step in (0, 3, 6):
        model = run.model(step).double()
        exact = probes.sharpness(model, batch, lr=LR, trace=False, tol=1e-10, loss=loss)
        tracked = float(m.loc[m["step"] == step, "lambda_max"].iloc[0])
        assert tracked == pytest.approx(exact.lambda_max, rel=1e-6), step
    final = torch.load(out / "hf_rank1.pt")
    for k, v in run.model(6).state_dict().items():
        torch.testing.assert_close(v, final[k].to(v.dtype), rtol=0, atol=0)
