"""The trace default ``method="auto"`` against Hutchinson and Hutch++: multi-seed rms error.

Run:  .venv/bin/python bench/bench_trace_auto.py [--seeds 20] [--write]

Spectra (``--cases``): two Hessians of the MLP of bench/bench_hessian.py (10.9k parameters, 2048
samples, cross-entropy) and a synthetic one:
* untrained: bulk-dominated (its Hessian's Frobenius norm is spread over a wide bulk);
* trained (60 Adam steps): outliers carry about half of ``‖H‖_F²`` (the two estimators are about even);
* synthetic: 10 outliers over a small bulk, n = 4000 (deflation wins).
References: exact traces ``Σ_i e_iᵀ H e_i`` (P unit-vector products; cached). For each seed and
budget (100, 200 products), each method runs with that seed; reported: rms of the relative error over seeds
(realized, and expected: the rms of each run's own standard error), and how often "auto" chose Hutch++.
The target: auto's rms ≤ min(Hutchinson, Hutch++) + 10 % (relative).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import CACHE, mlp_case  # noqa: E402
from benchmarks_md import publish  # noqa: E402

from dynascope.probes.operators import DenseOperator, LinearOperator, OperatorSpec  # noqa: E402
from dynascope.probes.trace import auto_trace, hutch_plus_plus, hutchinson  # noqa: E402

SECTION = "## Trace default: auto vs Hutchinson and Hutch++ (bench/bench_trace_auto.py)"


def untrained_case() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    _, data = mlp_case()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 48), nn.Tanh(), nn.Linear(48, 10))
    return model, data


def exact_trace(key: str, model: nn.Module, data) -> float:
    """``tr(H)`` from products with unit-vector blocks (no eigendecomposition), cached."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    tag = f"{key}-{theta.numel()}-{float(theta.sum()):.12e}-{float(theta.norm()):.12e}"
    path = CACHE / f"{key}-trace.pt"
    if path.exists() and (saved := torch.load(path))["key"] == tag:
        return float(saved["trace"])
    op = OperatorSpec().build(model, data)  # float32 products summed in float64: ~1e-6 relative
    total = 0.0
    for lo in range(0, op.size, 256):
        hi = min(lo + 256, op.size)
        E = torch.zeros(op.size, hi - lo)
        E[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
        total += float(op.matmat(E)[torch.arange(lo, hi), torch.arange(hi - lo)].double().sum())
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"key": tag, "trace": total}, path)
    return total


def outlier_case(n: int = 4000) -> tuple[LinearOperator, float]:
    """A synthetic outlier-dominated spectrum: 10 outliers (80 … 5) over a bulk of ``n − 10`` values
    ~ 0.05·N(0, 1), in a random orthonormal basis (float32 products, exact trace = Σλ)."""
    g = torch.Generator().manual_seed(0)
    lam = torch.cat(
        [torch.tensor([80.0, 60, 40, 30, 20, 15, 10, 8, 6, 5]), 0.05 * torch.randn(n - 10, generator=g)]
    ).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return DenseOperator((Q @ torch.diag(lam) @ Q.T).float()), float(lam.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--cases", nargs="+", default=["untrained", "trained", "synthetic"],
                    choices=["untrained", "trained", "synthetic"])  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| spectrum | products | Hutchinson rms (expected) | Hutch++ rms (expected) | auto rms (expected) "
        "| auto / best, realized | auto / best, expected | auto chose Hutch++ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = {
        "untrained": "bulk-dominated (untrained MLP)",
        "trained": "trained MLP (60 Adam steps)",
        "synthetic": "outlier-dominated (synthetic, n = 4000, 10 outliers)",
    }
    for name in args.cases:
        label = cases[name]
        if name == "synthetic":
            op, exact = outlier_case()
        else:
            model, data = untrained_case() if name == "untrained" else mlp_case()
            exact = exact_trace("mlp-untrained" if name == "untrained" else "mlp", model, data)
            op = OperatorSpec().build(model, data)
        for m in (100, 200):
            errs: dict[str, list[float]] = {"hutchinson": [], "hutch++": [], "auto": []}
            ses: dict[str, list[float]] = {"hutchinson": [], "hutch++": [], "auto": []}
            picked = 0
            for seed in range(args.seeds):
                for name, fn in (("hutchinson", hutchinson), ("hutch++", hutch_plus_plus)):
                    est, se = fn(op, m, seed=seed)[:2]
                    errs[name].append(est / exact - 1)
                    ses[name].append(se / abs(exact))
                est, se, _, _, choice = auto_trace(op, m, seed=seed)
                errs["auto"].append(est / exact - 1)
                ses["auto"].append(se / abs(exact))
                picked += choice.method == "hutch++"
            rms = {k: math.sqrt(sum(e * e for e in v) / len(v)) for k, v in errs.items()}
            exp = {k: math.sqrt(sum(e * e for e in v) / len(v)) for k, v in ses.items()}
            best, best_exp = min(rms["hutchinson"], rms["hutch++"]), min(exp["hutchinson"], exp["hutch++"])
            cells = " | ".join(f"{100 * rms[k]:.2f} % ({100 * exp[k]:.2f} %)" for k in errs)
            rows.append(
                f"| {label} | {m} | {cells} | {rms['auto'] / best:.2f} | **{exp['auto'] / best_exp:.2f}** | "
                f"{picked}/{args.seeds} |"
            )
            print(rows[-1], flush=True)
    publish(
        SECTION,
        f"Command: `.venv/bin/python bench/bench_trace_auto.py --seeds {args.seeds} --cases "
        f"{' '.join(args.cases)}` (float32 products, "
        'exact traces from unit-vector products; relative errors over seeds). "rms" is the realized '
        "root-mean-square error over the seeds; from n seeds it is itself uncertain by about "
        f"1/√(2n) = {100 / math.sqrt(2 * args.seeds):.0f} % (relative), so two estimators with equal "
        'expected error differ by that much by chance. "expected" is the root-mean-square of each '
        "run's own standard error (Hutchinson: sample std/√m; Hutch++: the residual samples' std/√s), "
        "a far less noisy estimate of the same quantity; the target is read on it. Rule "
        "(`probes/trace.py`, `auto_trace`): the first m/3 products are a Rademacher sketch A S; Hutch++ "
        "continues when (‖A‖_F² − c)/(m − 2r) < ‖A‖_F²/m, c the energy half the sketch captures, else "
        "Hutchinson reuses the sketch's samples — either way no product is wasted.",
        rows,
        args.write,
    )


if __name__ == "__main__":
    main()
