"""Peak memory of the eigensolver: ``hessian_eigenvalues(k)`` against one Hessian-vector product.

Run:  .venv/bin/python bench/bench_memory.py [--part all|eig|budget|others] [--write]

Each measurement runs in a fresh subprocess: build the model and data, note the resident set (RSS), reset
the peak (``/proc/self/clear_refs``), run the work, read the peak RSS (``VmHWM``). "one HVP" is one
product of the same operator ``hessian_eigenvalues`` builds (the cached first-order graph included);
the solver's *increase* is its peak minus that. Bound to meet: ``(max_basis + 4) · P · 4`` bytes
(float32), ``max_basis`` the default cap the solver ran under (``probes.lanczos.default_max_basis``:
``3k + 20 + 2b``, block ``b`` = 1 for k = 1 else 2, fewer vectors when that exceeds 768 MiB). Linux only.

Cases: an MLP 256-2000-2000-10 (4.53M parameters) on 256 samples, k = 1, 3, 10; and the registry's
ResNet-18 (widths 64-128-256-512, two blocks per stage, 11.2M parameters) on 64 images 3×32×32, k = 3.
Then ``hessian_trace`` and ``hessian_diagonal`` (100 products) on the MLP, with the default ``memory_budget``
and with 256 MiB: the plan they chose and their peak (``probes.budget``). ``--part others``:
``hessian_density`` (4 probes × 30 Lanczos steps) and ``loss_landscape`` (random plane, 21 × 21) on the MLP,
with the default ``memory_budget`` and with 512 / 256 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Eigensolver memory (bench/bench_memory.py)"
BUDGET_SECTION = "## Trace and diagonal within memory_budget (bench/bench_memory.py --part budget)"
OTHERS_SECTION = "## SLQ and landscapes within memory_budget (bench/bench_memory.py --part others)"


def _case(name: str):
    import torch

    from dynascope.models import build

    torch.manual_seed(0)
    if name == "mlp":
        model = build("mlp", in_dim=256, width=2000, depth=2, out_dim=10, seed=0)
        x, y = torch.randn(256, 256), torch.randint(0, 10, (256,))
    else:
        model = build("resnet", in_channels=3, image_size=32, widths=[64, 128, 256, 512], out_dim=10,
                      blocks_per_stage=2)  # fmt: skip
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, (x, y)


def child(case: str, what: str, k: int) -> None:
    """Measure one thing in this (fresh) process; print a JSON line."""
    import torch

    import dynascope.probes as probes
    from dynascope.probes.memory import peak_memory, rss_bytes

    torch.set_num_threads(2)
    model, data = _case(case)
    P = sum(p.numel() for p in model.parameters())
    base = rss_bytes()
    out: dict = {"case": case, "what": what, "k": k, "P": P, "base_rss": base}
    if what == "hvp":
        op = probes.OperatorSpec().build(model, data)
        v = torch.randn(op.size)
        with peak_memory() as peak:
            op.matvec(v)
        out["peak"] = peak.bytes
    elif what in ("trace", "diagonal"):  # k: memory_budget in MiB (0: the default, half the available memory)
        kw = {"memory_budget": k * 2**20} if k else {}
        fn = probes.hessian_trace if what == "trace" else probes.hessian_diagonal
        with peak_memory() as peak:
            res = fn(model, data, n_matvecs=100, check_determinism=False, **kw)
        m = res.meta
        signs = "held (int8)" if m["probes_held"] else "per block"
        out.update(peak=peak.bytes, n_matvecs=res.n_matvecs, budget=m["memory_budget"],
                   vector_bytes=m["vector_bytes"],
                   plan=f"{m['block_used']}, {m.get('sketch_vectors', 0)}, {signs}")  # fmt: skip
    elif what == "density":  # k: memory_budget in MiB (0: the default)
        kw = {"memory_budget": k * 2**20} if k else {}
        with peak_memory() as peak:
            res = probes.hessian_density(model, data, n_probes=4, lanczos_steps=30, check_determinism=False,
                                         **kw)  # fmt: skip
        m = res.meta
        held = "held" if m["probes_held"] else "per block"
        plan = (f"block {m['block_used']}, window {m['reorth_window']}, probes {held}; "
                f"max abs(q1ᵀqj) {m['orthogonality_loss']:.1e}")
        out.update(peak=peak.bytes, n_matvecs=res.n_matvecs, budget=m["memory_budget"],
                   vector_bytes=m["vector_bytes"], plan=plan)  # fmt: skip
    elif what == "landscape":
        kw = {"memory_budget": k * 2**20} if k else {}
        with peak_memory() as peak:
            res = probes.loss_landscape(model, data, resolution=21, **kw)
        m = res.meta
        out.update(peak=peak.bytes, n_matvecs=0, budget=m["memory_budget"], vector_bytes=m["vector_bytes"],
                   plan=f"{m['points_per_batch_used']} grid points per batch")  # fmt: skip
    else:
        with peak_memory() as peak:
            res = probes.hessian_eigenvalues(model, data, k=k)
        out.update(peak=peak.bytes, basis=res.meta["peak_basis_vectors"], n_matvecs=res.n_matvecs,
                   max_basis=res.meta["max_basis"], restarts=res.meta["n_restarts"],
                   converged=bool(res.converged.all()), values=res.values.tolist())  # fmt: skip
    print(json.dumps(out))


def measure(case: str, what: str, k: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", case, what, str(k)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # large blocks mmap-ed: freed memory leaves RSS
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument(
        "--part", choices=("all", "eig", "budget", "others"), default="all",
        help="eigensolver rows, trace/diagonal budget rows, SLQ/landscape budget rows"
    )
    ap.add_argument("--child", nargs=3, metavar=("CASE", "WHAT", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    mib = 1024**2
    rows = [
        "| case | P | k | one HVP: peak above base | hessian_eigenvalues: peak above base "
        "| increase over one HVP | bound (max_basis+4)·P·4 | max_basis | basis vectors held | products "
        "(restarts) | total peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eig_cases = (("mlp", (1, 3, 10)), ("resnet18", (3,))) if args.part in ("all", "eig") else ()
    for case, ks in eig_cases:
        hvp = measure(case, "hvp")
        for k in ks:
            eig = measure(case, "eig", k)
            P = eig["P"]
            bound = (eig["max_basis"] + 4) * P * 4
            inc = eig["peak"] - hvp["peak"]
            total = eig["base_rss"] + eig["peak"]
            rows.append(
                f"| {case} | {P / 1e6:.2f}M | {k} | {hvp['peak'] / mib:.0f} MiB | "
                f"{eig['peak'] / mib:.0f} MiB | **{inc / mib:.0f} MiB** | {bound / mib:.0f} MiB | "
                f"{eig['max_basis']} | {eig['basis']} | {eig['n_matvecs']} ({eig['restarts']}) | "
                f"{total / mib:.0f} MiB = {total / 1e9:.2f} GB |"
            )
            print(rows[-1], flush=True)
    intro = (
        "(torch CPU, 2 threads; peak RSS from `VmHWM` after resetting it through `/proc/self/clear_refs`, "
        "each row in a fresh process with `MALLOC_MMAP_THRESHOLD_=131072` so that freed tensors leave the "
        "RSS)."
    )
    if args.part in ("all", "eig"):
        publish(
            SECTION,
            f"Command: `.venv/bin/python bench/bench_memory.py --part eig` {intro} "
            "Before the block eigensolver, `hessian_eigenvalues(k=3)` raised the peak by 2.1 GB over one "
            "HVP on the MLP (a preallocated basis of max(100, 20k) vectors) and a ResNet-18 needed 5.6 GB.",
            rows,
            args.write,
        )
    if args.part == "eig":
        return
    if args.part in ("all", "others"):
        others(intro, args.write)
    if args.part == "others":
        return
    rows = [
        "| probe (100 products) | memory_budget | plan: block, sketch, signs | vectors by the formula "
        "| peak above base | increase over one HVP |",
        "|---|---|---|---|---|---|",
    ]
    hvp = measure("mlp", "hvp")
    rows += budget_rows((("trace", "trace", 256), ("diagonal", "diagonal", 256)), hvp)
    publish(
        BUDGET_SECTION,
        f"Command: `.venv/bin/python bench/bench_memory.py --part budget` {intro} The MLP above (4.53M "
        "parameters, 256 samples): `hessian_trace` (default method) and `hessian_diagonal` (Hutchinson), 100 "
        "products, with the default `memory_budget` (half the available memory when the row ran) and "
        "256 MiB; one HVP's peak above base is "
        f"{hvp['peak'] / mib:.0f} MiB. Before the budget both held every probe (`[P, 100]` in float64 and "
        "float32: 5.4 GB for the trace, plus float64 copies of each block).",
        rows,
        args.write,
    )


def budget_rows(cases: tuple[tuple[str, str, int], ...], hvp: dict) -> list[str]:
    """One table row per ``(what, label, MiB)`` case and budget (the default, then ``MiB``) on the MLP."""
    mib = 1024**2
    rows = []
    for what, label, tight in cases:
        for budget_mib in (0, tight):
            r = measure("mlp", what, budget_mib)
            default = "" if budget_mib else " (default)"
            rows.append(
                f"| {label} | {r['budget'] / mib:.0f} MiB{default} | {r['plan']} | "
                f"{r['vector_bytes'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
                f"**{(r['peak'] - hvp['peak']) / mib:.0f} MiB** |"
            )
            print(rows[-1], flush=True)
    return rows


def others(intro: str, write: bool) -> None:
    """``hessian_density`` and ``loss_landscape`` on the MLP with the default budget and 512 / 256 MiB."""
    mib = 1024**2
    rows = [
        "| probe | memory_budget | plan | vectors by the formula | peak above base | increase over one HVP |",
        "|---|---|---|---|---|---|",
    ]
    hvp = measure("mlp", "hvp")
    cases = (("density", "hessian_density (4 × 30)", 512), ("landscape", "loss_landscape (21 × 21)", 256))
    rows += budget_rows(cases, hvp)
    publish(
        OTHERS_SECTION,
        f"Command: `.venv/bin/python bench/bench_memory.py --part others` {intro} The MLP above (4.53M "
        "parameters, 18 MB a float32 vector, 256 samples): `hessian_density` with 4 probes × 30 Lanczos "
        "steps (full reorthogonalisation holds 120 vectors, 2.2 GB) and `loss_landscape` on a random plane "
        "(21 × 21 points, 16 per batch), with the default `memory_budget` and 512 / 256 MiB (one probe with "
        "its two latest Lanczos vectors needs 15 vectors, 272 MB); one HVP's peak above "
        f"base is {hvp['peak'] / mib:.0f} MiB.",
        rows,
        write,
    )


if __name__ == "__main__":
    main()
