"""Notebook API: ``dynascope.open_run(path)`` → a :class:`RunView` of a run folder.

    run = dynascope.open_run("runs/grokking")
    run.checkpoints            # DataFrame: step, epoch, file, metrics stored with each checkpoint
    run.metrics                # DataFrame of metrics.csv
    run.results                # DataFrame: one row per cached probe result (scalars as columns)
    res = run.probe("hessian_eigenvalues", step=1000, k=10)   # computed once, then cached
    res.figure()               # the Plotly figure the app shows; res.save("eig.html")
    run.trajectory("hessian_trace")  # tidy DataFrame: step, quantity, index, value (every checkpoint)
    run.figure("hessian_trace")      # the same results, every checkpoint on the x axis

Everything goes through the same result store as the app and the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynascope.models import Run
from dynascope.store import STORE_FILENAME, ResultStore


class RunView:
    """A run folder seen from a notebook: tables of checkpoints, metrics and cached results."""

    def __init__(self, run: Run, store: ResultStore | None = None) -> None:
        self.run = run
        self._store = store

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def store(self) -> ResultStore:
        """The run's result store (``results.sqlite``, created on first use)."""
        if self._store is None:
            self._store = ResultStore(self.run.path / STORE_FILENAME)
        return self._store

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.run.config)

    @property
    def steps(self) -> list[int]:
        return self.run.steps()

    @property
    def checkpoints(self):  # -> pandas.DataFrame
        """One row per checkpoint: ``step, epoch, file`` and the metrics saved with it."""
        import pandas as pd

        rows = [
            {"step": c.step, "epoch": c.epoch, "file": str(c.path), **c.metrics}
            for c in self.run.checkpoints()
        ]
        return pd.DataFrame(rows, columns=None if rows else ["step", "epoch", "file"])

    @property
    def metrics(self):  # -> pandas.DataFrame
        """``metrics.csv`` (one row per logged step)."""
        return self.run.metrics()

    @property
    def results(self):  # -> pandas.DataFrame
        """The result store's catalogue (:meth:`ResultStore.catalogue`): ``probe, step, checkpoint_hash,
        setting, created``, one row per cached result; their values: :meth:`trajectory`."""
        if not (self.run.path / STORE_FILENAME).is_file():
            import pandas as pd

            return pd.DataFrame(columns=["probe", "step", "checkpoint_hash", "setting", "created"])
        return self.store.catalogue()

    def cached(self, probe: str, step: int | None = None) -> list[tuple[int | None, Any]]:
        """``[(step, Result)]`` of the cached results of ``probe`` (at ``step``), by step."""
        rows = [(s.step, s.result) for s in self.store.list(probe)]
        return [r for r in rows if step is None or r[0] == step]

    def probe(
        self,
        name: str,
        step: int | None = None,
        *,
        steps: list[int] | None = None,
        other: tuple[Any, int] | None = None,
        split: str = "train",
        max_samples: int | None = None,
        sample: str = "first",
        device: str | None = None,
        recompute: bool = False,
        **params: Any,
    ):
        """Run probe ``name`` on checkpoint ``step`` (last if None), from the cache when possible.

        Multi-checkpoint probes: ``probe("ntk_trajectory", steps=[0, 500, 1000])``;
        ``probe("lmc_barrier", step=1000, other=(other_run, 1000), align="weights")`` (``other_run``: a
        RunView, Run or run folder). ``sample="stratified"`` with ``max_samples``: a class-stratified subset
        (the app's default on large splits, so its cached results are reused), else the first samples.
        """
        from dynascope.runner import run_probe

        if other is not None:
            run_b, step_b = other
            other = (run_b.run if isinstance(run_b, RunView) else run_b, step_b)
        result, _ = run_probe(
            self.run, name, step=step, steps=steps, other=other, params=params, split=split,
            max_samples=max_samples, sample=sample, store=self.store, recompute=recompute, device=device,
        )  # fmt: skip
        return result

    def sweep(
        self,
        name: str,
        steps: list[int] | None = None,
        *,
        progress: bool = True,
        split: str = "train",
        max_samples: int | None = None,
        sample: str = "first",
        device: str | None = None,
        recompute: bool = False,
        **params: Any,
    ):
        """``{step: Result}`` of probe ``name`` over ``steps`` (all checkpoints by default), cached;
        a tqdm bar when ``progress``."""
        from dynascope.runner import TqdmProgress, sweep

        bar = TqdmProgress(name) if progress else None
        try:
            rows = sweep(
                self.run, name, steps, params=params, progress=bar, split=split, max_samples=max_samples,
                sample=sample, store=self.store, recompute=recompute, device=device,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        return {s: result for s, result, _ in rows}

    def trajectory(self, probe: str):  # -> pandas.DataFrame
        """The cached ``probe`` results over checkpoints as one tidy table (the widest setting:
        :func:`dynascope.trajectories.trajectory`): ``step, quantity, index, value``."""
        from dynascope.trajectories import trajectory

        return trajectory(self.store, probe).frame()

    def figure(self, probe: str):
        """The cached ``probe`` results with every checkpoint on the x axis (the widest setting;
        :meth:`dynascope.trajectories.Trajectory.figure`)."""
        from dynascope.trajectories import trajectory

        return trajectory(self.store, probe).figure()

    def model(self, step: int | None = None):
        """The model with the weights of checkpoint ``step`` (last if None)."""
        return self.run.load_model(step)

    def dataset(self):
        """The run's dataset (``.train`` / ``.test`` tensors)."""
        return self.run.load_dataset()

    def __repr__(self) -> str:
        steps = self.run.steps()
        span = f"{len(steps)} checkpoints ({steps[0]}–{steps[-1]})" if steps else "no checkpoints"
        model, data = self.run.model_config.get("name"), self.run.dataset_config.get("name")
        return f"<RunView {self.run.path} · {model} on {data} · {span}>"


def open_run(path: str | os.PathLike, *, trust: bool = False) -> RunView:
    """Open a run folder for analysis (``RunError`` if ``path`` is not one). Code its specs name (a model
    factory, a loss function) runs only once the folder is trusted: ``trust=True`` records that trust
    (``dynascope trust PATH`` shows the code first); else probes needing it raise ``UntrustedCodeError``."""
    from dynascope.runner import ingest_pending

    run = Run.open(path, trust=trust)
    ingest_pending(run)  # results a training recipe queued for the store (its trajectory views read them)
    return RunView(run)


__all__ = ["RunView", "open_run"]
