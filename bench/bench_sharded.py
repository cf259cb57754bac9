"""Finite-difference Hessian-vector products of an FSDP2-sharded model against the exact float64 product.

Run:  .venv/bin/python bench/bench_sharded.py   (one process, world size 1 over gloo; CPU)
      .venv/bin/python bench/bench_sharded.py --basis   (the Krylov basis per rank at 1, 2 and 4 gloo ranks)

Model: Linear(32, 64) → LayerNorm → GELU → Linear(64, 64) → GELU → Linear(64, 10) (6,986 parameters),
``fully_shard`` on every Linear and on the whole, 256 samples, cross-entropy. For each dtype of the model
(float64, float32, bfloat16) and each product (central difference ``D(h)``, Richardson ``R(h)``), the
relative error ``‖Hv − H₆₄v‖ / ‖H₆₄v‖`` over 5 random directions (median, max), where ``H₆₄v`` is the exact
double-backward product of the same weights in float64, and the operator's own error estimate.

``--basis``: the block Lanczos basis per rank (:mod:`dynascope.probes.space`). A float32 MLP 256-1024-768-10
(1,058,058 parameters), 256 samples split across the ranks, FSDP2 (``fully_shard`` per Linear and the root) or
DDP; ``hessian_eigenvalues(k=3, solver="lanczos", max_basis=40, max_iter=40, block_size=2)`` so that every
world size holds the same 40 basis vectors. Per rank: the rows of each vector it holds, the basis by the
formula (``peak_basis_vectors × rows × 4`` bytes, ``meta["solver_memory_bytes"]``), and the measured peak RSS
above the start of the probe (``meta["measured_peak_bytes"]``, ``MALLOC_MMAP_THRESHOLD_=131072``) next to the
peak of one product alone (a block of 2: FSDP's gathered parameters and gradients, or DDP's whole block). Each
world size runs in its own spawned processes (file rendezvous).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

import torch
from torch import nn


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 10)).to(dtype)  # fmt: skip


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dynascope.probes.operators import OperatorSpec
    from dynascope.probes.sharded import FiniteDifferenceHessian

    torch.set_num_threads(1)
    rdv = os.path.join(tempfile.mkdtemp(), "rdv")
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (256,), generator=g)
    exact = OperatorSpec(kind="hessian", loss="cross_entropy").build(model(torch.float64), (x, y))
    vs = [torch.randn(exact.size, generator=g, dtype=torch.float64) for _ in range(5)]
    refs = [exact.matvec(v) for v in vs]
    print("| model dtype | product | rel. error median | max | error estimate | gradients per product |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        m = model(dtype)
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m)
        for richardson in (False, True):
            op = FiniteDifferenceHessian(m, (x.to(dtype), y), loss="cross_entropy", richardson=richardson)
            errs = [float((op.matvec(v.to(dtype)).double() - r).norm() / r.norm()) for v, r in zip(vs, refs)]
            name = "Richardson R(h)" if richardson else "central D(h)"
            est = f"{op.error:.1e}" if richardson else "—"
            med, worst = statistics.median(errs), max(errs)
            print(f"| {str(dtype).split('.')[1]} | {name} | {med:.1e} | {worst:.1e} | {est} | "
                  f"{op.n_gradients // len(vs)} |")
    dist.destroy_process_group()


def basis_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 768), nn.GELU(), nn.Linear(768, 10))


def _basis_rank(rank: int, world: int, wrap: str, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dynascope import probes
    from dynascope.probes.memory import peak_memory
    from dynascope.probes.sharded import sharded_operator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=world)
    m = basis_model()
    if wrap == "fsdp":
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m)
    else:
        m = nn.parallel.DistributedDataParallel(m)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 256, generator=g), torch.randint(0, 10, (256,), generator=g)
    shard = x[rank::world], y[rank::world]  # the same 256 samples at every world size
    op = sharded_operator(m, shard, loss="cross_entropy")
    with peak_memory() as one:
        op.matmat(op.vspace.rows(torch.randn(op.vspace.size, 2, generator=g)))
    res = probes.hessian_eigenvalues(m, shard, k=3, loss="cross_entropy", solver="lanczos", max_basis=40,
                                     max_iter=40, block_size=2, tol=1e-12, refine=False,
                                     check_determinism=False)  # fmt: skip
    row = {"rows": op.size, "P": op.vspace.size, "peak_vectors": res.meta["peak_basis_vectors"],
           "basis_bytes": res.meta["solver_memory_bytes"], "measured": res.meta["measured_peak_bytes"],
           "one_product": one.bytes, "lambda_max": float(res.values[0])}  # fmt: skip
    torch.save(row, f"{folder}/{wrap}_{world}_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def basis() -> None:
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed tensors go back to the system (probes/memory.py)
    mib = 2.0**20
    print("| model | ranks | rows per rank (max) | basis vectors | basis per rank (formula) | measured peak "
          "per rank (max) | one product's peak | λ_max |")
    print("|---|---|---|---|---|---|---|---|")
    for wrap in ("fsdp", "ddp"):
        for world in (1, 2, 4):
            folder = tempfile.mkdtemp()
            mp.spawn(_basis_rank, args=(world, wrap, folder), nprocs=world, join=True)
            rows = [torch.load(f"{folder}/{wrap}_{world}_{r}.pt") for r in range(world)]
            top = max(rows, key=lambda r: r["rows"])
            print(f"| {wrap.upper()} | {world} | {top['rows']:,} of {top['P']:,} | {top['peak_vectors']} | "
                  f"{top['basis_bytes'] / mib:.1f} MiB | {max(r['measured'] for r in rows) / mib:.1f} MiB | "
                  f"{max(r['one_product'] for r in rows) / mib:.1f} MiB | {top['lambda_max']:.6g} |")


if __name__ == "__main__":
    basis() if "--basis" in sys.argv else main()
