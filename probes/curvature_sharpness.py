"""Curvature sharpness of the training loss: λ_max, trace, stability thresholds, preconditioned and batch
sharpness at one point, and λ_max over the checkpoints of a run (edge-of-stability tracking).

All curvature is that of the dataset-mean loss ``L(θ) = (1/N) Σ_i ℓ_i`` (see
:mod:`dynascope.probes.losses`; use ``loss="half_sse"`` for the ½‖f − y‖² convention of the
edge-of-stability papers).

* ``λ_max(H)`` by Lanczos (:func:`~dynascope.probes.lanczos.eigsh`, residual-based convergence,
  warm-startable with ``v0=`` previous eigenvectors) and ``tr(H)`` by Hutch++
  (:func:`~dynascope.probes.trace.estimate_trace` on the same operator).
* Stability of full-batch GD on the local quadratic: ``λ_max ≤ 2/η`` (``gd_stable``); the linear-stability
  check used for SGD, ``tr(H) ≤ 2/η`` (``sgd_trace_stable``); ``ratio = λ_max / (2/η)``.
* Preconditioned sharpness ``λ_max(P⁻¹H)`` of Adam/RMSProp/Adagrad/momentum-SGD state against its own
  threshold (Cohen et al. 2022; see :mod:`dynascope.probes.preconditioning`).
* Batch sharpness: the mean over ``n_batches`` disjoint random mini-batches B of size b of
  ``λ_max(H_B)``, ``H_B`` the Hessian of the batch-mean loss. Since λ_max is convex and the mean of
  ``H_B`` over a partition of the data is H, the mean over a full partition is ≥ λ_max(H).
  Also reported: the directional form ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` (``batch_directional_sharpness``,
  the "batch sharpness" of Andreyev & Beneventano 2024, "Edge of stochastic stability").
* The trajectory over checkpoints (:func:`track_sharpness`): the top-k eigenvalues at every checkpoint of a
  run, warm-started from the previous checkpoint's eigenvectors; the learning rate ``η_s`` from the run's
  schedule (``run.lr_at(s)``), ``2/η_s`` and ``λ_max / (2/η_s)``; the training loss. Progressive
  sharpening shows as λ_max rising; the edge of stability as λ_max hovering at 2/η (Cohen et al. 2021).

Loss-perturbation sharpness (ASAM, average case) lives in :mod:`dynascope.probes.perturbation`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..datasets.batching import as_batches, slice_inputs
from .curvature_setup import spec_settings, takes_operator_spec
from .lanczos import eigsh
from .losses import Loss
from .operators import OperatorSpec
from .preconditioning import DiagonalScaledOperator, preconditioner_from_state
from .results import Result, make_meta, to_jsonable, train_randomness
from .seeds import BATCH_PERMUTATION_OFFSET
from .trajectory import checkpoint_models
from .validation import check_float, check_int


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True, kw_only=True)
class SharpnessResult(Result):
    """Sharpness of the training loss at one point (see :mod:`dynascope.probes.curvature_sharpness`).

    Threshold fields are ``None`` when no learning rate is known (or it is 0); preconditioned fields are
    ``None``
    without optimizer state; batch fields are ``None`` without ``batch_size_for_batch_sharpness``.
    ``eigenvectors`` ([P, k], for warm starts) is left out of ``to_dict``.
    """

    lambda_max: float
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    trace: float | None
    trace_stderr: float | None
    loss_value: float
    lr: float | None
    two_over_lr: float | None
    ratio: float | None
    gd_stable: bool | None
    sgd_trace_stable: bool | None
    n_matvecs: int
    preconditioned_lambda_max: float | None = None
    preconditioned_threshold: float | None = None
    preconditioned_ratio: float | None = None
    preconditioned_stable: bool | None = None
    optimizer: str | None = None
    batch_size: int | None = None
    batch_lambdas: list[float] | None = None
    batch_sharpness: float | None = None
    batch_sharpness_stderr: float | None = None
    batch_directional: list[float] | None = None
    batch_directional_sharpness: float | None = None
    eigenvectors: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        # every field but the [P, k] vectors, which would be converted to JSON only to be dropped
        d = {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self) if f.name != "eigenvectors"}
        ev = self.eigenvectors  # a tensor, or the {"shape"} stub a cached result comes back with
        d["eigenvectors"] = {"shape": list(ev.shape)} if isinstance(ev, torch.Tensor) else ev
        return d

    def summary(self) -> dict[str, Any]:
        """The scalar fields only (one row of :meth:`to_frame`)."""
        d = self.to_dict()
        return {k: v for k, v in d.items() if k != "meta" and not isinstance(v, (list, dict))}

    def to_frame(self):  # -> pandas.DataFrame
        """One row per computed eigenvalue (``rank`` 1..k) with the scalar fields repeated."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "rank": list(range(1, len(self.eigenvalues) + 1)),
                "eigenvalue": self.eigenvalues,
                "residual": self.residuals,
                "eigen_converged": self.converged,
            }
        )
        for k, v in self.summary().items():
            frame[k] = v
        return frame


