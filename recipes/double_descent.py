"""Model-wise double descent: test error peaks where the model can just interpolate the noisy training set.

``double_descent`` (random features, Belkin et al. 2019; Advani & Saxe 2020): n = 300 digits
(seeded shuffle, pixels /16 minus their training mean, so that no ReLU feature is dead) with 20 % of
the training labels re-drawn uniformly at random, one-hot targets Y ∈ R^{n×10}; features
Φ = ReLU(X Wᵀ), W ∈ R^{p×64} with entries N(0, 1/64) (the ``random_features`` model); readout
A = Φ⁺ Y, the minimum-norm least-squares solution (pseudo-inverse via an SVD in float64, singular
values below σ_max·max(n, p)·eps dropped). At p = n the square system is interpolated exactly with
the smallest singular value of Φ near 0, so ‖A‖ and the test error blow up; for p ≫ n the
minimum-norm interpolant is smooth again.

Per p, over ``trials`` independent draws of W: ``test_mse`` = mean over test samples and outputs of
(f − y)² (averaged over trials; ``test_mse_std`` their standard deviation), ``train_mse``,
``test_error`` (1 − accuracy against the clean test labels), ``cond`` (geometric mean over trials of
σ_max/σ_min over the min(n, p) singular values of Φ), ``weight_norm`` (‖A‖_F). Each p is a checkpoint
of the sweep run at ``step = p`` holding the first trial's model (its own ``model_config`` in the
checkpoint metadata).

``double_descent_nn`` (Nakkiran et al. 2020; "Understanding the role of optimization in double
descent", Liu & Flanigan 2023): two-layer ReLU networks of width h trained by full-batch Adam on the
same noisy data (MSE); the peak is weaker and sits near h·(64 + 1 + 10) + 10 ≈ n·10 parameters.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch

from ..datasets import load
from ..models import Run, RunError, build, save_checkpoint
from .base import Recipe, recipe_function, register_recipe
from .train import _accuracy, make_optimizer

__all__ = [
    "double_descent",
    "double_descent_nn",
    "min_norm_fit",
    "DD_CONFIG",
    "DD_SMALL",
    "DD_NN_CONFIG",
    "DD_NN_SMALL",
    "default_p_grid",
]


def default_p_grid(n: int, *, dense: bool = True) -> list[int]:
    """Feature counts from n/30 to 10n, log-spaced, with extra points within ±20 % of n (always n itself)."""
    base = torch.logspace(math.log10(max(n / 30, 2)), math.log10(10 * n), 14 if dense else 9).tolist()
    near = [0.8, 0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1, 1.2] if dense else [0.9, 0.97, 1.0, 1.03, 1.1]
    return sorted({int(round(b)) for b in base} | {int(round(f * n)) for f in near} | {n // 2, 10 * n})


DD_CONFIG: dict[str, Any] = {
    "n_train": 300,
    "label_noise": 0.2,
    "normalize": "center",
    "p_grid": None,  # None: default_p_grid(n_train)
    "trials": 5,
    "activation": "relu",
}
DD_SMALL: dict[str, Any] = {"trials": 3, "p_grid": "coarse"}


def min_norm_fit(phi: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Minimum-norm least-squares readout A = Φ⁺ Y (float64 SVD) and cond(Φ) = σ_max / σ_min(n, p)."""
    phi, y = phi.double(), y.double()
    u, s, vh = torch.linalg.svd(phi, full_matrices=False)
    cond = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    cut = s[0] * max(phi.shape) * torch.finfo(torch.float64).eps
    inv = torch.where(s > cut, 1.0 / s, torch.zeros_like(s))
    a = vh.T @ (inv[:, None] * (u.T @ y))
    return a, cond


