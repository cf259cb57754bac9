"""Scale on one machine: GPT-2 architectures (``transformers.GPT2Config``, random weights, no download).

Run:  .venv/bin/python bench/bench_scale.py [--sizes 14M,50M,124M] [--tasks grad,hvp,trace,top5]
      [--trace-matvecs 100] [--device cpu|cuda] [--mem-limit-gb 12] [--write]

Sizes (tied embeddings, n_positions 128, 4 sequences × 128 tokens, loss: shifted token cross-entropy):
``14M`` 6 layers, width 384, vocab 8,192; ``50M`` 8 layers, width 640, vocab 16,384; ``124M`` GPT-2 small
(12 layers, width 768, vocab 50,257). Each size runs in a fresh process under ``RLIMIT_AS``
(``--mem-limit-gb``) so a size that does not fit fails instead of swapping; each task's peak is measured by
:func:`dynascope.probes.memory.peak_memory` (CPU: peak RSS above the level before the task, after resetting
``VmHWM``; CUDA: ``max_memory_allocated``), and the total peak RSS of the process is reported too.

Tasks: ``grad`` one forward + backward of the loss; ``hvp`` one Hessian-vector product of the operator the
probes build, and its ratio to ``grad`` in CPU seconds (both: the least of 3 runs after a warm-up), and the
peak of one ``matmat`` of 8 vectors (the product's own memory grows with the block, outside the budget);
``trace`` ``hessian_trace`` with ``--trace-matvecs`` products (default method and ``memory_budget``: half
the available memory) — its plan (block, sketch, held signs) from ``meta``; ``top5``
``hessian_eigenvalues(k=5)``.
Wall times on a shared machine are skewed by load: the 1-minute load average is printed beside each row, and
process CPU seconds (``time.process_time``, all threads) beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import publish  # noqa: E402

SECTION = "## Scale: GPT-2 sizes on one machine (bench/bench_scale.py)"
SIZES = {
    "14M": {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 8192},
    "50M": {"n_layer": 8, "n_embd": 640, "n_head": 10, "vocab_size": 16384},
    "124M": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}
LOSS = {"name": "token_cross_entropy", "shift": True}
BATCH, TOKENS = 4, 128


def child(size: str, tasks: list[str], args: argparse.Namespace) -> None:
    """Run the tasks for one size in this (fresh) process; print one JSON line per task."""
    device, trace_matvecs, mem_limit = args.device, args.trace_matvecs, int(args.mem_limit_gb * 2**30)
    if mem_limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    import torch
    import transformers

    import dynascope.probes as probes
    from dynascope.probes.memory import peak_memory, rss_bytes

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=TOKENS, bos_token_id=0, eos_token_id=0, **SIZES[size])
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (BATCH, TOKENS), generator=g).to(device)
    data = (x, x.clone())

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def emit(task: str, **row) -> None:
        print(json.dumps({"size": size, "P": P, "task": task, "load": os.getloadavg()[0],
                          "rss_now": rss_bytes(), **row}), flush=True)  # fmt: skip

    def timed(fn, repeats: int = args.repeats) -> tuple[float, float, int | None]:
        """Least wall and CPU seconds over ``repeats`` runs after a warm-up (least: the run that other jobs
        on the machine disturbed least), and the peak memory of the last."""
        fn()
        walls, cpus = [], []
        for _ in range(repeats):
            with peak_memory(device) as peak:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        return min(walls), min(cpus), peak.bytes

    cpu: dict[str, float] = {}
    for task in tasks:
        if task == "grad":
            loss_fn = torch.nn.CrossEntropyLoss()

            def step(loss_fn=loss_fn) -> None:
                model.zero_grad(set_to_none=True)
                logits = model(x).logits
                loss_fn(logits[:, :-1].reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1)).backward()

            wall, cpu["grad"], peak = timed(step)
            model.zero_grad(set_to_none=True)
            emit("grad", seconds=wall, cpu_seconds=cpu["grad"], peak=peak)
        elif task == "hvp":
            op = probes.OperatorSpec(loss=LOSS).build(model, data)
            v = torch.randn(op.size, generator=g).to(device=op.device, dtype=op.dtype)
            wall, cpu["hvp"], peak = timed(lambda op=op, v=v: op.matvec(v))
            ratio = cpu["hvp"] / cpu["grad"] if "grad" in cpu else None
            block_peak = None
            if args.matmat:
                V = torch.randn(op.size, args.matmat, generator=g).to(device=op.device, dtype=op.dtype)
                with peak_memory(device) as bp:  # the product's own memory grows with the block
                    op.matmat(V)
                block_peak = bp.bytes
                del V
            emit("hvp", seconds=wall, cpu_seconds=cpu["hvp"], peak=peak, ratio=ratio, matmat=args.matmat,
                 backend=op.meta().get("backend"), matmat_peak=block_peak)  # fmt: skip
            del op, v
        elif task == "trace":
            t0, c0 = time.perf_counter(), time.process_time()
            budget = {"memory_budget": int(args.memory_budget_gb * 2**30)} if args.memory_budget_gb else {}
            r = probes.hessian_trace(model, data, loss=LOSS, n_matvecs=trace_matvecs, **budget)
            m = r.meta
            emit("trace", seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                 peak=m["measured_peak_bytes"], n_matvecs=r.n_matvecs,
                 estimate=r.estimate, stderr=r.stderr, method=r.method, block=m["block_used"],
                 sketch=m["sketch_vectors"], held=m["probes_held"], budget=m["memory_budget"],
                 vector_bytes=m["vector_bytes"], binds=m["budget_binds"])  # fmt: skip
        elif task == "top5":
            t0, c0 = time.perf_counter(), time.process_time()
            r = probes.hessian_eigenvalues(model, data, loss=LOSS, k=5)
            m = r.meta
            emit("top5", seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                 peak=m.get("measured_peak_bytes"),
                 n_matvecs=r.n_matvecs, values=r.values.tolist(), converged=bool(r.converged.all()),
                 max_basis=m.get("max_basis"))  # fmt: skip
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    emit("process", peak_rss=hwm)


def run_size(size: str, args: argparse.Namespace) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", size, "--tasks", args.tasks, "--trace-matvecs",
           str(args.trace_matvecs), "--device", args.device, "--mem-limit-gb", str(args.mem_limit_gb),
           "--repeats", str(args.repeats), "--matmat", str(args.matmat),
           "--memory-budget-gb", str(args.memory_budget_gb)]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        rows.append({"size": size, "task": "failed", "error": proc.stderr.strip().splitlines()[-1][:200]})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _fmt(rows: list[dict]) -> list[str]:
    gb = 1e9
    out = [
        "| size | P | task | wall s | CPU s | load | peak above start | products | details |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["task"] == "failed":
            out.append(f"| {r['size']} | | failed | | | | | | {r['error']} |")
            continue
        if r["task"] == "process":
            out.append(f"| {r['size']} | {r['P'] / 1e6:.1f}M | whole process | | | {r['load']:.1f} | "
                       f"peak RSS {r['peak_rss'] / gb:.2f} GB | | |")  # fmt: skip
            continue
        det = ""
        if r["task"] == "hvp":
            det = f"HVP / gradient (CPU s) = **{r['ratio']:.2f}×** ({r['backend']})" if r.get("ratio") else ""
            if r.get("matmat_peak"):
                det += f"; a block of {r['matmat']} products: peak {r['matmat_peak'] / gb:.2f} GB"
        elif r["task"] == "trace":
            signs = "held" if r["held"] else "per block"
            det = (f"{r['method']} {r['estimate']:.4g} ± {r['stderr']:.2g}; block {r['block']}, sketch "
                   f"{r['sketch']}, signs {signs}, budget {r['budget'] / gb:.1f} GB (vectors "
                   f"{r['vector_bytes'] / gb:.2f} GB{', binds' if r['binds'] else ''})")  # fmt: skip
        elif r["task"] == "top5":
            det = f"{', '.join(f'{v:.4g}' for v in r['values'])}; converged {r['converged']}"
        peak = f"{r['peak'] / gb:.2f} GB" if r.get("peak") is not None else "n/a"
        n = r.get("n_matvecs", 1 if r["task"] == "hvp" else "")
        out.append(f"| {r['size']} | {r['P'] / 1e6:.1f}M | {r['task']} | {r['seconds']:.1f} | "
                   f"{r['cpu_seconds']:.1f} | {r['load']:.1f} | {peak} | {n} | {det} |")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="14M,50M,124M")
    ap.add_argument("--tasks", default="grad,hvp,trace,top5")
    ap.add_argument("--trace-matvecs", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of grad and hvp after a warm-up")
    ap.add_argument("--matmat", type=int, default=8, help="vectors of the block product measured (0: none)")
    ap.add_argument("--memory-budget-gb", type=float, default=0.0, help="trace's memory_budget (0: default)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tasks.split(","), args)
        return
    rows = [row for size in args.sizes.split(",") for row in run_size(size, args)]
    publish(
        SECTION,
        f"Command: `.venv/bin/python bench/bench_scale.py --sizes {args.sizes} --tasks {args.tasks} "
        f"--trace-matvecs {args.trace_matvecs} --device {args.device} --mem-limit-gb {args.mem_limit_gb:g} "
        f"--repeats {args.repeats} --matmat {args.matmat} --memory-budget-gb {args.memory_budget_gb:g}` "
        "(torch threads: default; each size in a fresh process with `MALLOC_MMAP_THRESHOLD_=131072` under "
        "`RLIMIT_AS`). GPT-2 from `GPT2Config` (random weights), 4×128 tokens, shifted token cross-entropy. "
        "'peak above start': the task's peak over the memory in use before it; 'load': 1-minute load "
        "average when the task ended (2 cores shared with other jobs: times are skewed by it, peaks and "
        "product counts are not).",
        _fmt(rows),
        args.write,
    )


if __name__ == "__main__":
    main()