# ---------------------------------------------------------------------------------------------- helpers
def _mean_sem(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    sem = float(t.std(unbiased=True)) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return float(t.mean()), sem


def _batch_sharpness(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int,
    n_batches: int,
    seed: int,
    tol: float,
    v0: torch.Tensor | None,
    spec: OperatorSpec,
    max_iter: int | None,
) -> tuple[list[float], list[float], int]:
    """λ_max(H_B) and g_Bᵀ H_B g_B/‖g_B‖² over disjoint random mini-batches (seeded permutations; the
    Lanczos run on batch ``i`` starts from ``seed + i``)."""
    x, y = as_batches(data).tensors()
    n = y.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size_for_batch_sharpness must be between 1 and {n}; got {batch_size}")
    gen = torch.Generator().manual_seed(seed + BATCH_PERMUTATION_OFFSET)
    order = torch.empty(0, dtype=torch.long)
    lambdas, directional, matvecs = [], [], 0
    per_perm = n // batch_size
    for i in range(n_batches):
        if i % per_perm == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(i % per_perm) * batch_size : (i % per_perm + 1) * batch_size].to(y.device)
        op = spec.build(model, (slice_inputs(x, idx), y[idx]))
        out = eigsh(op, 1, tol=tol, v0=v0, seed=seed + i, max_iter=max_iter)
        lambdas.append(float(out.values[0]))
        g = op.gradient()
        gn = float(g.norm())
        directional.append(float(g @ op.matvec(g)) / gn**2 if gn > 0 else float("nan"))
        matvecs += op.n_matvecs
    return lambdas, directional, matvecs


def _trace(op: Any, n_matvecs: int, seed: int) -> tuple[float, float, int]:
    """``tr(H)`` by Hutch++ on the same operator (:func:`~dynascope.probes.trace.estimate_trace`):
    ``(estimate, stderr, products used)``."""
    from .trace import estimate_trace

    before = op.n_matvecs
    value, stderr, _, _ = estimate_trace(op, n_matvecs, method="hutch++", seed=seed)
    return value, stderr, op.n_matvecs - before


def _preconditioned(
    op: Any,
    state: Any,
    *,
    lr: float | None,
    optimizer: str | None,
    tol: float,
    seed: int,
    max_iter: int | None,
) -> tuple[dict[str, Any], dict[str, Any], float | None, int]:
    """Preconditioned sharpness ``λ_max(P⁻¹H)`` (the symmetric ``P^{-1/2} H P^{-1/2}``) of the optimizer
    state against its threshold (``2/η`` times the optimizer's factor, Cohen et al. 2022). Returns the
    result's fields, their ``meta`` block, the learning rate (the state's when ``lr`` is None) and the
    products used."""
    P = preconditioner_from_state(state, op.space, model=op.model, lr=lr, optimizer=optimizer)
    lr = P.lr if lr is None else lr
    sop = DiagonalScaledOperator(op, P.diag.rsqrt())
    out = eigsh(sop, 1, tol=tol, seed=seed, max_iter=max_iter)
    lam, thr = float(out.values[0]), P.threshold(lr)
    fields = {
        "preconditioned_lambda_max": lam,
        "preconditioned_threshold": thr,
        "preconditioned_ratio": lam / thr if thr == thr else float("nan"),
        "preconditioned_stable": lam <= thr if thr == thr else None,
        "optimizer": P.optimizer,
    }
    meta = {
        "optimizer": P.optimizer,
        "threshold": f"{P.threshold_factor:.6g}/lr",
        **(
            {"note": "lr = 0 at this checkpoint: λ_max(P⁻¹H) is reported, the threshold is NaN"}
            if not lr > 0
            else {}
        ),  # fmt: skip
        "frozen_groups": bool(torch.isinf(P.diag).any()),
        "hyperparameters": P.hyperparameters,
        "converged": bool(out.converged.all()),
        "residual": float(out.residuals[0]),
    }
    return fields, meta, lr, sop.n_matvecs


