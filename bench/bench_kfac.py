"""KFAC / EKFAC: dynascope vs curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` (fisher_type
"type-2", kfac_approx "expand", reduction "mean"), in one process, round-robin, one thread.

Run:  .venv/bin/python bench/bench_kfac.py [--repeats 5]
Anchor (benchmark-only; install without letting pip replace torch):
    .venv/bin/pip install --no-deps curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum \
        linear_operator backpack-for-pytorch jaxtyping unfoldNd wadler_lindig

Cases (float64): a ReLU MLP 64→128→128→10 on 1,024 digits (cross-entropy and MSE on one-hot targets)
and a CNN (two 3×3 convolutions, 8 and 16 channels, a Linear head) on 512 digits as 8×8 images.
Columns: max |ours − curvlinops| / max |curvlinops| over 8 random directions; time to build the factors
(EKFAC: and the eigenvalue corrections) plus the 8 products, median of ``--repeats``; ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).double()
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).double()  # fmt: skip
    onehot = torch.nn.functional.one_hot(labels[:1024], 10).double()
    return [
        ("MLP 34.6k / 1024, CE", mlp, (x[:1024], labels[:1024]), nn.CrossEntropyLoss()),
        ("MLP 34.6k / 1024, MSE", mlp, (x[:1024], onehot), nn.MSELoss()),
        ("CNN 23.9k / 512, CE", cnn, (x[:512].reshape(-1, 1, 8, 8), labels[:512]), nn.CrossEntropyLoss()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import curvlinops

    import dynascope.probes as probes

    print(f"command: python bench/bench_kfac.py --repeats {args.repeats}")
    print("| case | operator | max rel. difference | ours s | curvlinops s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, model, data, loss in cases():
        n_params = sum(p.numel() for p in model.parameters())
        V = torch.randn(n_params, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for label, ours, theirs in (
            ("KFAC", probes.kfac, curvlinops.KFACLinearOperator),
            ("EKFAC", probes.ekfac, curvlinops.EKFACLinearOperator),
        ):
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            out: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):  # round-robin
                t0 = time.perf_counter()
                out["ours"] = ours(model, data) @ V
                times["ours"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                op = theirs(model, loss, list(model.parameters()), [data], fisher_type="type-2",
                            check_deterministic=False)  # fmt: skip
                out["theirs"] = op @ V
                times["theirs"].append(time.perf_counter() - t0)
            err = float((out["ours"] - out["theirs"]).abs().max() / out["theirs"].abs().max())
            mine, ref = statistics.median(times["ours"]), statistics.median(times["theirs"])
            print(f"| {name} | {label} | {err:.1e} | {mine:.3f} | {ref:.3f} | {mine / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()
