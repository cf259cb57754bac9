"""Hessian trace over many seeds: PyHessian's ``trace()`` vs dynascope's estimators at the same product count.

Run:  .venv/bin/python bench/bench_trace.py [--seeds 10] [--cnn-seeds 10] [--big 100] [--quick]
      .venv/bin/python bench/bench_trace.py --study [--study-seeds 300]

For each seed ``i``: PyHessian ``trace()`` at its defaults (Rademacher Hutchinson, ``maxIter=100``,
``tol=1e-3``, after ``torch.manual_seed(i)``) stops after ``c_i`` Hessian-vector products; then
``hessian_trace(method=…, n_matvecs=max(c_i, 4), seed=i)`` for ``hutchinson``, ``hutch++`` and
``krylov++`` on the same model and data, in the same process. ``--big B`` adds ``hutch++`` and
``krylov++`` at ``B`` products (the budget at which 1 % becomes reachable).

Cases and references (cases from bench/bench_hessian.py):
  MLP 10.9k params / 2048 samples: exact trace of the dense float64 Hessian (cached).
  CNN 105k params / 1024 digits: float32 ``krylov++`` with 900 products (300 Lanczos steps + 600
  residual probes), cached; its own standard error ``se_ref`` is reported and added in quadrature
  for the coverage column.
Columns: relative error |est − ref| / |ref| (median and max over seeds); coverage: fraction of seeds
with |est − ref| ≤ 2·sqrt(se² + se_ref²) (PyHessian: se = std of its samples / √c); products
(median [min–max]); wall time (median, one thread; dynascope times include building the operator and
the +1 determinism-check product); ratio: median over seeds of (dynascope time / PyHessian time).

``--study``: the estimators' error distributions on the MLP's exact Hessian spectrum. For Gaussian
probes every estimator here is rotation invariant, so ``H = U diag(λ) Uᵀ`` may be replaced by
``diag(λ)`` (exact, and products cost O(P)): Hutchinson, Hutch++ (``m/3`` sketch), XTrace (Epperly,
Tropp & Webber 2024: ``m/2`` sphere-normalised test vectors, exchangeable leave-one-out average and its
own error estimate std/√(m/2)), Krylov++ (``m/3`` Lanczos steps), and the oracle bound: deflating the
exact top-k eigenvectors for k products, best k, relative s.d. ``sqrt(2 Σ_{j>k} λ_j² / (m − k)) / tr``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import CACHE, PyHessianRunner, cnn_case, dense_spectrum, mlp_case  # noqa: E402

import dynascope.probes as probes  # noqa: E402

SECTION = "## Hessian trace over seeds: dynascope estimators vs PyHessian (bench/bench_trace.py)"
METHODS = ("hutchinson", "hutch++", "krylov++")


def pyhessian_trace(runner: PyHessianRunner, model: nn.Module, data, seed: int) -> tuple[float, float, int]:
    """PyHessian ``trace()`` at its defaults: ``(estimate, std(samples)/√n, products)``."""
    torch.manual_seed(seed)
    runner.count = 0
    h = runner.ph.hessian(model, nn.CrossEntropyLoss(), data=data, cuda=False)
    samples = torch.tensor([float(s) for s in h.trace()], dtype=torch.float64)
    se = float(samples.std() / math.sqrt(samples.numel())) if samples.numel() > 1 else float("inf")
    return float(samples.mean()), se, runner.count


def cnn_reference(model: nn.Module, data) -> tuple[float, float]:
    """float32 Krylov++ with 900 products, cached by a parameter hash."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    key = f"cnn-trace-{theta.numel()}-{float(theta.sum()):.12e}-{float(theta.norm()):.12e}"
    path = CACHE / "cnn_trace_ref.pt"
    if path.exists():
        saved = torch.load(path)
        if saved["key"] == key:
            return saved["trace"], saved["stderr"]
    ref = probes.hessian_trace(model, data, n_matvecs=900, method="krylov++", seed=12345)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "trace": ref.estimate, "stderr": ref.stderr}, path)
    return ref.estimate, ref.stderr


