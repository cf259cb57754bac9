"""Hessian spectrum: dynascope vs PyHessian, side by side in one process.

Run:  .venv/bin/python bench/bench_hessian.py [--write] [--repeats 3] [--quick]

Cases
  (a) MLP 32-128-48-10 (10,906 params), 2048 Gaussian-mixture samples, cross-entropy, float32 model,
      briefly trained. Reference: dense float64 Hessian (eigvalsh), cached under ~/.cache/dynascope/bench.
  (b) CNN (conv16-pool-conv32-fc192-fc10, 105,306 params) on 1024 sklearn digits 8x8. Dense is too big;
      reference eigenvalues: float64 Lanczos at tol 1e-10; reference trace: float64 Hutch++ with 900
      products (its own ±stderr is shown).
Top-5 rows: PyHessian, dynascope float32 / float64 products, and float32 + float64 Rayleigh–Ritz
refinement (``refine=True`` at tol 1e-4; ``tol=1e-5``, where ``refine="auto"`` refines), timed round-robin.
The refinement's float64 products run ``conv2d`` through ``probes/gemm_conv.py``; the references (dense,
and float64 Lanczos without refinement) use PyTorch's native convolution, so they are independent of it.
``--eig-only`` prints just those rows (to merge into an existing section).
Timings: one thread, median of ``--repeats`` runs; the machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import dynascope.probes as probes
from dynascope.probes.density import spectral_moments, wasserstein1
from dynascope.probes.operators import make_operator

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DYNASCOPE_BENCH_CACHE", Path.home() / ".cache" / "dynascope" / "bench"))
SECTION = "## Hessian spectrum: dynascope vs PyHessian (bench/bench_hessian.py)"


# ----------------------------------------------------------------------------- cases
def mlp_case() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g) * 1.5
    y = torch.arange(2048) % 10
    x = centers[y] + torch.randn(2048, 32, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 48), nn.Tanh(), nn.Linear(48, 10))
    _train(model, x, y, steps=60)
    return model, (x, y)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 192)
        self.fc2 = nn.Linear(192, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = torch.relu(self.conv2(h))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def cnn_case() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    import dynascope.datasets as datasets

    x, y = datasets.load("digits", n_train=1024, flatten=False, seed=0).train
    torch.manual_seed(0)
    model = DigitsCNN()
    _train(model, x, y, steps=40)
    return model, (x, y)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# ----------------------------------------------------------------------------- helpers
def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


class PyHessianRunner:
    """PyHessian with its Hessian-vector products counted (wraps its module-level HVP function)."""

    def __init__(self) -> None:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)
        self.ph = ph
        self.count = 0
        original = ph.hessian_vector_product

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        ph.hessian_vector_product = counted

    def eigenvalues(self, model, data, top_n=5):
        torch.manual_seed(0)
        self.count = 0
        h = self.ph.hessian(model, nn.CrossEntropyLoss(), data=data, cuda=False)
        vals, _ = h.eigenvalues(top_n=top_n)
        return sorted(vals, reverse=True), self.count

    def trace(self, model, data):
        torch.manual_seed(0)
        self.count = 0
        h = self.ph.hessian(model, nn.CrossEntropyLoss(), data=data, cuda=False)
        samples = h.trace()
        return float(sum(samples) / len(samples)), self.count

    def density(self, model, data):
        h = self.ph.hessian(model, nn.CrossEntropyLoss(), data=data, cuda=False)
        try:
            h.density(iter=10, n_v=1)
            return "ran"
        except Exception as err:  # noqa: BLE001 - record whatever breaks
            return f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"


def dense_spectrum(name: str, model: nn.Module, data) -> tuple[torch.Tensor, float]:
    """Eigenvalues (ascending) and trace of the dense float64 Hessian, cached by parameter hash."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    key = f"{name}-{theta.numel()}-{float(theta.sum()):.12e}-{float(theta.norm()):.12e}"
    path = CACHE / f"{name}.pt"
    if path.exists():
        saved = torch.load(path)
        if saved["key"] == key:
            return saved["eigenvalues"], saved["trace"]
    torch.set_num_threads(2)
    op = make_operator(model, data, dtype=torch.float64)
    H = op.to_dense(chunk=512)
    H = 0.5 * (H + H.T)
    lam = torch.linalg.eigvalsh(H)
    tr = float(H.trace())
    del H
    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "eigenvalues": lam, "trace": tr}, path)
    return lam, tr


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def timed_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run the callables round-robin ``repeats`` times: last outputs and median wall times per key
    (round-robin keeps the ratios fair when the shared machine's load drifts)."""
    times: dict = {key: [] for key in fns}
    outs: dict = {}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            outs[key] = fn()
            times[key].append(time.perf_counter() - t)
    return outs, {key: statistics.median(v) for key, v in times.items()}


def matmat_ratio(model, data, backend: str, repeats: int) -> tuple[float, float]:
    op = make_operator(model, data, backend=backend)
    V = torch.randn(op.size, 10, generator=torch.Generator().manual_seed(0))
    op.matvec(V[:, 0])
    _, t1 = timed(lambda: op.matvec(V[:, 0]), repeats + 2)
    _, t10 = timed(lambda: op.matmat(V), repeats)
    return t1, t10


# ----------------------------------------------------------------------------- one case
def run_case(
    name: str, model, data, ref_vals, ref_trace, ref_trace_se, runner, repeats, lines, summary, eig_only=False
):
    eig = probes.hessian_eigenvalues
    outs, times = timed_interleaved(
        {
            "ph": lambda: runner.eigenvalues(model, data),
            "d32": lambda: eig(model, data, k=5),
            "d64": lambda: eig(model, data, k=5, dtype=torch.float64),
            "refine": lambda: eig(model, data, k=5, refine=True),
            "auto": lambda: eig(model, data, k=5, tol=1e-5),  # tol <= 1e-5: "auto" refines
        },
        repeats,
    )
    (ph_vals, ph_hvps), r32, r64, rr, ra = (outs[key] for key in ("ph", "d32", "d64", "refine", "auto"))
    t_ph, t_d32, t_d64, t_rr, t_ra = (times[key] for key in ("ph", "d32", "d64", "refine", "auto"))
    ph_err = [rel(v, r) for v, r in zip(ph_vals, ref_vals)]
    d32_err = [rel(v, r) for v, r in zip(r32.values, ref_vals)]
    d64_err = [rel(v, r) for v, r in zip(r64.values, ref_vals)]
    rr_err = [rel(v, r) for v, r in zip(rr.values, ref_vals)]
    ra_err = [rel(v, r) for v, r in zip(ra.values, ref_vals)]
    fmt = lambda errs: " ".join(f"{e:.1e}" for e in errs)  # noqa: E731
    lines.append(
        f"| {name} | top-5 | PyHessian (power it., tol 1e-3, fp32) | {fmt(ph_err)} | {ph_hvps} | "
        f"{t_ph:.2f} | 1 |"
    )
    lines.append(
        f"| {name} | top-5 | dynascope Lanczos (fp32, tol 1e-4) | {fmt(d32_err)} | {r32.n_matvecs}+1 | "
        f"{t_d32:.2f} | **{t_d32 / t_ph:.2f}** |"
    )
    lines.append(
        f"| {name} | top-5 | dynascope Lanczos (fp64 products, tol 1e-4) | {fmt(d64_err)} | "
        f"{r64.n_matvecs}+1 | "
        f"{t_d64:.2f} | **{t_d64 / t_ph:.2f}** |"
    )
    for label, res, errs, t in (
        ("fp32, tol 1e-4, `refine=True`", rr, rr_err, t_rr),
        ('fp32, tol 1e-5, `refine="auto"`', ra, ra_err, t_ra),
    ):
        n_ref = res.meta["n_matvecs_refine"]
        lines.append(
            f"| {name} | top-5 | dynascope Lanczos ({label}: + fp64 Rayleigh–Ritz) | {fmt(errs)} | "
            f"{res.n_matvecs - n_ref}+{n_ref} fp64+1 | {t:.2f} | **{t / t_ph:.2f}** |"
        )
    summary[name] = {"ph_top5": max(ph_err), "d32_top5": max(d32_err), "d64_top5": max(d64_err),
                     "refine_top5": max(rr_err), "auto_top5": max(ra_err), "t32": t_d32 / t_ph,
                     "t64": t_d64 / t_ph, "t_refine": t_rr / t_ph, "t_auto": t_ra / t_ph}  # fmt: skip

    if eig_only:
        return
    (ph_tr, ph_tr_hvps), t_pht = timed(lambda: runner.trace(model, data), repeats)
    budget = max(ph_tr_hvps, 4)
    tr, t_dt = timed(lambda: probes.hessian_trace(model, data, n_matvecs=budget), repeats)
    tr64, t_dt64 = timed(
        lambda: probes.hessian_trace(model, data, n_matvecs=budget, dtype=torch.float64), repeats
    )
    ref_note = f" (ref ± {ref_trace_se:.1e})" if ref_trace_se else ""
    lines.append(
        f"| {name} | trace{ref_note} | PyHessian Hutchinson (tol 1e-3) | {rel(ph_tr, ref_trace):.1e} | "
        f"{ph_tr_hvps} | {t_pht:.2f} | 1 |"
    )
    for label, res, t in (("fp32", tr, t_dt), ("fp64", tr64, t_dt64)):
        z = (res.estimate - ref_trace) / res.stderr
        lines.append(
            f"| {name} | trace | dynascope Hutch++ ({label}, same budget) | "
            f"{rel(res.estimate, ref_trace):.1e} "
            f"(z = {z:+.2f}, ±{res.stderr / abs(ref_trace):.1e} rel) | {res.n_matvecs}+1 | {t:.2f} | "
            f"**{t / t_pht:.2f}** |"
        )
    summary[name]["ph_trace"] = rel(ph_tr, ref_trace)
    summary[name]["d_trace"] = rel(tr.estimate, ref_trace)
    summary[name]["trace_budget"] = budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="MLP case only")
    ap.add_argument("--eig-only", action="store_true", help="top-5 eigenvalue rows only (printed)")
    args = ap.parse_args()
    if args.eig_only and args.write:
        ap.error("--eig-only prints a partial table; it cannot --write the section")
    torch.set_num_threads(1)
    runner = PyHessianRunner()
    lines = [
        "| case | quantity | method | rel. error (top-5: each) | HVPs | wall s | ratio vs PyHessian |",
        "|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = {}
    notes: list[str] = []

    model, data = mlp_case()
    lam, tr_ref = dense_spectrum("mlp", model, data)
    top = lam.flip(0)[:5].tolist()
    run_case("MLP 10.9k / 2048", model, data, top, tr_ref, 0.0, runner, args.repeats, lines, summary,
             eig_only=args.eig_only)  # fmt: skip
    if args.eig_only:
        if not args.quick:
            cmodel, cdata = cnn_case()
            ref = probes.hessian_eigenvalues(cmodel, cdata, k=5, tol=1e-10, dtype=torch.float64)
            run_case("CNN 105k / 1024 digits", cmodel, cdata, ref.values.tolist(), 0.0, 0.0, runner,
                     args.repeats, lines, summary, eig_only=True)  # fmt: skip
        print("\n".join(lines))
        print(summary, file=sys.stderr)
        return
    notes.append(f"PyHessian `density()`: {runner.density(model, data)}")
    notes.append(
        "`refine` costs k float64 products (and a float64 first-order graph) on top of the float32 Lanczos "
        "run. PyTorch's float64 CPU convolution loops over samples (~4.6x a float32 product on the CNN), so "
        "the refinement runs `conv2d` as one gather + one matmul (`probes/gemm_conv.py`, ~2.8x a float32 "
        "product); the CNN's float64 reference (non-refined float64 Lanczos) keeps the native kernel."
    )

    # SLQ density against the dense spectrum
    exact_m = spectral_moments(lam)
    span = float(lam.max() - lam.min())
    dens_rows = []
    for deflate, n_probes, steps in ((0, 10, 80), (20, 10, 80), (20, 30, 30)):
        d, t = timed(
            lambda n_probes=n_probes, steps=steps, deflate=deflate: probes.hessian_density(
                model, data, n_probes=n_probes, lanczos_steps=steps, deflate=deflate
            ),
            1,
        )
        m_err = ((d.moments() - exact_m).abs() / exact_m.abs()).tolist()
        w1 = wasserstein1(d.ritz_values, d.ritz_weights, lam, None) / span
        dens_rows.append(
            f"| deflate={deflate}, probes={n_probes}, steps={steps} | "
            f"{' '.join(f'{e:.1e}' for e in m_err)} | "
            f"{w1:.1e} | {d.n_matvecs} | {t:.2f} |"
        )

    # matmat vs matvec
    mm_rows = []
    cases = [("MLP 10.9k / 2048", model, data)]
    if not args.quick:
        cmodel, cdata = cnn_case()
        cases.append(("CNN 105k / 1024 digits", cmodel, cdata))
        ref = probes.hessian_eigenvalues(cmodel, cdata, k=5, tol=1e-10, dtype=torch.float64)
        ref_tr = probes.hessian_trace(cmodel, cdata, n_matvecs=900, dtype=torch.float64, seed=123)
        run_case("CNN 105k / 1024 digits", cmodel, cdata, ref.values.tolist(), ref_tr.estimate, ref_tr.stderr,
                 runner, args.repeats, lines, summary)  # fmt: skip
        notes.append(
            f"CNN reference: float64 Lanczos tol 1e-10 (all converged: {bool(ref.converged.all())}, "
            f"{ref.n_matvecs} HVPs); trace reference float64 Hutch++ with 900 HVPs = "
            f"{ref_tr.estimate:.6g} ± {ref_tr.stderr:.2g}."
        )
    for name, m, dt in cases:
        for backend in ("graph", "func"):
            t1, t10 = matmat_ratio(m, dt, backend, args.repeats)
            mm_rows.append(f"| {name} | {backend} | {t1 * 1e3:.1f} | {t10 * 1e3:.1f} | {t10 / t1:.2f} |")

    out = [
        SECTION,
        "",
        "Command: `.venv/bin/python bench/bench_hessian.py --write` "
        f"(torch {torch.__version__}, CPU, 1 thread, "
        f"median of {args.repeats}, top-5 rows timed round-robin; the machine is shared, so compare ratios). "
        "HVP counts of dynascope are "
        "the algorithm's products, `+1` is the determinism check. Relative errors against the dense float64 "
        "spectrum (MLP) or a float64 high-accuracy reference (CNN). `refine` rows: float32 Lanczos, then one "
        "float64 Rayleigh–Ritz step on the 5 Ritz vectors (`+5 fp64` products, float64 copy of the model; "
        "reported residuals are float64 ones).",
        "",
        *lines,
        "",
        "SLQ density of the MLP Hessian vs the dense spectrum (relative error of the raw moments m1..m4; "
        "1-Wasserstein distance of the Ritz measure as a fraction of the spectral range):",
        "",
        "| setting | moment rel. errors m1 m2 m3 m4 | W1 / range | HVPs | wall s |",
        "|---|---|---|---|---|",
        *dens_rows,
        "",
        "`matmat` with 10 vectors vs one `matvec`:",
        "",
        "| case | backend | matvec ms | matmat(10) ms | ratio |",
        "|---|---|---|---|---|",
        *mm_rows,
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    text = "\n".join(out)
    print(text)
    print(summary, file=sys.stderr)
    if args.write:
        from benchmarks_md import write_section

        write_section(SECTION, text)


if __name__ == "__main__":
    main()
