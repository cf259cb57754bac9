"""Overhead of ``dynascope.Tracker`` on a small edge-of-stability run (full-batch GD, λ_max every 25 steps).

Run:  .venv/bin/python bench/bench_tracker.py [--steps 300] [--every 25] [--repeats 3] [--threads 1]

Setup: tanh MLP 32→64→64→10 (7.0k parameters), 512 Gaussian inputs with one-hot targets of a random linear
teacher, half-SSE loss, full-batch GD at lr 0.1; every arm starts from the same seeded weights. Arms,
run round-robin ``--repeats`` times (the median wall time of each is reported):

* ``off``: the bare loop (forward, backward, step, ``loss.item()``);
* ``on``: the same loop with a Tracker: checkpoints on the default "log+linear" schedule (every 100) plus
  at each probe step, metrics rows, and inline λ_max (runner ``sharpness``, k=1, tol=1e-3, warm-started)
  every ``--every`` steps on all 512 samples, ``budget=None`` (nothing deferred);
* ``on+budget``: as ``on`` with the default budget: the tracker's whole time on the training thread
  (checkpoint snapshots, hand-offs to the background writer, probes) ≤ 10 % of training time; probes are
  deferred (intervals stretched, and relaxed again) to keep it, checkpoints never;
* ``on+budget,sync``: as ``on+budget`` with ``background_writes=False`` (every fsync on the training thread).

Printed: wall times, each arm's ratio to ``off``, the tracker's own split (training-thread seconds by kind,
the background writer's busy seconds, setup and close), the deferred / relaxed probe runs, and the
agreement of the last inline λ_max with ``hessian_eigenvalues(tol=1e-8)`` on the saved checkpoint.

What to expect: the budget rule bounds the training-thread overhead, so for ``on+budget``

    ratio ≤ 1 + budget + (setup + close + first λ_max run + scheduled checkpoints beyond the budget) / T_off

(T_off: the bare loop's time); ``bound`` prints the right side with the measured terms, ``fraction`` the
tracker's training-thread time over training time (≤ budget apart from those terms). The background writer
runs beside training (``background_write_seconds``), so on a machine with no spare core its fsyncs and
serialisation can still slow the loop; the ``,sync`` arm shows what they cost on the training thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import dynascope
from dynascope.probes import hessian_eigenvalues


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    y = torch.nn.functional.one_hot((x @ teacher).argmax(1), 10).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return model, x, y


def _loop(steps: int, tracker_kwargs: dict | None, folder: Path) -> tuple[float, dynascope.Tracker | None]:
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = None
    t0 = time.perf_counter()
    if tracker_kwargs is not None:
        tr = dynascope.Tracker(folder, model, data=(x, y), loss="half_sse", optimizer=opt, overwrite=True,
                               model_spec=MODEL_SPEC, probe_samples=512, **tracker_kwargs)  # fmt: skip
        tr.step(0)
    for s in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        value = loss.item()
        if tr is not None:
            tr.step(s, metrics={"train_loss": value})
    if tr is not None:
        tr.close()
    return time.perf_counter() - t0, tr


def _describe(tr: dynascope.Tracker, t_off: float) -> str:
    """The tracker's own accounting and, with a budget, the bound on the wall ratio (module docstring)."""
    o = tr.overhead
    probe = tr.status_probes()["lambda_max"]
    text = (
        f"training-thread {o['tracker_seconds']:.3f} s = {o['fraction'] or 0:.1%} of training "
        f"{o['train_seconds']:.3f} s (probe {o['probe_seconds']:.3f}, checkpoint "
        f"{o['checkpoint_seconds']:.3f}, write {o['write_seconds']:.3f}); "
        f"background writer {o['background_write_seconds']:.3f} s; "
        f"setup {o['setup_seconds']:.3f} s, close {o['close_seconds']:.3f} s; "
        f"λ_max runs {probe['runs']} (first {probe['first_run_seconds']:.3f} s), "
        f"deferred {len(tr.skipped)}, relaxed {len(tr.relaxed)}"
    )
    if o["budget"]:
        fixed = o["setup_seconds"] + o["close_seconds"] + probe["first_run_seconds"]
        text += (
            f"; bound 1 + {o['budget']:g} + {fixed:.3f}/{t_off:.3f} = {1 + o['budget'] + fixed / t_off:.3f}"
        )
    if o["over_budget"]:
        text += f"; {o['over_budget']}"
    return text


def make_model() -> nn.Module:
    """The benchmark's model (the factory its runs are re-opened with)."""
    return _setup()[0]


MODEL_SPEC = {"factory": f"{Path(__file__).resolve()}:make_model"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probes = {"lambda_max": args.every}
    arms = {
        "off": None,
        "on": {"probes": probes, "budget": None},
        "on+budget": {"probes": probes},
        "on+budget,sync": {"probes": probes, "background_writes": False},
    }
    times: dict[str, list[float]] = {a: [] for a in arms}
    last: dict[str, dynascope.Tracker] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for arm, kw in arms.items():
                dt, tr = _loop(args.steps, kw, Path(tmp) / arm.replace("+", "_").replace(",", "_"))
                times[arm].append(dt)
                if tr is not None:
                    last[arm] = tr
        med = {a: statistics.median(t) for a, t in times.items()}
        print(f"steps={args.steps}  λ_max every {args.every}  repeats={args.repeats}  threads={args.threads}")
        for a in arms:
            ratio = f"  ratio {med[a] / med['off']:.3f}" if a != "off" else ""
            print(f"  {a:15s} median {med[a]:.3f} s{ratio}  (all: {', '.join(f'{t:.3f}' for t in times[a])})")
        for a, tr in last.items():
            print(f"  {a}: {_describe(tr, med['off'])}")
        run = dynascope.open_run(Path(tmp) / "on")
        m = run.metrics
        s = int(m.loc[m["lambda_max"].notna(), "step"].max())
        inline = float(m.loc[m["step"] == s, "lambda_max"].item())
        x, y = run.dataset().train
        ref = float(hessian_eigenvalues(run.model(s), (x, y), k=1, loss="half_sse", tol=1e-8).values[0])
        print(f"  λ_max at step {s}: inline {inline:.8g}, hessian_eigenvalues {ref:.8g}, "
              f"relative difference {abs(inline - ref) / abs(ref):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
