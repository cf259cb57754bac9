"""Cached-result lookups over every checkpoint of a run: wall time and safetensors header reads.

Run:  .venv/bin/python bench/bench_run_index.py [--sizes 25 100 200] [--write]

Setup: a run of a tiny MLP (mlp 2→8→2, 42 parameters) on 16 xor points with N checkpoints; one
``hessian_trace`` result is stored under every checkpoint's cache key (``runner.store_result``), so a sweep
over all steps finds every row cached and computes nothing. Measured, in a fresh ``Run.open`` of the folder:

* ``cold``: ``runner.sweep`` over all N steps with the process's caches emptied (run index, file hashes);
* ``warm``: the same sweep again (the app's rerun, a second CLI ``--all`` in one process);
* ``reads``: safetensors headers read (calls of ``read_safetensors_metadata``) — the count does not depend
  on the machine's speed; the target is ≤ 2 per checkpoint for the cold sweep.

Timings depend on the machine and its load (the script prints ``os.getloadavg()``); read the counts first.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from pathlib import Path

import torch
from benchmarks_md import publish

from dynascope import runner
from dynascope.models import Run
from dynascope.models.checkpoints import _sha256_of
from dynascope.store import ResultStore

#: The same sweep before the run index (commit 0a02a26: every lookup listed the folder and read every header
#: twice), on the machine and load of the first published table.
BEFORE = (
    "Before the run index (commit 0a02a26), same machine, load average ≈ 6: 25 checkpoints 0.164 s cold / "
    "1,275 header reads, 100: 5.57 s / 20,100, 200: 40.3 s / 80,200 (the warm sweep the same: nothing "
    "was cached)."
)

PARAMS = {"n_matvecs": 4}
MODEL = {"name": "mlp", "in_dim": 2, "width": 8, "depth": 1, "out_dim": 2, "seed": 0}
DATASET = {"name": "xor", "n_train": 16, "n_test": 8, "seed": 0}


def make_run(path: Path, n: int) -> tuple[Run, ResultStore]:
    """A run with ``n`` checkpoints and a cached ``hessian_trace`` row at each."""
    run = Run.create(path, model=MODEL, dataset=DATASET)
    model = run.build_model()
    for step in range(n):
        run.save_checkpoint(model, step)
    store = ResultStore(path)
    result, _ = runner.run_probe(run, "hessian_trace", step=0, params=PARAMS, store=store)
    for step in range(1, n):
        runner.store_result(runner.plan(run, "hessian_trace", step=step, params=PARAMS), result, store)
    return run, store


class HeaderReads:
    """Counts ``read_safetensors_metadata`` calls made by the run-listing code while active."""

    MODULES = ("dynascope.models.runs", "dynascope.models.run_index")

    def __init__(self) -> None:
        self.count = 0
        self._patched: list[tuple[object, object]] = []

    def __enter__(self) -> HeaderReads:
        for name in self.MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            original = getattr(mod, "read_safetensors_metadata", None)
            if original is None:
                continue

            def counted(path, _original=original):
                self.count += 1
                return _original(path)

            self._patched.append((mod, original))
            mod.read_safetensors_metadata = counted
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, original in self._patched:
            mod.read_safetensors_metadata = original


def clear_caches() -> None:
    """Forget what this process knows about checkpoint folders and file hashes."""
    _sha256_of.cache_clear()
    try:
        from dynascope.models.run_index import clear_run_indexes
    except ImportError:
        return
    clear_run_indexes()


def measure(path: Path, store: ResultStore) -> dict[str, float]:
    clear_caches()
    out: dict[str, float] = {}
    run = Run.open(path)
    for arm in ("cold", "warm"):
        with HeaderReads() as reads:
            t0 = time.perf_counter()
            rows = runner.sweep(run, "hessian_trace", params=PARAMS, store=store)
            out[arm] = time.perf_counter() - t0
        assert all(cached for _, _, cached in rows), "every row was stored beforehand"
        out[f"{arm}_reads"] = reads.count
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 200])
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| checkpoints | cold sweep (s) | header reads | warm sweep (s) | header reads |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            run, store = make_run(Path(tmp) / f"run{n}", n)
            m = measure(run.path, store)
            cells = [n, f"{m['cold']:.3f}", m["cold_reads"], f"{m['warm']:.3f}", m["warm_reads"]]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
            print(rows[-1], flush=True)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    publish(
        "## Run index: cached lookups over every checkpoint",
        "`.venv/bin/python bench/bench_run_index.py --write` (CPU, one thread; load average "
        f"{load}). A sweep of `hessian_trace` over all N checkpoints of a run whose every row is cached: "
        f"seconds and safetensors header reads (module docstring). {BEFORE}",
        rows,
        args.write,
    )


if __name__ == "__main__":
    main()
