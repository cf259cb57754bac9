"""Learning-rate transfer across widths (Yang & Hu 2021, μP; Noci et al. 2024, "Why do learning rates
transfer?").

Setup: ``n_train = 256`` scikit-learn digits (seeded shuffle, pixels /16 minus their training mean,
one-hot targets), bias-free ReLU MLPs ``64 → n → n → 10`` (``depth = 2``) of widths
``n ∈ {64, 128, 256, 512, 1024}`` in the ``parametrization`` ``"sp"``, ``"ntk"`` or ``"mup"`` of
:class:`dynascope.models.ParametrizedMLP` (base width ``n₀ = 64``; the exact init, multipliers and
learning-rate scale are stated there), loss ``L = mean over samples and outputs of (f − y)²``
(``"mse"``), ``steps = 100`` full-batch GD steps with the SGD rate ``η · lr_scale`` on the stored weights
(``lr_scale`` = 1 for SP, ``n₀`` for NTK, ``n`` for μP). ``η`` runs over the grid ``lrs`` (powers of 2);
at ``n = n₀`` the three parametrisations are one and the same training run.

Per (width, η) job: the final train loss (``inf`` when the loss became non-finite or exceeded
``divergence_loss``; the job then stops), test loss and accuracy → ``lr_sweep.csv``. At the
``reference_lr`` each width's trajectory is logged every ``log_every`` steps to ``metrics.csv`` (long
form: one row per (width, step)) with the sharpness in η units,
``sharpness = lr_scale · λ_max(∇²_W L)`` (``λ_max`` of the Hessian with respect to the stored weights by
Lanczos, warm-started from the previous top eigenvector; GD is stable while ``η · sharpness < 2``, so
``two_over_lr = 2/η`` is the edge of stability for every width and parametrisation). The final model
of the widest network at the reference rate is the run's one checkpoint.

Measured (seeds 0, 1, 2; 35–95 s per parametrisation on 1 thread of a shared 2-core machine, width 1024
~60 % of it): under μP the best η is 16 for every width on every seed and the widths' sharpness agrees within
×1.17 / ×1.40 / ×1.25 after step 10; under SP the best η falls with width (16 → 8, 16 → 8, 16 → 4) and
λ_max at init grows ×10 from width 64 to 1024; under NTK it rises (16 → 32) and the narrow nets sharpen while
the wide ones stay lazy (spread ×1.8–2.2). See :func:`dynascope.recipes.detect_lr_transfer`.

Resumable at the job level: a job is done once its row is in ``lr_sweep.csv`` (the reference job's
trajectory rows are written just before it); an interrupted job is recomputed from its seeded
initialisation, so a resumed run equals an uninterrupted one. The model seed is the run's seed for
every job: all learning rates of one width start from the same weights.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets import load
from ..models import Run, RunError, build
from ..models.architectures import PARAMETRIZATIONS
from ..models.atomic import atomic_write_text
from ..probes.losses import resolve_loss
from .base import Recipe, recipe_function, register_recipe
from .eos import lambda_max

__all__ = [
    "lr_transfer",
    "LR_TRANSFER_CONFIG",
    "LR_TRANSFER_SMALL",
    "SWEEP_FILE",
    "SWEEP_COLUMNS",
    "read_lr_sweep",
]

LR_TRANSFER_CONFIG: dict[str, Any] = {
    "parametrization": "mup",
    "widths": [64, 128, 256, 512, 1024],
    "base_width": 64,
    "depth": 2,
    "n_train": 256,
    "lrs": [2.0**k for k in range(7)],
    "reference_lr": 4.0,
    "steps": 100,
    "log_every": 10,
    "divergence_loss": 10.0,
    "lanczos_tol": 1e-3,
    "device": "cpu",
}
#: CI variant: three narrow widths, four rates, 20 steps (seconds).
LR_TRANSFER_SMALL: dict[str, Any] = {
    "widths": [16, 32, 64],
    "base_width": 16,
    "n_train": 64,
    "lrs": [1.0, 2.0, 4.0, 8.0],
    "steps": 20,
    "log_every": 5,
}

SWEEP_FILE = "lr_sweep.csv"
SWEEP_COLUMNS = (
    "width",
    "lr",
    "log2_lr",
    "lr_effective",
    "final_train_loss",
    "final_test_loss",
    "final_test_acc",
    "diverged",
    "steps_run",
    "wall_time",
)


def _check(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validated, normalised config (widths and rates sorted, ``reference_lr`` on the grid)."""
    if cfg["parametrization"] not in PARAMETRIZATIONS:
        raise ValueError(
            f"lr_transfer: parametrization must be one of {PARAMETRIZATIONS}, got {cfg['parametrization']!r}"
        )
    for key in ("widths", "lrs"):
        v = cfg[key]
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"lr_transfer: {key} must be a non-empty list, got {v!r}")
    widths = sorted({int(w) for w in cfg["widths"]})
    if widths[0] < 1:
        raise ValueError(f"lr_transfer: widths must be positive ints, got {cfg['widths']!r}")
    lrs = sorted({float(x) for x in cfg["lrs"]})
    if not all(math.isfinite(x) and x > 0 for x in lrs):
        raise ValueError(f"lr_transfer: lrs must be positive finite numbers, got {cfg['lrs']!r}")
    ref = float(cfg["reference_lr"])
    if ref not in lrs:
        raise ValueError(f"lr_transfer: reference_lr {ref:g} must be one of the grid's lrs {lrs}")
    for key in ("steps", "log_every", "depth", "n_train", "base_width"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"lr_transfer: {key} must be a positive int, got {cfg[key]!r}")
    return {**cfg, "widths": widths, "lrs": lrs, "reference_lr": ref}


