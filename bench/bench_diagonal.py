"""The Hessian diagonal: dynascope vs BackPACK's ``DiagHessian`` (exact) and curvlinops' ``hutchinson_diag``
(Hutchinson, equal products), in one process, round-robin, one thread.

Run:  .venv/bin/python bench/bench_diagonal.py [--repeats 5] [--matvecs 100] [--batches 4]
Anchors (benchmark-only; install without letting pip replace torch):
    .venv/bin/pip install --no-deps curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum \\
        linear_operator backpack-for-pytorch jaxtyping unfoldNd wadler_lindig

Models from dynascope's registry (float64, eval, cross-entropy on digits; BackPACK gets an ``nn.Sequential``
of the same module objects): a tanh MLP and a ReLU MLP 64→128→128→10 on 1,024 digits, a ReLU CNN (3×3
convolutions with 8 and 16 channels, flatten, Linear head) on 512 digits as 8×8 images and a tanh CNN
(4 and 8 channels) on 128. Columns: max |ours − theirs| / max |theirs|; time (median of ``--repeats``, each
repeat runs every method once in turn); ratio ours / theirs. The exact diagonal is ``hessian_diagonal(...,
method="exact")`` (second-order backpropagation); Hutchinson is ``hessian_diagonal(..., n_matvecs=m)`` against
``hutchinson_diag(HessianLinearOperator, m)`` (the estimates differ by their random signs: the column is
then each estimate's ‖estimate − exact‖ / ‖exact‖, ours vs curvlinops'); Hutchinson again over
``--batches`` equal batches (ours: ``batch_size=``, the forward-over-reverse backend; curvlinops: a list of
batches). ``check_determinism=False`` for
ours (curvlinops' own check off too). The load column is the 1-minute load average after each model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import torch
from torch import nn


def cases() -> list[tuple[str, nn.Module, nn.Sequential, tuple[torch.Tensor, torch.Tensor]]]:
    from sklearn.datasets import load_digits

    from dynascope.models import build

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    out = []
    for act in ("tanh", "relu"):
        torch.manual_seed(0)
        m = build("mlp", in_dim=64, width=128, depth=2, out_dim=10, activation=act).double().eval()
        out.append((f"MLP {act} 64-128-128-10 / 1024", m, nn.Sequential(nn.Flatten(), *m.body, m.head),
                    (x[:1024], y[:1024])))  # fmt: skip
    for act, ch, n in (("relu", [8, 16], 512), ("tanh", [4, 8], 128)):
        torch.manual_seed(0)
        m = build("cnn", in_channels=1, image_size=8, channels=ch, out_dim=10, activation=act, pool="flatten")
        m = m.double().eval()
        out.append((f"CNN {act} {ch} / {n}", m, nn.Sequential(*m.body, m.pool, m.head),
                    (x[:n].reshape(-1, 1, 8, 8), y[:n])))  # fmt: skip
    return out


def backpack_diag(seq: nn.Sequential, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model, loss = seq, extend(nn.CrossEntropyLoss())
    model.zero_grad()
    with backpack(DiagHessian()):
        loss(model(data[0]), data[1]).backward()
    return torch.cat([p.diag_h.reshape(-1) for p in model.parameters()])


def curvlinops_hutchinson(
    seq: nn.Sequential, data: tuple[torch.Tensor, torch.Tensor], m: int, batches: int
) -> Any:
    """``hutchinson_diag`` of curvlinops' Hessian operator with ``m`` Rademacher products."""
    from curvlinops import HessianLinearOperator, hutchinson_diag

    params = [p for p in seq.parameters() if p.requires_grad]
    loader = list(zip(data[0].chunk(batches), data[1].chunk(batches)))
    H = HessianLinearOperator(seq, nn.CrossEntropyLoss(), params, loader, check_deterministic=False)
    return hutchinson_diag(H, m)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matvecs", type=int, default=100)
    parser.add_argument("--batches", type=int, default=4, help="Hutchinson also over this many batches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import dynascope.probes as probes

    m = args.matvecs

    cmd = f"--repeats {args.repeats} --matvecs {m} --batches {args.batches}"
    print(f"command: python bench/bench_diagonal.py {cmd}")
    print(f"load before: {os.getloadavg()[0]:.2f}")
    print("| model | P | method | max rel. difference / rel. error | ours s | anchor s | ratio | load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, seq, data in cases():
        from backpack import extend

        P = sum(p.numel() for p in model.parameters())
        anchor = copy.deepcopy(seq)  # BackPACK's hooks stay off the modules our vmap-ed products use
        extended = extend(copy.deepcopy(seq))
        bs = -(-data[0].shape[0] // args.batches)
        keys = ("ours", "backpack", "hutch", "curvlinops", "hutch_b", "curvlinops_b")
        times: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(args.repeats):
            t, ours = timed(probes.hessian_diagonal, model, data, method="exact", check_determinism=False)
            times["ours"].append(t)
            t, bp = timed(backpack_diag, extended, data)
            times["backpack"].append(t)
            t, hu = timed(probes.hessian_diagonal, model, data, n_matvecs=m, check_determinism=False)
            times["hutch"].append(t)
            t, cl = timed(curvlinops_hutchinson, anchor, data, m, 1)
            times["curvlinops"].append(t)
            if args.batches > 1:
                kw = {"n_matvecs": m, "batch_size": bs, "check_determinism": False}
                t, hub = timed(probes.hessian_diagonal, model, data, **kw)
                times["hutch_b"].append(t)
                t, clb = timed(curvlinops_hutchinson, anchor, data, m, args.batches)
                times["curvlinops_b"].append(t)
        assert not ours.meta["exact_products"], ours.meta["exact_products"]
        load = os.getloadavg()[0]
        med = {k: statistics.median(v) for k, v in times.items() if v}
        err = float((ours.values - bp.double()).abs().max() / bp.abs().max())
        print(f"| {name} | {P} | exact vs BackPACK DiagHessian | {err:.1e} | {med['ours']:.3f} | "
              f"{med['backpack']:.3f} | **{med['ours'] / med['backpack']:.2f}** | {load:.1f} |")  # fmt: skip
        exact = ours.values
        e_ours, e_cl = (float((d.double() - exact).norm() / exact.norm()) for d in (hu.values, cl))
        print(f"| {name} | {P} | Hutchinson ({m}) vs curvlinops | error {e_ours:.2f} vs {e_cl:.2f} | "
              f"{med['hutch']:.3f} | {med['curvlinops']:.3f} | **{med['hutch'] / med['curvlinops']:.2f}** | "
              f"{load:.1f} |")  # fmt: skip
        if args.batches > 1:
            e_ours, e_cl = (float((d.double() - exact).norm() / exact.norm()) for d in (hub.values, clb))
            print(f"| {name} | {P} | Hutchinson ({m}), {args.batches} batches, vs curvlinops | "
                  f"error {e_ours:.2f} vs {e_cl:.2f} | {med['hutch_b']:.3f} | {med['curvlinops_b']:.3f} | "
                  f"**{med['hutch_b'] / med['curvlinops_b']:.2f}** | {load:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
