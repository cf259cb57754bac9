"""Overhead of ``dynascope.Tracker`` and the λ_max points it delivers on a small edge-of-stability run.

Run:  .venv/bin/python bench/bench_tracker.py [--steps 2000] [--every 50] [--repeats 3] [--threads 1]

Setup: tanh MLP 32→64→64→10 (7.0k parameters), 512 Gaussian inputs with one-hot targets of a random linear
teacher, half-SSE loss, full-batch GD at lr 0.1; every arm starts from the same seeded weights. The model
is given to the Tracker as a new user has it (no ``model_spec``: the run records the ``Sequential``'s torch.nn
structure) and each run writes a new folder. Arms, run round-robin ``--repeats`` times (the median wall time
of each is reported, with the load average beside it):

* ``off``: the bare loop (forward, backward, step, ``loss.item()``);
* ``before`` (the reference: probes on the training thread): default settings (budget 10 %, checkpoints on
  "log+linear" every 100 plus one at each probe step, a background writer thread) with inline λ_max (runner
  ``sharpness``, k=1, tol=1e-3, warm-started) every ``--every`` steps computed on the training thread
  (``probe_worker="inline"``); the budget defers (stretches) probes to keep the tracker's time under 10 %;
* ``after``: the defaults (``probe_worker="auto"``): a forked worker process computes λ_max (1 torch thread,
  at a lower priority) on the checkpoint's weights while training goes on and writes the run (checkpoints,
  rows, status, results); the training process keeps no thread of the tracker and hands each checkpoint
  over as one packed byte buffer. A due run is skipped while the worker is still busy, or when the budget
  (the training thread's tracker time plus the worker's measured interference) has no room;
* ``after,budget=None``: as ``after`` with ``budget=None``: every requested run happens (training waits for
  the worker when it falls behind).

Printed: the command, a table (wall median, ratio to ``off``, the training process's CPU seconds — less
sensitive to other jobs than wall time; the worker's CPU is not in it —, λ_max points delivered / planned,
deferred or skipped runs, the load average around the arm), the tracker's own split per arm, and the
agreement of the last delivered λ_max with ``hessian_eigenvalues(tol=1e-8)`` on the saved checkpoint. The
worker needs a spare core: on a machine whose cores are all busy it competes with training (the charged
interference throttles it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
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


def _loop(
    steps: int, tracker_kwargs: dict | None, folder: Path
) -> tuple[float, float, dynascope.Tracker | None]:
    """Wall and CPU seconds (this process) of the training loop with the tracker, and the tracker."""
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = None
    t0, c0 = time.perf_counter(), time.process_time()
    if tracker_kwargs is not None:
        tr = dynascope.Tracker(folder, model, data=(x, y), loss="half_sse", optimizer=opt, probe_samples=512,
                               **tracker_kwargs)  # fmt: skip
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
    return time.perf_counter() - t0, time.process_time() - c0, tr


def _describe(tr: dynascope.Tracker, t_off: float) -> str:
    """The tracker's own accounting and, with a budget, the bound on the wall ratio (module docstring)."""
    o = tr.overhead
    probe = tr.status_probes()["lambda_max"]
    text = (
        f"training-thread {o['tracker_seconds']:.3f} s = {o['fraction'] or 0:.1%} of training "
        f"{o['train_seconds']:.3f} s (probe {o['probe_seconds']:.3f}, checkpoint "
        f"{o['checkpoint_seconds']:.3f}, write {o['write_seconds']:.3f}); "
        f"background writer {o['background_write_seconds']:.3f} s "
        f"(CPU {o['background_write_cpu_seconds']:.3f}); worker interference "
        f"{o['worker_interference_seconds']:.3f} s, waits for the worker {o['worker_wait_seconds']:.3f} s; "
        f"setup {o['setup_seconds']:.3f} s, close {o['close_seconds']:.3f} s; "
        f"λ_max runs {probe['runs']} (first {probe['first_run_seconds']:.3f} s on the training thread, "
        f"{probe['worker_seconds']:.3f} s in the worker), skipped {probe['skipped']}, "
        f"relaxed {len(tr.relaxed)}, possible every {probe['possible_every']}"
    )
    if o["budget"]:
        fixed = o["setup_seconds"] + o["close_seconds"] + probe["first_run_seconds"]
        text += (
            f"; bound 1 + {o['budget']:g} + {fixed:.3f}/{t_off:.3f} = {1 + o['budget'] + fixed / t_off:.3f}"
        )
    if o["over_budget"]:
        text += f"; {o['over_budget']}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    torch.set_num_threads(args.threads)
    probes = {"lambda_max": args.every}
    arms = {
        "off": None,
        "before": {"probes": probes, "probe_worker": "inline"},
        "after": {"probes": probes},
        "after,budget=None": {"probes": probes, "budget": None},
    }
    times: dict[str, list[float]] = {a: [] for a in arms}
    cpus: dict[str, list[float]] = {a: [] for a in arms}
    loads: dict[str, list[float]] = {a: [] for a in arms}
    last: dict[str, dynascope.Tracker] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cadence warning: the table shows it
        for i in range(args.repeats):
            for arm, kw in arms.items():
                folder = Path(tmp) / f"{arm.replace(',', '_').replace('=', '_')}_{i}"
                dt, cpu, tr = _loop(args.steps, kw, folder)
                times[arm].append(dt)
                cpus[arm].append(cpu)
                loads[arm].append(os.getloadavg()[0])
                if tr is not None:
                    last[arm] = tr
        med = {a: statistics.median(t) for a, t in times.items()}
        cpu_med = {a: statistics.median(t) for a, t in cpus.items()}
        print(f"steps={args.steps}  λ_max every {args.every}  repeats={args.repeats}  "
              f"threads={args.threads}  cpus={os.cpu_count()}")  # fmt: skip
        print(f"  {'arm':18s} {'median s':>9s} {'ratio':>6s} {'CPU s':>6s} {'ratio':>6s} "
              f"{'λ_max done/planned':>19s} {'skipped':>8s} {'worker':>8s}  "
              "load (1 min) after each repeat")  # fmt: skip
        for a in arms:
            ratio = f"{med[a] / med['off']:.3f}" if a != "off" else "1"
            cpu_ratio = f"{cpu_med[a] / cpu_med['off']:6.3f}" if a != "off" else f"{1:>6}"
            ratio += f" {cpu_med[a]:6.3f} {cpu_ratio}"
            done = skipped = worker = ""
            if a in last:
                p = last[a].status_probes()["lambda_max"]
                done, skipped, worker = f"{p['done']}/{p['planned']}", str(p["skipped"]), last[a].probe_worker
            print(f"  {a:18s} {med[a]:9.3f} {ratio:>6s} {done:>19s} {skipped:>8s} {worker:>8s}  "
                  f"{', '.join(f'{v:.2f}' for v in loads[a])}")  # fmt: skip
        for a, tr in last.items():
            print(f"  {a}: {_describe(tr, med['off'])}")
        run = dynascope.open_run(last["after"].path)
        m = run.metrics
        s = int(m.loc[m["lambda_max"].notna(), "step"].max())
        inline = float(m.loc[m["step"] == s, "lambda_max"].item())
        x, y = run.dataset().train
        ref = float(hessian_eigenvalues(run.model(s), (x, y), k=1, loss="half_sse", tol=1e-8).values[0])
        print(f"  after: λ_max at step {s}: worker {inline:.8g}, hessian_eigenvalues {ref:.8g}, "
              f"relative difference {abs(inline - ref) / abs(ref):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