def _model_spec(cfg: dict[str, Any], width: int, seed: int) -> dict[str, Any]:
    return {
        "name": "parametrized_mlp",
        "in_dim": 64,
        "width": width,
        "depth": int(cfg["depth"]),
        "out_dim": 10,
        "parametrization": cfg["parametrization"],
        "base_width": int(cfg["base_width"]),
        "seed": seed,
    }


def read_lr_sweep(run: Run | str | os.PathLike[str]) -> Any:
    """``lr_sweep.csv`` of an ``lr_transfer`` run as a DataFrame (columns ``SWEEP_COLUMNS``; diverged
    jobs have ``final_train_loss = inf``); ``RunError`` when the file is missing."""
    import pandas as pd

    r = run if isinstance(run, Run) else Run.open(run)
    path = r.path / SWEEP_FILE
    if not path.is_file():
        raise RunError(r.path, f"has no {SWEEP_FILE} (not an lr_transfer run, or no job finished yet)")
    df = pd.read_csv(path)
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise RunError(r.path, f"{SWEEP_FILE} lacks column(s) {missing}")
    return df


def _append_sweep_row(path: Path, row: dict[str, Any]) -> None:
    """Append one job's row (header first); rewritten atomically so a crash leaves whole rows."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not old:
        w.writerow(SWEEP_COLUMNS)
    w.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in SWEEP_COLUMNS])
    atomic_write_text(path, old + buf.getvalue())


def _done_jobs(path: Path) -> set[tuple[int, float]]:
    if not path.is_file():
        return set()
    with open(path, encoding="utf-8", newline="") as f:
        return {(int(r["width"]), float(r["lr"])) for r in csv.DictReader(f)}


def _drop_metrics_of_width(run: Run, width: int) -> None:
    """Forget trajectory rows of an unfinished reference job (they are recomputed)."""
    df = run.metrics()
    if "width" not in df.columns or not (df["width"] == width).any():
        return
    keep = df[df["width"] != width]
    atomic_write_text(run.metrics_path, keep.to_csv(index=False, lineterminator="\n"))


def _prepare(out: Any, cfg: dict[str, Any], seed: int, overwrite: bool, resume: bool) -> Run | None:
    """The existing run to continue (same recipe, config and seed, ``resume``), else ``None``."""
    path = Path(os.fspath(out))
    if overwrite or not (path / "run.json").is_file():
        return None
    run = Run.open(path)
    extra = run.config.get("extra") or {}
    if extra.get("recipe") != "lr_transfer":
        raise RunError(path, "already holds another run; pass overwrite=True to replace it")
    if not resume:
        return None
    if extra.get("config") != json.loads(json.dumps(cfg)) or run.seed != seed:
        raise RunError(
            path,
            "holds an lr_transfer run with another config or seed; pass overwrite=True to replace it "
            "or resume=True with the same config",
        )
    return run


def _train_job(
    model: nn.Module,
    data: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    cfg: dict[str, Any],
    trajectory: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Full-batch GD for ``steps`` steps; the final row and (``trajectory``) the logged rows with λ_max."""
    loss_fn = resolve_loss("mse")
    (x, y), (xt, yt) = data
    scale = float(model.lr_scale)
    opt = torch.optim.SGD(model.parameters(), lr=lr * scale)
    steps, every, cap = int(cfg["steps"]), int(cfg["log_every"]), float(cfg["divergence_loss"])
    rows: list[dict[str, Any]] = []
    v0: torch.Tensor | None = None
    diverged, s = False, 0

    def log(step: int, train_loss: float) -> None:
        nonlocal v0
        lam, vec, conv = lambda_max(model, (x, y), loss="mse", tol=float(cfg["lanczos_tol"]), v0=v0)
        if vec is not None and torch.isfinite(vec).all():
            v0 = vec
        rows.append(
            {
                "step": step,
                "width": int(model.width),
                "train_loss": train_loss,
                "lambda_max": lam,
                "sharpness": lam * scale,
                "two_over_lr": 2.0 / lr,
                "sharpness_ratio": lam * scale * lr / 2.0,
                "sharpness_converged": conv,
                "lr": lr,
            }
        )

    for s in range(steps + 1):
        loss = loss_fn.total(model(x), y) / x.shape[0]
        value = float(loss.detach())
        if not math.isfinite(value) or value > cap:
            diverged = True
            break
        if trajectory and (s % every == 0 or s == steps):
            log(s, value)
        if s == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out_t = model(xt)
        test_loss = float(loss_fn.total(out_t, yt)) / xt.shape[0]
        test_acc = float((out_t.argmax(1) == yt.argmax(1)).double().mean())
    final = {
        "final_train_loss": math.inf if diverged else value,
        "final_test_loss": test_loss if math.isfinite(test_loss) and not diverged else math.inf,
        "final_test_acc": test_acc if not diverged else math.nan,
        "diverged": diverged,
        "steps_run": s,
    }
    return final, rows


