"""Where the time of a top-5 Hessian eigensolve goes: the products vs the solver's own work.

Run:  .venv/bin/python bench/bench_solver_overhead.py [--widths 128,1024,2048] [--samples 512]

A tanh MLP 64→w→w→10 (w = 128, 1024, 2048: 26k, 1.1M, 4.3M parameters) on ``--samples`` Gaussian inputs with
random labels, cross-entropy, float32, one thread. ``hessian_eigenvalues(k=5)`` (defaults: block Lanczos,
tol 1e-4) is run once to warm up, then under cProfile; the table splits its time into the operator's products
(cumulative time in ``CurvatureOperator._products``) and the rest (Gram–Schmidt projections and
subtractions, thick restarts, the small eigenproblems, checks), and compares one product with one gradient
(forward + backward of the loss, the least of 3).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch
from torch import nn


def _profile(w: int, n: int) -> dict[str, float]:
    import dynascope.probes as probes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10))
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    grads = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(time.perf_counter() - t0)
    probes.hessian_eigenvalues(model, (x, y), k=5, loss="cross_entropy")  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = probes.hessian_eigenvalues(model, (x, y), k=5, loss="cross_entropy")
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    products = sum(v[3] for k, v in stats.items() if k[0].endswith("operators.py") and k[2] == "_products")
    return {
        "P": sum(p.numel() for p in model.parameters()), "total": total, "products": products,
        "n": res.meta["n_matvecs"], "grad": min(grads),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="128,1024,2048")
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"command: python bench/bench_solver_overhead.py --widths {args.widths} --samples {args.samples}")
    print("| P | products | total s | products s | solver s | solver / products "
          "| s per product / gradient | load |")
    print("|---|---|---|---|---|---|---|---|")
    for w in (int(v) for v in args.widths.split(",")):
        r = _profile(w, args.samples)
        solver = r["total"] - r["products"]
        print(f"| {r['P']:,} | {r['n']} | {r['total']:.2f} | {r['products']:.2f} | {solver:.2f} "
              f"| {solver / r['products']:.2f} | {r['total'] / r['n'] / r['grad']:.2f} "
              f"| {os.getloadavg()[0]:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