def run_case(name: str, model, data, ref: float, ref_se: float, seeds: int, big: int, runner) -> list[str]:
    rows: dict[str, dict[str, list[float]]] = {}

    def add(label: str, est: float, se: float, n: int, t: float, t_ph: float) -> None:
        r = rows.setdefault(label, {"err": [], "cov": [], "n": [], "t": [], "ratio": []})
        r["err"].append(abs(est - ref) / abs(ref))
        r["cov"].append(float(abs(est - ref) <= 2 * math.sqrt(se**2 + ref_se**2)))
        r["n"].append(n)
        r["t"].append(t)
        r["ratio"].append(t / t_ph)

    for seed in range(seeds):
        t = time.perf_counter()
        est, se, count = pyhessian_trace(runner, model, data, seed)
        t_ph = time.perf_counter() - t
        add("PyHessian Hutchinson (defaults, tol 1e-3)", est, se, count, t_ph, t_ph)
        budget = max(count, 4)
        runs = [(m, budget, f"dynascope {m} (PyHessian's count)") for m in METHODS]
        runs += [(m, big, f"dynascope {m} ({big} products)") for m in ("hutch++", "krylov++") if big]
        for method, n, label in runs:
            t = time.perf_counter()
            res = probes.hessian_trace(model, data, n_matvecs=n, method=method, seed=seed)
            add(label, res.estimate, res.stderr, res.n_matvecs, time.perf_counter() - t, t_ph)
        print(f"  {name} seed {seed}: PyHessian {count} products", file=sys.stderr, flush=True)

    lines = []
    for label, r in rows.items():
        e = r["err"]
        n = r["n"]
        ratio = "1" if label.startswith("PyHessian") else f"{statistics.median(r['ratio']):.2f}"
        lines.append(
            f"| {name} | {label} | {100 * statistics.median(e):.2f} % | {100 * max(e):.2f} % | "
            f"{sum(r['cov']) / len(r['cov']):.2f} | {statistics.median(n):g} [{min(n)}–{max(n)}] | "
            f"{statistics.median(r['t']):.2f} | {ratio} |"
        )
    return lines


# ----------------------------------------------------------------------------- study (Gaussian probes)
def _gauss(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, k, generator=gen, dtype=torch.float64)


def _deflated(lam: torch.Tensor, Q: torch.Tensor, s: int, gen: torch.Generator) -> tuple[float, float]:
    """tr(QᵀΛQ) + Hutchinson on (I−QQᵀ)Λ(I−QQᵀ) with s Gaussian probes; stderr sqrt(2 mean‖Rg‖²/s)."""
    G = _gauss(lam.numel(), s, gen)
    G = G - Q @ (Q.T @ G)
    RG = lam[:, None] * G
    RG = RG - Q @ (Q.T @ RG)
    low = float((Q * (lam[:, None] * Q)).sum())
    return low + float((G * RG).sum(0).mean()), math.sqrt(2 * float(RG.pow(2).sum(0).mean()) / s)


