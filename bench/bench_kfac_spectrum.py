"""How close KFAC's and EKFAC's top eigenvalues are to the GGN's over a training run.

Run:  .venv/bin/python bench/bench_kfac_spectrum.py [--steps 1000] [--k 5]

A ReLU MLP 64→128→128→10 (34.6k parameters, float64) trained by full-batch SGD (lr 0.1, cross-entropy) on
1,024 scikit-learn digits. At log-spaced checkpoints (step 0, 10, 30, 100, 300, 1000) it compares top-``k``
eigenvalues:

* the GGN's, by Lanczos on exact GGN-vector products (``hessian_eigenvalues(operator="ggn", tol=1e-8)``);
* the GGN's diagonal blocks' (each parameter tensor its own block, as KFAC's blocks: the union of every
  block's top-``k`` by the same Lanczos) — this separates KFAC's two approximations, dropping the coupling
  between blocks, then factoring each block;
* ``probes.kfac`` / ``probes.ekfac`` (``.eigenvalues()``, closed form from the Kronecker factors).

Columns: λ₁ of each; the relative error of each of the top ``k`` (the i-th largest vs the GGN's i-th largest:
spectra, not directions); the time of each (one thread; the factors and their eigendecomposition vs Lanczos).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    import dynascope.probes as probes

    digits = load_digits()
    x = torch.tensor(digits.data[:1024], dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target[:1024])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    marks = [s for s in (0, 10, 30, 100, 300, 1000, 3000) if s <= args.steps]
    print(f"command: python bench/bench_kfac_spectrum.py --steps {args.steps} --k {args.k}")
    print(f"| step | train loss | GGN λ₁ | blocks λ₁ | KFAC λ₁ | EKFAC λ₁ | blocks rel. error, top {args.k} "
          f"| KFAC rel. error, top {args.k} | EKFAC rel. error, top {args.k} | GGN s | KFAC s | EKFAC s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for step in range(args.steps + 1):
        if step in marks:
            with torch.no_grad():
                loss = float(nn.functional.cross_entropy(model(x), y))
            t0 = time.perf_counter()
            ggn = probes.hessian_eigenvalues(model, (x, y), operator="ggn", k=args.k, tol=1e-8,
                                             loss="cross_entropy").values  # fmt: skip
            t_ggn = time.perf_counter() - t0
            blocks = torch.cat([
                probes.hessian_eigenvalues(model, (x, y), operator="ggn", k=min(args.k, p.numel()), tol=1e-8,
                                           params=[name], loss="cross_entropy").values
                for name, p in model.named_parameters()
            ]).sort(descending=True).values[: args.k]  # fmt: skip
            row, times = [blocks], []
            for build in (probes.kfac, probes.ekfac):
                t0 = time.perf_counter()
                top = build(model, (x, y), loss="cross_entropy").eigenvalues()[: args.k]
                times.append(time.perf_counter() - t0)
                row.append(top)
            errs = [" ".join(f"{float(e):.2f}" for e in (t - ggn).abs() / ggn) for t in row]
            lam = " | ".join(f"{float(t[0]):.4g}" for t in row)
            print(f"| {step} | {loss:.4f} | {float(ggn[0]):.4g} | {lam} | {' | '.join(errs)} | {t_ggn:.2f} "
                  f"| {times[0]:.2f} | {times[1]:.2f} |", flush=True)
        if step == args.steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


if __name__ == "__main__":
    main()
