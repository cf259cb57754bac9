"""Benchmark: per-example gradients by ``vmap(grad)`` (dynascope) vs a per-sample autograd loop.

Both run in the same process on the same model and data; the loop is the naive anchor (one
forward/backward per sample, gradients flattened into an ``[N, P]`` matrix). Each side is warmed up
once, then the two are timed alternately ``--repeats`` times (so both see the same machine load;
best, median and the median of the per-pair ratios are reported); the results are checked to agree.

    python bench/bench_per_example.py [--model mlp|cnn] [--n 512] [--chunk 256] [--device cpu]
                                      [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from dynascope.datasets import load
from dynascope.models import build
from dynascope.probes.per_example import per_example_gradients


def loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The anchor: one autograd pass per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _interleaved(fa, fb, repeats: int, device: torch.device):
    """Warm both up once, then time them alternately (a, b, a, b, ...) so both see the same machine load."""
    fa(), fb()
    _sync(device)
    ta, tb = [], []
    for _ in range(repeats):
        t, out_a = _timed(fa, device)
        ta.append(t)
        t, out_b = _timed(fb, device)
        tb.append(t)
    return ta, tb, out_a, out_b


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--n", type=int, default=512, help="number of examples")
    ap.add_argument("--chunk", type=int, default=256, help="vmap chunk size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "mlp":
        x, y = load("digits", n_train=args.n, seed=0).train
        model = build("mlp", in_dim=64, width=128, depth=2, out_dim=10, seed=0)
    else:
        x, y = load("digits", n_train=args.n, seed=0, flatten=False).train
        model = build("cnn", in_channels=1, image_size=8, channels=[16, 32], out_dim=10, seed=0)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    n_params = sum(p.numel() for p in model.parameters())

    t_vmap, t_loop, G_vmap, G_loop = _interleaved(
        lambda: per_example_gradients(model, (x, y), chunk_size=args.chunk),
        lambda: loop_gradients(model, x, y),
        args.repeats,
        device,
    )
    pair_ratios = [b / a for a, b in zip(t_vmap, t_loop)]
    max_err = float((G_vmap - G_loop).abs().max())
    scale = float(G_loop.abs().max())
    result = {
        "benchmark": "per_example_gradients",
        "model": args.model,
        "n_params": n_params,
        "n_examples": args.n,
        "chunk_size": args.chunk,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "vmap_s_best": min(t_vmap),
        "vmap_s_median": statistics.median(t_vmap),
        "loop_s_best": min(t_loop),
        "loop_s_median": statistics.median(t_loop),
        "speedup_best": min(t_loop) / min(t_vmap),
        "speedup_median": statistics.median(t_loop) / statistics.median(t_vmap),
        "speedup_pairs_median": statistics.median(pair_ratios),
        "max_abs_diff": max_err,
        "max_abs_grad": scale,
        "agree": max_err <= 1e-4 * max(scale, 1.0),
    }
    print(
        f"per-example gradients, {args.model} ({n_params} params), N={args.n}, {result['device']}, "
        f"{result['threads']} threads\n"
        f"  vmap(grad), chunk {args.chunk}: {result['vmap_s_median'] * 1e3:9.1f} ms"
        f" (median of {args.repeats})\n"
        f"  per-sample autograd loop : {result['loop_s_median'] * 1e3:9.1f} ms\n"
        f"  speedup: {result['speedup_median']:.1f}x of medians, "
        f"{result['speedup_pairs_median']:.1f}x median of interleaved pairs, "
        f"{result['speedup_best']:.1f}x best-of; "
        f"max |diff| {max_err:.2e} (agree: {result['agree']})"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
