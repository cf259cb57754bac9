"""Probes on FSDP2-sharded and DDP-wrapped models (local gloo ranks) equal dense float64 references."""

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

N = 37


def _model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def _dense_hessian() -> torch.Tensor:
    model, (x, y) = _model(), _data()
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()], strict=True)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = theta.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def _wrap(model: torch.nn.Module, wrap: str) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank: int, init: str, world: int, wrap: str, out: str) -> None:
    import torch.distributed as dist

    from dynascope import probes
    from dynascope.probes.lanczos import eigsh
    from dynascope.probes.sharded import sharded_operator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _wrap(_model(), wrap)
        x, y = _data()
        bounds = [round(N * r / world) for r in range(world + 1)]  # shards of unequal sizes
        shard = (x[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]])
        op = sharded_operator(model, shard, loss="cross_entropy")
        sp = op.vspace
        v = torch.randn(sp.size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        result = {
            "hv": sp.full(op.matmat(sp.rows(v)[:, None]))[:, 0], "v": v, "index": sp.index, "rows": op.size,
            "dense": eigsh(op, k=3, tol=1e-9).values,  # P = 45: the dense solve, columns gathered
            "eig": eigsh(op, k=3, tol=1e-9, method="lanczos").values,  # the sharded Krylov basis
            "error": getattr(op, "error", 0.0),
        }  # fmt: skip
        # the probes take the sharded model and this rank's shard directly
        top = probes.hessian_eigenvalues(model, shard, k=2, tol=1e-9, loss="cross_entropy", solver="lanczos")
        result["probe_eig"], result["probe_vectors"] = top.values, top.vectors
        result["solver_bytes"] = top.meta["solver_memory_bytes"]
        result["peak"] = top.meta["peak_basis_vectors"]
        sharp = probes.sharpness(model, shard, lr=0.1, trace=False, loss="cross_entropy")
        result["lambda_max"] = sharp.lambda_max
        # Hutch++ with a sketch of all P = 45 directions is the exact trace
        result["trace"] = probes.hessian_trace(model, shard, n_matvecs=140, method="hutch++",
                                               loss="cross_entropy").estimate  # fmt: skip
        # the default method on rows of the same Rademacher probes as one process: its estimate (below)
        result["auto_trace"] = probes.hessian_trace(model, shard, n_matvecs=30, loss="cross_entropy").estimate
        density = probes.hessian_density(model, shard, n_probes=3, lanczos_steps=10, loss="cross_entropy")
        result["ritz"], result["ritz_weights"] = density.ritz_values, density.ritz_weights
        torch.save(result, Path(out) / f"{wrap}_{world}_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(init: str, world: str, wrap: str, out: str) -> None:
    mp.spawn(_worker, args=(init, int(world), wrap, out), nprocs=int(world), join=True)


def _single_process() -> tuple[torch.Tensor, torch.Tensor, float]:
    """SLQ nodes and weights, and the default trace estimate, of the model on all the data in one process."""
    from dynascope import probes

    d = probes.hessian_density(_model(), _data(), n_probes=3, lanczos_steps=10, loss="cross_entropy")
    trace = probes.hessian_trace(_model(), _data(), n_matvecs=30, loss="cross_entropy").estimate
    return d.ritz_values, d.ritz_weights, trace


@pytest.mark.slow
@pytest.mark.parametrize("wrap,world", [("fsdp", 2), ("ddp", 2), ("fsdp", 4), ("ddp", 4)])
def test_sharded_models_with_a_sharded_basis_equal_the_dense_hessian(tmp_path, wrap, world) -> None:
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_sharded as t; t._spawn(*sys.argv[2:])"
    here = str(Path(__file__).resolve().parent)
    proc = run_fresh(code, [here, rendezvous(tmp_path), str(world), wrap, str(tmp_path)])
    assert proc.returncode == 0, failure(proc)
    H = _dense_hessian()
    evals, evecs = torch.linalg.eigh(H)
    ref_eig = evals.flip(0)[:3]
    ritz, weights, auto_trace = _single_process()
    runs = [torch.load(tmp_path / f"{wrap}_{world}_rank{rank}.pt") for rank in range(world)]
    # the ranks' rows partition the P coordinates: each holds about P / world of every basis vector
    index = torch.cat([r["index"] for r in runs])
    assert torch.equal(index.sort().values, torch.arange(H.shape[0]))
    # FSDP2 splits each parameter's dim 0 in ceil(rows / world) chunks; DDP's split is even
    most = sum(-(-p.shape[0] // world) * p[0].numel() for p in _model().parameters())
    assert max(r["rows"] for r in runs) <= (most if wrap == "fsdp" else -(-H.shape[0] // world))
    vectors = torch.zeros(H.shape[0], 2, dtype=torch.float64)
    for r in runs:
        hv = H @ r["v"]
        # FSDP: Richardson-extrapolated differences in float64 (O(h⁴) with h ≈ 7e-4): far below 1e-6
        assert float((r["hv"] - hv).norm() / hv.norm()) < 1e-9, wrap
        for key in ("dense", "eig"):
            torch.testing.assert_close(r[key], ref_eig, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["probe_eig"], ref_eig[:2], rtol=1e-6, atol=0)
        assert r["lambda_max"] == pytest.approx(float(ref_eig[0]), rel=1e-6)
        assert r["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-6)
        assert r["auto_trace"] == pytest.approx(auto_trace, rel=1e-6)
        torch.testing.assert_close(r["ritz"], ritz, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(r["ritz_weights"], weights, rtol=1e-6, atol=1e-9)
        assert r["solver_bytes"] == r["peak"] * r["rows"] * 8  # the basis memory of this rank's rows
        vectors[r["index"]] = r["probe_vectors"].double()
        for key in ("dense", "eig", "probe_eig", "lambda_max", "trace", "ritz"):  # every rank: the same
            assert torch.equal(torch.as_tensor(r[key]), torch.as_tensor(runs[0][key])), key
    # the eigenvectors come back as each rank's rows of the top eigenvectors
    overlap = (evecs[:, -2:].flip(1).T @ vectors).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    if wrap == "fsdp":
        assert 0 < runs[0]["error"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["fsdp", "ddp"])
def test_torchrun_cli_probes_a_sharded_model_like_one_process(tmp_path, shard) -> None:
    """`torchrun --nproc-per-node 2 -m dynascope probe ... --shard fsdp|ddp`: each rank reads the checkpoint,
    keeps its shard of the model and of the data; rank 0 alone prints and writes the store."""
    from test_distributed import MODEL, _make_run

    from dynascope.runner import run_probe
    from dynascope.store import ResultStore

    run = _make_run(tmp_path / "run", {**MODEL, "activation": "tanh"})  # smooth: finite differences of FSDP
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None
    args = ["hessian_eigenvalues", str(run.path), "--step", "5", "--param", "k=2", "--param", "dtype=float64",
            "--param", "solver=lanczos", "--param", "tol=1e-10"]  # fmt: skip
    cmd = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "dynascope", "probe", *args,
           "--shard", shard]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("hessian_eigenvalues step 5") == 1  # only rank 0 prints
    rows = ResultStore(run.path).list("hessian_eigenvalues")
    assert len(rows) == 1  # only rank 0 writes
    params = {"k": 2, "dtype": torch.float64, "solver": "lanczos", "tol": 1e-10}
    one = ResultStore(tmp_path / "one")
    single, _ = run_probe(run, "hessian_eigenvalues", step=5, params=params, store=one)
    torch.testing.assert_close(rows[0].result.values, single.values, rtol=1e-6, atol=0)
    fsdp_basis = "sharded: each rank holds its parameter shards' rows"
    assert rows[0].result.meta["basis"] == (fsdp_basis if shard == "fsdp" else "split evenly across ranks")


def test_shard_outside_torchrun_or_for_a_probe_without_sharded_models_is_refused(tmp_path, capsys) -> None:
    from test_distributed import _make_run

    from dynascope.cli import main
    from dynascope.runner import run_probe

    run = _make_run(tmp_path / "run")
    assert main(["probe", "hessian_eigenvalues", str(run.path), "--shard", "fsdp"]) == 2
    assert "start it with torchrun" in capsys.readouterr().err
    with pytest.raises(ValueError, match="takes no sharded model"):
        run_probe(run, "gradient_coherence", shard="ddp")


def test_a_model_that_is_neither_sharded_nor_wrapped_is_refused() -> None:
    from dynascope.probes.sharded import sharded_operator

    with pytest.raises(ValueError, match="neither FSDP2-sharded"):
        sharded_operator(_model(), _data())


if __name__ == "__main__":  # pragma: no cover
    _spawn(*sys.argv[1:])


def _gpt2_worker(rank: int, init: str, out: str) -> None:
    """A GPT-2 in train mode (dropout on), sharded by ``shard_model`` (every module but the tied embedding and
    head, which the root owns), after a ``no_grad`` forward that leaves the root's parameters gathered;
    masked tokens split unevenly."""
    import torch.distributed as dist
    from test_tracker_distributed import _hf_batch, _hf_model

    from dynascope import probes
    from dynascope.datasets.batching import slice_inputs
    from dynascope.distributed import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = shard_model(_hf_model().double().train(), "fsdp")  # tied embedding and head: left to the root
        batch = _hf_batch()
        with torch.no_grad():
            model(**batch)
        mine = slice_inputs(batch, slice(0, 3) if rank == 0 else slice(3, 8))  # 3 and 5 sequences
        top = probes.hessian_eigenvalues(model, mine, k=2, tol=1e-10, solver="lanczos", loss=GPT2_LOSS)
        result = {"eig": top.values, "calibration": top.meta["fd_calibration"], "training": model.training,
                  "dropout_training": model.transformer.drop.training}  # fmt: skip
        torch.save(result, Path(out) / f"gpt2_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


GPT2_LOSS = {"name": "token_cross_entropy", "shift": True}


def _spawn_gpt2(init: str, out: str) -> None:
    mp.spawn(_gpt2_worker, args=(init, out), nprocs=2, join=True)


@pytest.mark.slow
def test_fsdp_transformer_in_train_mode_with_root_parameters_equals_the_exact_product(tmp_path) -> None:
    """FSDP's products on a transformer: eval mode inside the products (dropout would make differences of
    gradients noise), the root's gathered parameters resharded before the shards move, and a calibrated step
    (the default left 1e-4 of truncation here): the top-2 equal the exact-product Lanczos in one process."""
    from test_tracker_distributed import _hf_batch, _hf_model

    from dynascope import probes

    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_sharded as t; t._spawn_gpt2(*sys.argv[2:])"  # noqa: E501
    here = str(Path(__file__).resolve().parent)
    proc = run_fresh(code, [here, rendezvous(tmp_path), str(tmp_path)])
    assert proc.returncode == 0, failure(proc)
    exact = probes.hessian_eigenvalues(_hf_model().double(), _hf_batch(), k=2, tol=1e-12, loss=GPT2_LOSS)
    for rank in range(2):
        r = torch.load(tmp_path / f"gpt2_rank{rank}.pt")
        torch.testing.assert_close(r["eig"], exact.values, rtol=1e-6, atol=0)
        assert len(r["calibration"]) > 1  # the default step was refined
        assert r["training"] and r["dropout_training"]  # the model's own mode is restored


def _structure_of_sharded_sequential(init: str, out: str) -> None:
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dynascope.models.structure import describe_module

    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        model = _model()
        plain = describe_module(model)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)  # classes become FSDPSequential / FSDPLinear
        described = [plain, describe_module(model), type(model).__name__]
        Path(out, "structure.json").write_text(json.dumps(described))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_fsdp_sharded_sequential_is_described_by_its_own_layers(tmp_path) -> None:
    """FSDP2 swaps each sharded module's class for ``FSDP<Name>``: the structure spec a Tracker writes for an
    inline ``nn.Sequential`` still names the torch.nn layers (and rebuilds the same model)."""
    import json

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_sharded as t; "
        "t._structure_of_sharded_sequential(*sys.argv[2:])"
    )
    proc = run_fresh(code, [str(Path(__file__).resolve().parent), rendezvous(tmp_path), str(tmp_path)])
    assert proc.returncode == 0, failure(proc)
    plain, sharded, cls = json.loads((tmp_path / "structure.json").read_text())
    assert cls == "FSDPSequential" and sharded == plain
