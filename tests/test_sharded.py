"""Probes on FSDP2-sharded and DDP-wrapped models (local gloo ranks) equal dense float64 references."""

from __future__ import annotations

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


def _worker(rank: int, init: str, world: int, wrap: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dynascope.probes.lanczos import eigsh
    from dynascope.probes.sharded import sharded_operator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model()
        if wrap == "fsdp":
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _data()
        bounds = [round(N * r / world) for r in range(world + 1)]  # shards of unequal sizes
        shard = slice(bounds[rank], bounds[rank + 1])
        op = sharded_operator(model, (x[shard], y[shard]), loss="cross_entropy")
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        from dynascope import probes

        result = {"hv": op.matvec(v), "v": v, "eig": eigsh(op, k=3, tol=1e-9).values,
                  "error": getattr(op, "error", 0.0)}  # fmt: skip
        # the probes take the sharded model and this rank's shard directly
        result["probe_eig"] = probes.hessian_eigenvalues(model, (x[shard], y[shard]), k=2, tol=1e-9,
                                                         loss="cross_entropy").values  # fmt: skip
        result["lambda_max"] = probes.sharpness(model, (x[shard], y[shard]), lr=0.1, trace=False,
                                                loss="cross_entropy").lambda_max  # fmt: skip
        torch.save(result, Path(out) / f"{wrap}_{world}_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(init: str, world: str, wrap: str, out: str) -> None:
    mp.spawn(_worker, args=(init, int(world), wrap, out), nprocs=int(world), join=True)


@pytest.mark.slow
@pytest.mark.parametrize("wrap,world", [("fsdp", 2), ("ddp", 2), ("fsdp", 4)])
def test_sharded_model_products_and_top_eigenvalues_equal_the_dense_hessian(tmp_path, wrap, world) -> None:
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_sharded as t; t._spawn(*sys.argv[2:])"
    here = str(Path(__file__).resolve().parent)
    proc = run_fresh(code, [here, rendezvous(tmp_path), str(world), wrap, str(tmp_path)])
    assert proc.returncode == 0, failure(proc)
    H = _dense_hessian()
    ref_eig = torch.linalg.eigvalsh(H).flip(0)[:3]
    first = torch.load(tmp_path / f"{wrap}_{world}_rank0.pt")
    for rank in range(world):
        r = torch.load(tmp_path / f"{wrap}_{world}_rank{rank}.pt")
        hv = H @ r["v"]
        # FSDP: Richardson-extrapolated differences in float64 (O(h⁴) with h ≈ 7e-4): far below 1e-6
        assert float((r["hv"] - hv).norm() / hv.norm()) < 1e-9, (rank, wrap)
        torch.testing.assert_close(r["eig"], ref_eig, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["eig"], first["eig"], rtol=0, atol=0)  # every rank holds the same values
        torch.testing.assert_close(r["probe_eig"], ref_eig[:2], rtol=1e-6, atol=0)
        assert r["lambda_max"] == pytest.approx(float(ref_eig[0]), rel=1e-6)
    if wrap == "fsdp":
        assert 0 < first["error"] < 1e-3


def test_a_model_that_is_neither_sharded_nor_wrapped_is_refused() -> None:
    from dynascope.probes.sharded import sharded_operator

    with pytest.raises(ValueError, match="neither FSDP2-sharded"):
        sharded_operator(_model(), _data())


if __name__ == "__main__":  # pragma: no cover
    _spawn(*sys.argv[1:])