def _batch_fields(lambdas: list[float], directional: list[float], batch_size: int) -> dict[str, Any]:
    """Batch sharpness: the mean ± standard error of ``λ_max(H_B)`` and the mean directional form."""
    mean, sem = _mean_sem(lambdas)
    return {
        "batch_size": batch_size,
        "batch_lambdas": lambdas,
        "batch_sharpness": mean,
        "batch_sharpness_stderr": sem,
        "batch_directional": directional,
        "batch_directional_sharpness": _mean_sem(directional)[0],
    }


def _thresholds(lam: float, trace: float | None, lr: float | None) -> dict[str, Any]:
    """The stability fields: ``2/η``, ``ratio = λ_max/(2/η)``, ``λ_max ≤ 2/η`` (GD) and ``tr(H) ≤ 2/η``
    (SGD's linear-stability check); ``None`` without a positive learning rate."""
    two = 2.0 / lr if lr is not None and lr > 0 else None
    return {
        "lr": float(lr) if lr is not None else None,
        "two_over_lr": two,
        "ratio": lam / two if two else None,
        "gd_stable": (lam <= two) if two else None,
        "sgd_trace_stable": (trace <= two) if (two and trace is not None) else None,
    }


# ---------------------------------------------------------------------------------------------- API
@takes_operator_spec("loss", "output", "params", "batch_size", "mode", "dtype", "device", "reduce_fn")
def sharpness(
    model: nn.Module,
    data: Any,
    *,
    spec: OperatorSpec,
    lr: float | None = None,
    k: int = 1,
    tol: float = 1e-4,
    v0: torch.Tensor | None = None,
    trace: bool = True,
    trace_matvecs: int = 99,
    optimizer_state: Any = None,
    optimizer: str | None = None,
    batch_size_for_batch_sharpness: int | None = None,
    n_batches: int = 10,
    seed: int = 0,
    max_iter: int | None = None,
) -> SharpnessResult:
    """λ_max, trace and stability diagnostics of the training-loss Hessian at the model's weights.

    Parameters
    ----------
    spec:
        The operator (:class:`~dynascope.probes.operators.OperatorSpec`, default the Hessian), or its fields
        as keywords (``loss``, ``output``, ``params``, ``batch_size``, ``mode``, ``dtype``, ``device``,
        ``reduce_fn``).
    lr:
        Learning rate η for the thresholds (``2/η``); with ``optimizer_state`` it defaults to the
        state's lr.
    k, tol, v0, max_iter:
        Top-k eigenvalues by Lanczos to residual tolerance ``tol``; ``v0`` warm start
        (``previous.eigenvectors``); ``max_iter`` the most operator-vector products per Lanczos run.
    trace, trace_matvecs:
        Estimate ``tr(H)`` by Hutch++ with ``trace_matvecs`` products (exact when the parameter
        count is at most a third of it).
    optimizer_state:
        Adam/AdamW/RMSprop/Adagrad/SGD state (a torch optimizer, its ``state_dict()`` or
        ``Run.load_optimizer_state(step)``) for the preconditioned sharpness ``λ_max(P⁻¹H)``.
    batch_size_for_batch_sharpness, n_batches:
        Mini-batch size and number of disjoint random batches for batch sharpness.
    """
    check_int("k", k, min=1)
    check_float("lr", lr, min=0, optional=True)
    check_int("n_batches", n_batches, min=1)
    check_int("seed", seed)
    started = time.perf_counter()
    op = spec.build(model, data)
    stochastic = train_randomness("sharpness", op.model, spec.mode)
    out = eigsh(op, k, tol=tol, v0=v0, seed=seed, max_iter=max_iter)
    n_matvecs = op.n_matvecs
    lam = float(out.values[0])
    loss_value = op.loss_value()
    trace_val = trace_err = None
    if trace:
        trace_val, trace_err, used = _trace(op, trace_matvecs, seed)
        n_matvecs += used
    pre: dict[str, Any] = {}
    pre_meta: dict[str, Any] | None = None
    if optimizer_state is not None:
        pre, pre_meta, lr, used = _preconditioned(
            op, optimizer_state, lr=lr, optimizer=optimizer, tol=tol, seed=seed, max_iter=max_iter
        )
        n_matvecs += used
    batch: dict[str, Any] = {}
    if batch_size_for_batch_sharpness is not None:
        lambdas, directional, used = _batch_sharpness(
            model, data, batch_size=batch_size_for_batch_sharpness, n_batches=n_batches, seed=seed, tol=tol,
            v0=out.vectors[:, :1] if out.vectors is not None else None,
            spec=spec.replace(batch_size=None, reduce_fn=None), max_iter=max_iter,
        )  # fmt: skip
        n_matvecs += used
        batch = _batch_fields(lambdas, directional, batch_size_for_batch_sharpness)
    settings = {"k": k, "tol": tol, "loss": op.loss.name, "lr": lr, "seed": seed,
                "warm_start": v0 is not None, "trace_matvecs": trace_matvecs if trace else None,
                "n_batches": n_batches if batch_size_for_batch_sharpness else None,
                **spec_settings(spec)}  # fmt: skip
    meta = make_meta(
        "sharpness", model=op.model, params=settings, started=started, **op.meta(), n_matvecs=n_matvecs,
        stochastic_modules=stochastic, lanczos_iterations=out.n_iter,
        trace_method="hutch++ (dynascope.probes.trace.estimate_trace)" if trace else None,
        preconditioned=pre_meta,
        batch_sampling="disjoint mini-batches from seeded permutations" if batch else None,
    )  # fmt: skip
    return SharpnessResult(
        lambda_max=lam, eigenvalues=[float(v) for v in out.values],
        residuals=[float(r) for r in out.residuals], converged=[bool(c) for c in out.converged],
        trace=trace_val, trace_stderr=trace_err, loss_value=loss_value, n_matvecs=n_matvecs,
        eigenvectors=out.vectors, meta=meta,
        **_thresholds(lam, trace_val, lr), **pre, **batch,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- trajectory
#: keys of a :func:`sharpness` result's ``.meta`` that describe that one call, not the operator
_PROBE_META = frozenset({
    "probe", "params", "checkpoint_hash", "model_config", "model_config_source", "compiled", "wall_time_s",
    "versions", "n_matvecs", "stochastic_modules", "lanczos_iterations", "trace_method", "preconditioned",
    "batch_sampling",
})  # fmt: skip
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
class SharpnessTrackResult(Result):
    """λ_max per checkpoint against the learning-rate schedule.

    Per checkpoint ``i``: ``steps[i]``, ``lambda_max[i]``, ``top_k[i]`` (descending), ``converged[i]``,
    ``lr[i]`` (NaN when the run has no lr), ``two_over_lr[i]``, ``ratio[i] = λ_max/(2/η)``,
    ``train_loss[i]`` (the dataset-mean loss the curvature is of) and ``n_matvecs[i]``.
    """

    former_names: ClassVar[tuple[str, ...]] = ("SharpnessTrack",)

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
    lr: float | None = None,
    model: nn.Module | None = None,
) -> SharpnessTrackResult:
    """Top-k Hessian eigenvalues at every checkpoint of a run (or at ``steps``), with 2/η from ``run.json``.

    ``run_or_path``: a run folder (``Run`` or path) or models / state dicts (with ``model=``), see
    :mod:`dynascope.probes.trajectory`. ``data``: default the run's training set
    (``run.load_dataset().train``). ``loss``: default the loss recorded in ``run.json`` (see
    :func:`run_loss`), else ``"auto"``. ``lr``: a constant learning rate instead of the run's schedule
    (the only source of 2/η for checkpoints that are not a run). ``warm_start``: start Lanczos from the
    previous checkpoint's top-k eigenvectors (their sum plus a small random part).
    """
    check_int("k", k, min=1)
    check_int("seed", seed)
    check_float("lr", lr, min=0, min_open=True, optional=True)
    started = time.perf_counter()
    ckpts = checkpoint_models(run_or_path, steps, model=model, name="run_or_path")
    run = ckpts.run
    loss, loss_source, data, data_source = _run_loss_and_data(run, loss, data)
    iterator: Any = _with_progress(ckpts) if progress else ckpts.models
    out_steps, lam, topk, conv, lrs, thr, ratio, losses, mvs = [], [], [], [], [], [], [], [], []
    v0 = None
    loss_name = str(loss)
    op_meta: dict[str, Any] = {}
    for i, model_i in enumerate(iterator):
        step = ckpts.steps[i] if ckpts.steps is not None else i
        # the one λ_max-over-training computation (the Tracker's inline λ_max and the EoS recipe call it too)
        res = sharpness(model_i, data, loss=loss, k=k, tol=tol, v0=v0 if warm_start else None, trace=False,
                        seed=seed, batch_size=batch_size, mode=mode, dtype=dtype, device=device,
                        max_iter=max_iter)  # fmt: skip
        loss_name = res.meta["loss"]
        op_meta = {key: v for key, v in res.meta.items() if key not in _PROBE_META}
        if warm_start and res.eigenvectors is not None:
            v0 = res.eigenvectors
        step_lr = _step_lr(run, lr, step)
        two = 2.0 / step_lr if step_lr == step_lr and step_lr > 0 else float("nan")
        out_steps.append(step)
        lam.append(res.lambda_max)
        topk.append(list(res.eigenvalues))
        conv.append(all(res.converged))
        lrs.append(step_lr)
        thr.append(two)
        ratio.append(res.lambda_max / two if two == two else float("nan"))
        losses.append(res.loss_value)
        mvs.append(res.n_matvecs)
    if not out_steps:
        raise ValueError("track_sharpness needs at least one checkpoint")
    if ckpts.steps is not None and len(ckpts.steps) != len(out_steps):
        raise ValueError(f"got {len(ckpts.steps)} steps for {len(out_steps)} checkpoints")
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
        run=str(run.path) if run is not None else None,
        data=data_source,
        **op_meta,
        n_matvecs=int(sum(mvs)),
        lr_source="argument" if lr is not None else ("run.lr_at(step)" if run is not None else None),
    )
    return SharpnessTrackResult(
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
        run_path=str(run.path) if run is not None else None,
        meta=meta,
    )


