"""Finite-difference Hessian-vector products of an FSDP2-sharded model against the exact float64 product.

Run:  .venv/bin/python bench/bench_sharded.py   (one process, world size 1 over gloo; CPU)

Model: Linear(32, 64) → LayerNorm → GELU → Linear(64, 64) → GELU → Linear(64, 10) (6,986 parameters),
``fully_shard`` on every Linear and on the whole, 256 samples, cross-entropy. For each dtype of the model
(float64, float32, bfloat16) and each product (central difference ``D(h)``, Richardson ``R(h)``), the
relative error ``‖Hv − H₆₄v‖ / ‖H₆₄v‖`` over 5 random directions (median, max), where ``H₆₄v`` is the exact
double-backward product of the same weights in float64, and the operator's own error estimate.
"""

from __future__ import annotations

import os
import statistics
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


if __name__ == "__main__":
    main()
