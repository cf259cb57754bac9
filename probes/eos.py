"""Edge-of-stability tracking: λ_max (top-k) of the training-loss Hessian at every checkpoint of a run.

For each checkpoint (step s) of a run folder: the top-k Hessian eigenvalues of the dataset-mean loss
by Lanczos, warm-started from the previous checkpoint's eigenvectors; the learning rate ``η_s`` from
the run's schedule (``run.lr_at(s)``), the full-batch GD threshold ``2/η_s`` and the ratio
``λ_max / (2/η_s)``; the training loss. Progressive sharpening shows as λ_max rising; the edge of
stability as λ_max hovering at 2/η (Cohen et al. 2021).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lanczos import eigsh
from .losses import Loss
from .operators import make_operator
from .results import Result, make_meta

_LOSS_KEYS = (("loss",), ("training", "loss"), ("recipe", "loss"), ("optimizer", "loss"))


def run_loss(run: Any) -> tuple[str | None, str | None]:
    """The training loss recorded in ``run.json`` (``loss``, ``training.loss``, ``recipe.loss`` or
    ``optimizer.loss``) and the key it came from; ``(None, None)`` when absent."""
    cfg = getattr(run, "config", {}) or {}
    for path in _LOSS_KEYS:
        node: Any = cfg
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str) and node:
            return node, ".".join(path)
        if isinstance(node, dict) and isinstance(node.get("name"), str):
            return node["name"], ".".join(path) + ".name"
    return None, None


@dataclass(frozen=True, kw_only=True)
class SharpnessTrack(Result):
    """λ_max per checkpoint against the learning-rate schedule.

    Per checkpoint ``i``: ``steps[i]``, ``lambda_max[i]``, ``top_k[i]`` (descending), ``converged[i]``,
    ``lr[i]`` (NaN when the run has no lr), ``two_over_lr[i]``, ``ratio[i] = λ_max/(2/η)``,
    ``train_loss[i]`` (the dataset-mean loss the curvature is of) and ``n_matvecs[i]``.
    """

    steps: list[int]
    lambda_max: list[float]
    top_k: list[list[float]]
    converged: list[bool]
    lr: list[float]
    two_over_lr: list[float]
    ratio: list[float]
    train_loss: list[float]
    n_matvecs: list[int]
    k: int
    loss: str
    run_path: str | None = None

    def to_frame(self):  # -> pandas.DataFrame
        """One row per checkpoint; columns ``lambda_1..lambda_k`` hold the top-k eigenvalues."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "step": self.steps,
                "lambda_max": self.lambda_max,
                "lr": self.lr,
                "two_over_lr": self.two_over_lr,
                "ratio": self.ratio,
                "train_loss": self.train_loss,
                "n_matvecs": self.n_matvecs,
                "converged": self.converged,
            }
        )
        for j in range(self.k):
            frame[f"lambda_{j + 1}"] = [v[j] if j < len(v) else float("nan") for v in self.top_k]
        return frame

    def figure(self):  # -> plotly.graph_objects.Figure
        """λ_max (and the other top-k) vs step with the 2/η line (left); training loss, log scale (right)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("sharpness vs 2/η", "training loss"))
        for j in range(1, self.k):
            fig.add_trace(
                go.Scatter(
                    x=self.steps,
                    y=[v[j] if j < len(v) else None for v in self.top_k],
                    mode="lines",
                    name=f"λ_{j + 1}",
                    line={"width": 1},
                    opacity=0.6,
                ),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(x=self.steps, y=self.lambda_max, mode="lines+markers", name="λ_max"), row=1, col=1
        )
        fig.add_trace(
            go.Scatter(x=self.steps, y=self.two_over_lr, mode="lines", name="2/η", line={"dash": "dash"}),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(x=self.steps, y=self.train_loss, mode="lines", name="train loss"), row=1, col=2
        )
        fig.update_xaxes(title_text="step")
        fig.update_yaxes(title_text="Hessian eigenvalue", row=1, col=1)
        fig.update_yaxes(title_text=f"{self.loss} (dataset mean)", type="log", row=1, col=2)
        fig.update_layout(title="Edge-of-stability tracker")
        return fig


def _open_run(run_or_path: Any) -> Any:
    from ..models.runs import Run

    if isinstance(run_or_path, Run):
        return run_or_path
    if isinstance(run_or_path, (str, os.PathLike)):
        return Run.open(run_or_path)
    raise TypeError(f"run_or_path must be a Run or a path to a run folder; got {type(run_or_path).__name__}")


def track_sharpness(
    run_or_path: Any,
    data: Any = None,
    *,
    k: int = 1,
    steps: Sequence[int] | None = None,
    loss: str | Callable | Loss | None = None,
    warm_start: bool = True,
    progress: bool = True,
    tol: float = 1e-4,
    max_iter: int | None = None,
    batch_size: int | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> SharpnessTrack:
    """Top-k Hessian eigenvalues at every checkpoint of a run (or at ``steps``), with 2/η from ``run.json``.

    ``data``: default the run's training set (``run.load_dataset().train``). ``loss``: default the loss
    recorded in ``run.json`` (see :func:`run_loss`), else ``"auto"``. ``warm_start``: start Lanczos
    from the previous checkpoint's top-k eigenvectors (their sum plus a small random part).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    started = time.perf_counter()
    run = _open_run(run_or_path)
    infos = run.checkpoints()
    if not infos:
        raise ValueError(f"run {run.path} has no checkpoints")
    if steps is not None:
        available = {c.step: c for c in infos}
        missing = [s for s in steps if s not in available]
        if missing:
            raise ValueError(
                f"run {run.path} has no checkpoints at steps {missing}; it has {sorted(available)}"
            )
        infos = [available[s] for s in sorted(set(steps))]
    loss_source = "argument"
    if loss is None:
        name, key = run_loss(run)
        loss, loss_source = (name, f"run.json:{key}") if name else ("auto", "default")
    if data is None:
        data = run.load_dataset().train
        data_source = "run training set"
    else:
        data_source = "argument"

    iterator: Any = infos
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(infos, desc="sharpness", unit="ckpt")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    out_steps, lam, topk, conv, lrs, thr, ratio, losses, mvs = [], [], [], [], [], [], [], [], []
    v0 = None
    loss_name = str(loss)
    for info in iterator:
        model = run.load_model(info.step)
        op = make_operator(
            model, data, loss=loss, batch_size=batch_size, mode=mode, dtype=dtype, device=device
        )
        loss_name = op.loss.name
        res = eigsh(op, k, tol=tol, v0=v0 if warm_start else None, seed=seed, max_iter=max_iter)
        if warm_start and res.vectors is not None:
            v0 = res.vectors
        try:
            lr = float(run.lr_at(info.step))
        except ValueError:  # RunError: no lr recorded
            lr = float("nan")
        two = 2.0 / lr if lr == lr and lr > 0 else float("nan")
        out_steps.append(info.step)
        lam.append(float(res.values[0]))
        topk.append([float(v) for v in res.values])
        conv.append(bool(res.converged.all()))
        lrs.append(lr)
        thr.append(two)
        ratio.append(float(res.values[0]) / two if two == two else float("nan"))
        losses.append(op.loss_value())
        mvs.append(res.n_matvecs)
    meta = make_meta(
        "track_sharpness",
        params={
            "k": k,
            "tol": tol,
            "loss": loss_name,
            "loss_source": loss_source,
            "warm_start": warm_start,
            "steps": list(steps) if steps is not None else None,
            "batch_size": batch_size,
            "seed": seed,
        },
        started=started,
        run=str(run.path),
        data=data_source,
        mode=mode,
        reduction="mean over the whole dataset (batches weighted by sample count)",
        n_matvecs=int(sum(mvs)),
        lr_source="run.lr_at(step)",
    )
    return SharpnessTrack(
        steps=out_steps,
        lambda_max=lam,
        top_k=topk,
        converged=conv,
        lr=lrs,
        two_over_lr=thr,
        ratio=ratio,
        train_loss=losses,
        n_matvecs=mvs,
        k=k,
        loss=loss_name,
        run_path=str(run.path),
        meta=meta,
    )


__all__ = ["SharpnessTrack", "run_loss", "track_sharpness"]