def _run_loss_and_data(run: Any, loss: Any, data: Any) -> tuple[Any, str, Any, str]:
    """``(loss, its source, data, its source)``: given ones, else the run's recorded loss (``"auto"``
    without one) and its training set."""
    loss_source = "argument"
    if loss is None:
        name, key = run_loss(run) if run is not None else (None, None)
        loss, loss_source = (name, f"run.json:{key}") if name else ("auto", "default")
    if data is not None:
        return loss, loss_source, data, "argument"
    if run is None or not hasattr(run, "load_dataset"):
        raise ValueError("track_sharpness needs data= when the checkpoints are not a run folder")
    return loss, loss_source, run.load_dataset().train, "run training set"


def _with_progress(ckpts: Any) -> Any:
    """The checkpoints' models with a tqdm progress bar."""
    from tqdm.auto import tqdm

    total = len(ckpts.steps) if ckpts.steps is not None else None
    return tqdm(ckpts.models, desc="sharpness", unit="ckpt", total=total)


def _step_lr(run: Any, lr: float | None, step: int) -> float:
    """η at ``step``: the given constant, else the run's schedule (NaN when neither says)."""
    if lr is not None:
        return float(lr)
    if run is not None and hasattr(run, "lr_at"):
        try:
            return float(run.lr_at(step))
        except ValueError:  # RunError: no lr recorded
            pass
    return float("nan")


__all__ = ["SharpnessResult", "SharpnessTrackResult", "run_loss", "sharpness", "track_sharpness"]