@recipe_function("lr_transfer", LR_TRANSFER_CONFIG)
def lr_transfer(
    out: str | os.PathLike[str], cfg: dict[str, Any], seed: int, progress: Any, overwrite: bool, resume: bool
) -> Run:
    """Learning-rate × width sweep in one parametrisation into run folder ``out`` (keys:
    ``LR_TRANSFER_CONFIG``); see the module docstring for what is written."""
    cfg = _check(cfg)
    dcfg = {
        "name": "digits",
        "n_train": int(cfg["n_train"]),
        "shuffle": True,
        "normalize": "center",
        "targets": "onehot",
        "seed": seed,
    }
    run = _prepare(out, cfg, seed, overwrite, resume)
    if run is None:
        run = Run.create(
            out,
            model=_model_spec(cfg, cfg["widths"][-1], seed),
            dataset=dcfg,
            optimizer={"name": "sgd", "lr": cfg["reference_lr"]},
            loss="mse",
            seed=seed,
            overwrite=overwrite or (Path(os.fspath(out)) / "run.json").is_file(),
            extra={
                "recipe": "lr_transfer",
                "phenomenon": "lr_transfer",
                "config": cfg,
                "parametrization": cfg["parametrization"],
                "sweep_variable": "width",
                "note": "lr_sweep.csv: final train loss per (width, lr); metrics.csv: one row per "
                "(width, step) at reference_lr with sharpness = lr_scale·λ_max (η units)",
            },
            notes=f"Learning-rate transfer across widths, {cfg['parametrization']} parametrisation.",
        )
        (run.path / SWEEP_FILE).unlink(missing_ok=True)
    device = torch.device(cfg["device"])
    ds = load(**dcfg)
    data = tuple(tuple(t.to(device) for t in pair) for pair in (ds.train, ds.test))
    sweep_path = run.path / SWEEP_FILE
    done = _done_jobs(sweep_path)
    jobs = [(w, lr) for w in cfg["widths"] for lr in cfg["lrs"]]
    from .train import _Progress

    bar = _Progress(progress, len(jobs), len(done & set(jobs)), "lr_transfer")
    for i, (width, lr) in enumerate(jobs):
        if (width, lr) in done:
            continue
        is_ref = lr == cfg["reference_lr"]
        if is_ref:
            _drop_metrics_of_width(run, width)
        model = build(**_model_spec(cfg, width, seed)).to(device)
        tj = time.perf_counter()
        final, rows = _train_job(model, data, lr, cfg, trajectory=is_ref)
        if rows:
            run.log_metrics(rows)
        if is_ref and width == cfg["widths"][-1] and not final["diverged"]:
            run.save_checkpoint(
                model, step=int(cfg["steps"]), metrics={"train_loss": final["final_train_loss"]}
            )
        row = {
            "width": width,
            "lr": lr,
            "log2_lr": math.log2(lr),
            "lr_effective": lr * float(model.lr_scale),
            **final,
            "wall_time": time.perf_counter() - tj,
        }
        _append_sweep_row(sweep_path, row)
        bar.update(i + 1, {"train_loss": final["final_train_loss"]})
    bar.close()
    return run


register_recipe(
    Recipe(
        name="lr_transfer",
        phenomenon="lr_transfer",
        description="Bias-free ReLU MLPs 64-n-n-10 (n = 64…1024) on 256 digits, MSE, 100 full-batch GD steps "
        "over η ∈ 2^0…2^6, in parametrization sp | ntk | mup (base width 64): under μP the best η is the "
        "same grid point for every width and the sharpness trajectories agree; under SP/NTK it shifts.",
        fn=lr_transfer,
        config=LR_TRANSFER_CONFIG,
        small=LR_TRANSFER_SMALL,
    )
)