def _digits(cfg: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    dcfg = {
        "name": "digits",
        "n_train": int(cfg["n_train"]),
        "shuffle": True,
        "label_noise": float(cfg["label_noise"]),
        "normalize": cfg["normalize"],
        "targets": "onehot",
        "seed": seed,
    }
    return load(**dcfg), dcfg


def _p_grid(cfg: dict[str, Any]) -> list[int]:
    n = int(cfg["n_train"])
    g = cfg["p_grid"]
    if g is None or g == "dense":
        return default_p_grid(n)
    if g == "coarse":
        return default_p_grid(n, dense=False)
    if not isinstance(g, (list, tuple)) or not g or any(int(p) < 1 for p in g):
        raise ValueError(f"p_grid must be None, 'coarse' or a list of positive ints, got {g!r}")
    return sorted({int(p) for p in g})


def _prepare(
    out: Any, overwrite: bool, resume: bool, recipe: str, cfg: dict[str, Any], seed: int
) -> tuple[Run | None, bool]:
    """``(finished run, None)`` when resuming a complete sweep at ``out``; else ``(None, replace)`` where
    ``replace`` allows ``Run.create`` to replace an existing folder (``overwrite``, or an unfinished run of
    the same recipe, config and seed when ``resume``: a sweep restarts from scratch, it is cheap). Any
    other run at ``out`` is refused (``RunError``) without ``overwrite``."""
    path = os.fspath(out)
    if overwrite or not os.path.isfile(os.path.join(path, "run.json")):
        return None, overwrite
    run = Run.open(path)
    extra = run.config.get("extra") or {}
    stored = extra.get("config") or {}
    same = (
        extra.get("recipe") == recipe
        and run.seed == seed
        and all(
            json.dumps(stored.get(k)) == json.dumps(v)
            for k, v in cfg.items()
            if k not in ("p_grid", "widths")
        )
    )
    if not (resume and same):
        why = "resume=False" if same else "it holds another run (recipe, config or seed differ)"
        raise RunError(path, f"{why}; nothing was changed. Pass overwrite=True (--overwrite) to replace it")
    return (run, False) if extra.get("complete") else (None, True)


def _finish(run: Run) -> None:
    run.config = {**run.config, "extra": {**run.config.get("extra", {}), "complete": True}}
    run.save_config()


@recipe_function("double_descent", DD_CONFIG)
def double_descent(
    out: str | os.PathLike[str], cfg: dict[str, Any], seed: int, progress: Any, overwrite: bool, resume: bool
) -> Run:
    """Random-features min-norm least-squares sweep over p into run folder ``out`` (keys: ``DD_CONFIG``)."""
    done, replace = _prepare(out, overwrite, resume, "double_descent", cfg, seed)
    if done is not None:
        return done
    data, dcfg = _digits(cfg, seed)
    grid = _p_grid(cfg)
    n, trials = int(cfg["n_train"]), int(cfg["trials"])
    (x, y), (xt, yt) = data.train, data.test
    x, y, xt, yt = x.double(), y.double(), xt.double(), yt.double()
    mid = n  # the run's nominal model is the one at the interpolation threshold
    run = Run.create(
        out,
        model={
            "name": "random_features",
            "in_dim": 64,
            "n_features": mid,
            "out_dim": 10,
            "activation": cfg["activation"],
            "seed": seed,
        },
        dataset=dcfg,
        optimizer={"name": "min_norm_least_squares"},
        loss="mse",
        seed=seed,
        overwrite=replace,
        extra={
            "recipe": "double_descent",
            "phenomenon": "double_descent",
            "config": {**cfg, "p_grid": grid},
            "sweep_variable": "n_features",
            "interpolation_threshold": n,
            "note": "step = number of random features p; one checkpoint per p (first trial)",
        },
        notes="Double descent: random ReLU features, minimum-norm least squares, 20% label noise.",
    )
    bar = _bar(progress, len(grid), "double_descent")
    t0 = time.perf_counter()
    for i, p in enumerate(grid):
        tm, trm, te, conds, norms = [], [], [], [], []
        first = None
        for t in range(trials):
            model = build(
                "random_features",
                in_dim=64,
                n_features=p,
                out_dim=10,
                activation=cfg["activation"],
                seed=seed * 1000 + t,
            )
            w = model.feature_weight.double()
            act = model.act
            phi, phit = act(x @ w.T), act(xt @ w.T)
            a, cond = min_norm_fit(phi, y)
            pred, predt = phi @ a, phit @ a
            trm.append(float(((pred - y) ** 2).mean()))
            tm.append(float(((predt - yt) ** 2).mean()))
            te.append(1.0 - (_accuracy(predt, yt) or 0.0))
            conds.append(cond)
            norms.append(float(a.norm()))
            if first is None:
                with torch.no_grad():
                    model.head.weight.copy_(a.T.float())
                first = model
        tmt = torch.tensor(tm)
        row = {
            "step": p,
            "n_features": p,
            "n_params": p * 10,
            "test_mse": float(tmt.mean()),
            "test_mse_std": float(tmt.std()) if trials > 1 else 0.0,
            "train_mse": sum(trm) / trials,
            "test_error": sum(te) / trials,
            "cond": math.exp(sum(math.log(c) for c in conds) / trials)
            if all(map(math.isfinite, conds))
            else math.inf,
            "weight_norm": sum(norms) / trials,
            "trials": trials,
            "wall_time": time.perf_counter() - t0,
        }
        row.update(train_loss=row["train_mse"], test_loss=row["test_mse"], test_acc=1 - row["test_error"])
        run.log_metrics(row)
        _save_sweep_checkpoint(run, first, p, row)
        bar.update(i + 1, row)
    bar.close()
    _finish(run)
    return run


def _save_sweep_checkpoint(run: Run, model: torch.nn.Module, step: int, row: dict[str, Any]) -> None:
    """A checkpoint whose metadata carries its own model config (the sweep's models differ in size)."""
    from ..models import model_config

    meta = {
        "step": step,
        "epoch": None,
        "model_config": model_config(model),
        "metrics": {k: v for k, v in row.items() if k != "step"},
    }
    save_checkpoint(model, run.checkpoint_path(step), metadata=meta)


class _bar:
    def __init__(self, progress: Any, total: int, desc: str) -> None:
        from .train import _Progress

        self.p = _Progress(progress, total, 0, desc)

    def update(self, i: int, row: dict[str, Any]) -> None:
        self.p.update(i, row)

    def close(self) -> None:
        self.p.close()


# ----------------------------------------------------------------------------- trained networks
DD_NN_CONFIG: dict[str, Any] = {
    "n_train": 300,
    "label_noise": 0.2,
    "normalize": "scale",
    "widths": [2, 4, 8, 16, 24, 32, 36, 40, 44, 48, 64, 96, 128, 256, 512],
    "steps": 4000,
    "lr": 3e-3,
    "optimizer": "adam",
}
DD_NN_SMALL: dict[str, Any] = {"widths": [4, 16, 32, 40, 48, 64, 128, 256], "steps": 1500}


@recipe_function("double_descent_nn", DD_NN_CONFIG)
def double_descent_nn(
    out: str | os.PathLike[str], cfg: dict[str, Any], seed: int, progress: Any, overwrite: bool, resume: bool
) -> Run:
    """Width sweep of two-layer ReLU nets trained to (near) interpolation; keys: ``DD_NN_CONFIG``."""
    done, replace = _prepare(out, overwrite, resume, "double_descent_nn", cfg, seed)
    if done is not None:
        return done
    data, dcfg = _digits(cfg, seed)
    widths = sorted({int(w) for w in cfg["widths"]})
    n, k = int(cfg["n_train"]), 10
    h_star = (n * k - k) / (64 + 1 + k)  # width with as many parameters as fitted numbers n·K
    (x, y), (xt, yt) = data.train, data.test
    run = Run.create(
        out,
        model={
            "name": "mlp",
            "in_dim": 64,
            "width": max(1, round(h_star)),
            "depth": 1,
            "out_dim": 10,
            "seed": seed,
        },
        dataset=dcfg,
        optimizer={"name": cfg["optimizer"], "lr": float(cfg["lr"])},
        loss="mse",
        seed=seed,
        overwrite=replace,
        extra={
            "recipe": "double_descent_nn",
            "phenomenon": "double_descent",
            "config": {**cfg, "widths": widths},
            "sweep_variable": "width",
            "interpolation_threshold": h_star,
            "note": "step = hidden width h; one checkpoint per width, each trained from scratch",
        },
        notes="Double descent (trained networks): two-layer ReLU width sweep, full-batch Adam, label noise.",
    )
    mse = torch.nn.functional.mse_loss
    bar = _bar(progress, len(widths), "double_descent_nn")
    t0 = time.perf_counter()
    for i, h in enumerate(widths):
        model = build("mlp", in_dim=64, width=h, depth=1, out_dim=10, seed=seed)
        opt = make_optimizer({"name": cfg["optimizer"], "lr": float(cfg["lr"])}, model.parameters())
        for _ in range(int(cfg["steps"])):
            opt.zero_grad(set_to_none=True)
            loss = mse(model(x), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out_tr, out_te = model(x), model(xt)
        n_params = sum(p.numel() for p in model.parameters())
        row = {
            "step": h,
            "width": h,
            "n_params": n_params,
            "train_mse": float(mse(out_tr, y)),
            "test_mse": float(mse(out_te, yt)),
            "train_error": 1 - (_accuracy(out_tr, y) or 0.0),
            "test_error": 1 - (_accuracy(out_te, yt) or 0.0),
            "weight_norm": math.sqrt(
                sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
            ),
            "wall_time": time.perf_counter() - t0,
        }
        row.update(train_loss=row["train_mse"], test_loss=row["test_mse"], test_acc=1 - row["test_error"])
        run.log_metrics(row)
        _save_sweep_checkpoint(run, model, h, row)
        bar.update(i + 1, row)
    bar.close()
    _finish(run)
    return run


register_recipe(
    Recipe(
        name="double_descent",
        phenomenon="double_descent",
        description="Random ReLU features + minimum-norm least squares on 300 digits with 20% label noise, "
        "p swept from 10 to 3000: test MSE peaks sharply at p = n = 300 (interpolation threshold).",
        fn=double_descent,
        config=DD_CONFIG,
        small=DD_SMALL,
    )
)
register_recipe(
    Recipe(
        name="double_descent_nn",
        phenomenon="double_descent",
        description="Two-layer ReLU nets of width 2-512 trained by full-batch Adam on 300 noisy digits: "
        "a weaker test-MSE bump near width·75 ≈ n·10 parameters.",
        fn=double_descent_nn,
        config=DD_NN_CONFIG,
        small=DD_NN_SMALL,
    )
)
