"""Top-5 Hessian eigenvalues: dynascope's block Lanczos vs PyHessian and scipy ``eigsh`` over curvlinops.

Run:  .venv/bin/python bench/bench_eigensolver.py [--repeats 5] [--quick] [--write]

Anchors (benchmark-only; install without letting pip replace torch):
    .venv/bin/pip install --no-deps curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum \
        linear_operator backpack-for-pytorch jaxtyping

Cases (from bench_hessian.py): an MLP of 10.9k parameters on 2048 samples (reference: the dense float64
spectrum) and a CNN of 105k parameters on 1024 digits (reference: float64 Lanczos at tol 1e-10).
Methods, timed round-robin in one process on one thread (median of ``--repeats``):

* PyHessian's power iteration at its default tol 1e-3 (float32);
* ``scipy.sparse.linalg.eigsh`` (ARPACK, k=5, which="LA", tol=1e-6) over curvlinops' float64
  ``HessianLinearOperator`` (float32 peers stall near 5e-5 relative error);
* dynascope ``hessian_eigenvalues(k=5)``: block Lanczos (block 2) in float32 at tol 1e-4, and at tol 1e-5
  (``refine="auto"``: one float64 Rayleigh–Ritz step); single-vector Lanczos (``block_size=1``) for
  comparison.

Reported: each method's largest relative error over the top 5, products (HVPs), data passes, wall time and
its ratios to PyHessian and to eigsh-over-curvlinops.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import PyHessianRunner, cnn_case, dense_spectrum, mlp_case  # noqa: E402
from benchmarks_md import publish  # noqa: E402

import dynascope.probes as probes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = (
    "## Top-5 eigenvalues: block Lanczos vs PyHessian and eigsh over curvlinops (bench/bench_eigensolver.py)"
)


def curvlinops_eigsh(model: nn.Module, data, k: int = 5, tol: float = 1e-6) -> tuple[list[float], int]:
    """scipy ``eigsh`` over curvlinops' float64 Hessian operator: ``(top-k descending, HVPs)``."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    m64 = copy.deepcopy(model).double()
    x, y = data
    params = [p for p in m64.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        m64, nn.CrossEntropyLoss(), params, [(x.double(), y)], check_deterministic=False
    ).to_scipy()
    count = [0]
    matvec = op.matvec

    def counted(v):
        count[0] += 1
        return matvec(v)

    from scipy.sparse.linalg import LinearOperator

    wrapped = LinearOperator(op.shape, matvec=counted, dtype=op.dtype)
    vals = eigsh(wrapped, k=k, which="LA", tol=tol, return_eigenvectors=False)
    return sorted(vals.tolist(), reverse=True), count[0]


def rel_max(vals, ref) -> float:
    return max(abs(float(v) - float(r)) / abs(float(r)) for v, r in zip(vals, ref))


def run(name: str, model, data, ref: list[float], repeats: int, rows: list[str], summary: dict) -> None:
    runner = PyHessianRunner()
    eig = probes.hessian_eigenvalues
    methods = {
        "PyHessian (power iteration, tol 1e-3, fp32)": lambda: runner.eigenvalues(model, data),
        "eigsh (ARPACK, tol 1e-6) over curvlinops fp64": lambda: curvlinops_eigsh(model, data),
        "dynascope block Lanczos (b=2, fp32, tol 1e-4)": lambda: eig(model, data, k=5),
        'dynascope block Lanczos (b=2, fp32, tol 1e-5, refine="auto")': lambda: eig(
            model, data, k=5, tol=1e-5
        ),
        "dynascope single-vector Lanczos (b=1, fp32, tol 1e-4)": lambda: eig(model, data, k=5, block_size=1),
    }
    times: dict[str, list[float]] = {key: [] for key in methods}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for key, fn in methods.items():
            t = time.perf_counter()
            outs[key] = fn()
            times[key].append(time.perf_counter() - t)
    med = {key: statistics.median(v) for key, v in times.items()}
    t_ph = med["PyHessian (power iteration, tol 1e-3, fp32)"]
    t_cl = med["eigsh (ARPACK, tol 1e-6) over curvlinops fp64"]
    for key, out in outs.items():
        if isinstance(out, tuple):
            vals, hvps, passes = out[0], out[1], out[1]
        else:
            vals, hvps, passes = (
                out.values.tolist(),
                out.n_matvecs,
                out.meta.get("n_passes_solver", out.n_matvecs),
            )
        err = rel_max(vals, ref)
        rows.append(
            f"| {name} | {key} | {err:.1e} | {hvps} | {passes} | {med[key]:.2f} | "
            f"{med[key] / t_ph:.2f} | {med[key] / t_cl:.2f} |"
        )
        summary[(name, key)] = (err, med[key] / t_ph, med[key] / t_cl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="MLP case only")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| case | method | max rel. error (top-5) | HVPs | data passes | wall s | vs PyHessian "
        "| vs eigsh+curvlinops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict = {}
    model, data = mlp_case()
    lam, _ = dense_spectrum("mlp", model, data)
    run("MLP 10.9k / 2048", model, data, lam.flip(0)[:5].tolist(), args.repeats, rows, summary)
    if not args.quick:
        cmodel, cdata = cnn_case()
        ref = probes.hessian_eigenvalues(cmodel, cdata, k=5, tol=1e-10, dtype=torch.float64)
        run("CNN 105k / 1024 digits", cmodel, cdata, ref.values.tolist(), args.repeats, rows, summary)
    publish(
        SECTION,
        f"Command: `.venv/bin/python bench/bench_eigensolver.py --repeats {args.repeats}` (torch "
        f"{torch.__version__}, CPU, 1 thread, all methods timed round-robin in one process, median). "
        "HVPs: operator-vector products of the algorithm (dynascope's determinism check excluded); data "
        "passes: `matmat` calls (a block of b vectors is one pass).",
        rows,
        args.write,
    )


if __name__ == "__main__":
    main()