def study_estimators(lam: torch.Tensor) -> dict:
    """``name -> f(m, gen) -> (estimate, stderr)`` for ``A = diag(lam)`` and Gaussian probes."""
    n = lam.numel()

    def hutchinson(m: int, gen: torch.Generator) -> tuple[float, float]:
        Z = _gauss(n, m, gen)
        smp = (Z * (lam[:, None] * Z)).sum(0)
        return float(smp.mean()), float(smp.std()) / math.sqrt(m)

    def hutchpp(m: int, gen: torch.Generator) -> tuple[float, float]:
        Q, _ = torch.linalg.qr(lam[:, None] * _gauss(n, m // 3, gen))
        return _deflated(lam, Q, m - 2 * (m // 3), gen)

    def krylov(m: int, gen: torch.Generator) -> tuple[float, float]:
        k = m // 3
        Q = torch.zeros(n, k, dtype=torch.float64)
        q = _gauss(n, 1, gen)[:, 0]
        for j in range(k):
            Q[:, j] = q / q.norm()
            q = lam * Q[:, j]
            for _ in range(2):
                q = q - Q[:, : j + 1] @ (Q[:, : j + 1].T @ q)
        return _deflated(lam, Q, m - k, gen)

    def xtrace(m: int, gen: torch.Generator) -> tuple[float, float]:
        # t_i = tr(Q_iᵀAQ_i) + ω_iᵀP_iAP_iω_i · (n−s+1)/‖P_iω_i‖², Q_i = orth(A Ω_{−i}), P_i = I − Q_iQ_iᵀ.
        # With AΩ = QR: Q_i Q_iᵀ = Q(I − s_i s_iᵀ)Qᵀ for s_i = R⁻ᵀe_i/‖R⁻ᵀe_i‖, so every t_i follows
        # from Q, R, W = QᵀΩ and QᵀAQ.
        s = m // 2
        Om = _gauss(n, s, gen)
        Om = Om * (math.sqrt(n) / Om.norm(dim=0))
        Y = lam[:, None] * Om
        Q, R = torch.linalg.qr(Y)
        Hq = Q.T @ (lam[:, None] * Q)
        W = Q.T @ Om
        S = torch.linalg.inv(R).T
        S = S / S.norm(dim=0)
        c = (S * W).sum(0)
        sHs = (S * (Hq @ S)).sum(0)
        resid = (Om * Y).sum(0) - 2 * (R * W).sum(0) + (W * (Hq @ W)).sum(0)
        resid = resid + 2 * c * (S * (R - Hq @ W)).sum(0) + c * c * sHs
        t = torch.trace(Hq) - sHs + resid * (n - s + 1) / (n - W.pow(2).sum(0) + c * c)
        return float(t.mean()), float(t.std()) / math.sqrt(s)

    return {"Hutchinson": hutchinson, "Hutch++": hutchpp, "XTrace": xtrace, "Krylov++": krylov}


def run_study(seeds: int, budgets: tuple[int, ...] = (10, 26, 50, 100)) -> list[str]:
    model, data = mlp_case()
    lam, tr = dense_spectrum("mlp", model, data)
    lam = lam.double()
    by_mag = lam[lam.abs().argsort(descending=True)]
    f2 = float(lam.pow(2).sum())
    tail_f2 = f2 - torch.cat([torch.zeros(1, dtype=torch.float64), by_mag.pow(2).cumsum(0)])
    out = [
        "Spectrum of the MLP Hessian (P = 10,906): share of the top-k (by |λ|) in the trace and in ‖H‖_F²:",
        "",
        "| k | 1 | 5 | 10 | 20 | 50 | 100 |",
        "|---|---|---|---|---|---|---|",
        "| tr share | "
        + " | ".join(f"{float(by_mag[:k].sum()) / tr:.2f}" for k in (1, 5, 10, 20, 50, 100))
        + " |",
        "| ‖H‖_F² share | "
        + " | ".join(f"{1 - float(tail_f2[k]) / f2:.2f}" for k in (1, 5, 10, 20, 50, 100))
        + " |",
        "",
        f"Estimators on this spectrum, Gaussian probes, {seeds} seeds (relative errors; coverage = fraction "
        "of seeds with |error| ≤ 2 reported s.e.):",
        "",
        "| products | estimator | median | 90th pct | max | ±2 s.e. coverage |",
        "|---|---|---|---|---|---|",
    ]
    ests = study_estimators(lam)
    for m in budgets:
        for name, f in ests.items():
            errs, cover = [], 0
            for seed in range(seeds):
                est, se = f(m, torch.Generator().manual_seed(1000 + seed))
                errs.append(abs(est - tr) / abs(tr))
                cover += abs(est - tr) <= 2 * se
            errs.sort()
            out.append(
                f"| {m} | {name} | {100 * statistics.median(errs):.2f} % | "
                f"{100 * errs[int(0.9 * seeds)]:.2f} % | {100 * errs[-1]:.2f} % | {cover / seeds:.2f} |"
            )
        oracle = min(math.sqrt(2 * float(tail_f2[k]) / (m - k)) / tr for k in range(m - 1))
        out.append(
            f"| {m} | oracle: exact top-k eigenvectors for k products | {100 * oracle:.2f} % (s.d.) | | | |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="seeds on the MLP case")
    ap.add_argument("--cnn-seeds", type=int, default=10, help="seeds on the CNN case")
    ap.add_argument("--big", type=int, default=100, help="extra budget for hutch++/krylov++ (0: none)")
    ap.add_argument("--quick", action="store_true", help="MLP case only")
    ap.add_argument("--study", action="store_true", help="estimators on the exact MLP spectrum (see above)")
    ap.add_argument("--study-seeds", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.study:
        print("\n".join(run_study(args.study_seeds)))
        return
    t0 = time.perf_counter()
    runner = PyHessianRunner()
    lines = []
    model, data = mlp_case()
    _, tr = dense_spectrum("mlp", model, data)
    lines += run_case("MLP 10.9k / 2048", model, data, tr, 0.0, args.seeds, args.big, runner)
    notes = [f"MLP reference: dense float64 trace {tr:.6g}."]
    if not args.quick:
        cmodel, cdata = cnn_case()
        ref, ref_se = cnn_reference(cmodel, cdata)
        notes.append(f"CNN reference: float32 krylov++ with 900 products, {ref:.6g} ± {ref_se:.2g} (1 s.e.).")
        lines += run_case(
            "CNN 105k / 1024 digits", cmodel, cdata, ref, ref_se, args.cnn_seeds, args.big, runner
        )
    out = [
        SECTION,
        "",
        f"Command: `.venv/bin/python bench/bench_trace.py --seeds {args.seeds} --cnn-seeds {args.cnn_seeds} "
        f"--big {args.big}` (torch {torch.__version__}, CPU, 1 thread, "
        f"{time.perf_counter() - t0:.0f} s in all). Per seed, PyHessian's `trace()` at its defaults sets the "
        "budget; dynascope runs at that many products with the same seed. Coverage: fraction of seeds with "
        "|error| ≤ 2 standard errors (reference's own s.e. added in quadrature).",
        "",
        "| case | method | median rel. error | max rel. error | ±2 s.e. coverage | products | wall s | "
        "time ratio vs PyHessian |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    print("\n".join(out))


if __name__ == "__main__":
    main()
