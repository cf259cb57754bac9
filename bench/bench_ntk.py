"""Benchmark: dynascope's empirical NTK vs a naive per-sample autograd loop, same process, same model.

The anchor: for each sample one forward, then one ``autograd.grad`` per output (``retain_graph``) to
get the rows of ``J [N·O, P]``; then ``J Jᵀ`` — contracted over outputs for the traced kernel
(``J.reshape(N, O·P) @ J.reshape(N, O·P)ᵀ``), over parameters only for the full kernel.
Each side is warmed up on 8 samples, then timed ``--repeats`` times (median and min wall time, and the
median process CPU time, which is robust to other jobs sharing the cores, are reported).

Peak memory: CPU — freed heap pages are returned (``malloc_trim``), the process's peak resident set
(``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs`` before each timed call, and
``VmHWM − VmRSS(before)`` is reported (Linux/glibc only);
CUDA — ``torch.cuda.max_memory_allocated`` delta after ``reset_peak_memory_stats``.

Two ≥100k-parameter CNNs on 8×8 digits: ``lenet`` (convs [16, 32], flatten, hidden Linear 64: most
parameters in Linear layers, which dynascope contracts in structured form) and ``allconv`` (convs
[48, 96, 96], global average pool: almost all parameters in 3×3 convolutions, plain Jacobians).

    python bench/bench_ntk.py [--arch lenet allconv] [--n 256] [--full-n 64] [--repeats 3] [--device cpu]
                              [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynascope.datasets import load
from dynascope.models import build
from dynascope.probes import empirical_ntk


def naive_ntk(model: nn.Module, x: torch.Tensor, traced: bool) -> torch.Tensor:
    """The anchor: per-sample forward, one backward per output, then J Jᵀ."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], params, retain_graph=o + 1 < out.shape[0])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)  # [N·O, P], sample-major
    if traced:
        Jn = J.reshape(x.shape[0], -1)
        return Jn @ Jn.T
    return J @ J.T


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak extra memory (bytes) of a block: CUDA allocator peak, or Linux VmHWM after a reset."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = float("nan")

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so reuse is not hidden
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.base = self._status("VmRSS")
            except (OSError, AttributeError):
                self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.peak = self._status("VmHWM") - self.base


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict:
    times, cpu, peaks, out = [], [], [], None
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peaks.append(mem.peak)
        del mem
    return {
        "times": times,
        "cpu_times": cpu,
        "median_cpu_s": statistics.median(cpu),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_mb": max(peaks) / 2**20,
        "out": out,
    }


def compare(model: nn.Module, x: torch.Tensor, traced: bool, repeats: int, device: torch.device) -> dict:
    mode = "trace" if traced else None
    empirical_ntk(model, x[:8], reduce_outputs=mode)  # warm-up both sides
    naive_ntk(model, x[:8], traced)
    fast = measure(lambda: empirical_ntk(model, x, reduce_outputs=mode, return_plan=True), repeats, device)
    slow = measure(lambda: naive_ntk(model, x, traced), repeats, device)
    (K1, plan), K2 = fast.pop("out"), slow.pop("out")
    K1, K2 = K1.double(), K2.double()
    return {
        "kernel": "traced [N, N]" if traced else "full [N*O, N*O]",
        "n": x.shape[0],
        "dynascope": fast,
        "naive_loop": slow,
        "speedup_median": slow["median_s"] / fast["median_s"],
        "speedup_cpu_time": slow["median_cpu_s"] / fast["median_cpu_s"],
        "max_abs_diff_rel": float((K1 - K2).abs().max() / K2.abs().max()),
        "frobenius_rel": float((K1 - K2).norm() / K2.norm()),
        "strategy": plan.strategy,
        "structured": list(plan.structured),
    }


ARCHS = {
    "lenet": dict(channels=[16, 32], pool="flatten", hidden=[64]),
    "allconv": dict(channels=[48, 96, 96], pool="avg"),
}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="samples for the traced kernel")
    ap.add_argument("--full-n", type=int, default=64, help="samples for the full kernel (0: skip)")
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["lenet", "allconv"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = load("digits", n_train=max(args.n, args.full_n), flatten=False, seed=0)
    x = data.train[0].float().to(device)
    report: dict = {
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "memory_method": "CUDA max_memory_allocated delta"
        if device.type == "cuda"
        else "VmHWM - VmRSS after /proc/self/clear_refs reset",
        "runs": [],
    }
    for arch in args.arch:
        cfg = ARCHS[arch]
        model = build("cnn", in_channels=1, image_size=8, out_dim=10, **cfg).to(device).eval()
        n_params = sum(p.numel() for p in model.parameters())
        runs = [compare(model, x[: args.n], True, args.repeats, device)]
        if args.full_n:
            runs.append(compare(model, x[: args.full_n], False, args.repeats, device))
        for r in runs:
            r.update(arch=arch, config=cfg, n_params=n_params)
        report["runs"] += runs
    print(f"device={device}, threads={args.threads}, torch {torch.__version__}")
    print(
        "| model | kernel | N | dynascope median s (min) | naive median s (min) | speedup "
        "| CPU-time speedup | peak MB dyn / naive | rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        f, s = r["dynascope"], r["naive_loop"]
        print(
            f"| {r['arch']} (P={r['n_params']:,}) | {r['kernel']} | {r['n']} | {f['median_s']:.2f} "
            f"({f['min_s']:.2f}) | {s['median_s']:.2f} "
            f"({s['min_s']:.2f}) | {r['speedup_median']:.2f}x | {r['speedup_cpu_time']:.2f}x | "
            f"{f['peak_mb']:.0f} / {s['peak_mb']:.0f} | "
            f"{r['max_abs_diff_rel']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
