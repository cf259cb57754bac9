"""Detectors: quantify grokking, double descent and edge of stability in any run's metrics.

Each takes a :class:`~dynascope.models.Run`, a run-folder path or a pandas DataFrame of metrics
(``step`` plus the columns named below) and returns a small frozen dataclass with the evidence and a
``detected`` flag; ``.to_dict()`` gives JSON-safe values (NaN/inf → None).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..models import Run

__all__ = [
    "GrokkingEvidence",
    "XorGrokkingEvidence",
    "detect_xor_grokking",
    "DoubleDescentEvidence",
    "EdgeOfStabilityEvidence",
    "detect_grokking",
    "detect_double_descent",
    "interpolation_threshold",
    "detect_edge_of_stability",
    "LrTransferEvidence",
    "detect_lr_transfer",
    "NeuralCollapseEvidence",
    "detect_neural_collapse",
    "detect",
]


class _Evidence:
    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (np.floating, np.integer, np.bool_)):
                return clean(v.item())
            return v

        return {k: clean(v) for k, v in asdict(self).items()}  # type: ignore[call-overload]


def _frame(run: Any) -> tuple[Any, Run | None]:
    import pandas as pd

    if isinstance(run, pd.DataFrame):
        df, r = run, None
    elif isinstance(run, Run):
        df, r = run.metrics(), run
    elif isinstance(run, (str, os.PathLike)):
        r = Run.open(run)
        df = r.metrics()
    else:
        raise TypeError(f"expected a Run, a run folder or a metrics DataFrame, got {type(run).__name__}")
    if "step" not in df.columns:
        raise ValueError("metrics need a 'step' column")
    df = df.sort_values("step", kind="stable").drop_duplicates("step", keep="last").reset_index(drop=True)
    return df, r


def _need(df: Any, *cols: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"metrics lack column(s) {missing}; have {list(df.columns)}")


def _first_step(df: Any, col: str, threshold: float) -> int | None:
    sub = df[df[col].astype(float) >= threshold]
    return int(sub["step"].iloc[0]) if len(sub) else None


def _value_at(df: Any, col: str, step: int | None) -> float:
    if step is None or col not in df.columns:
        return math.nan
    v = df.loc[df["step"] == step, col]
    return float(v.iloc[0]) if len(v) and v.iloc[0] == v.iloc[0] else math.nan


# --------------------------------------------------------------------------------------- grokking
@dataclass(frozen=True)
class GrokkingEvidence(_Evidence):
    """``s_mem``: first step with train acc ≥ ``train_threshold``; ``s_gen``: first step with test acc ≥
    ``test_threshold``; ``delay_ratio`` = s_gen / s_mem; accuracies and weight norms at both steps."""

    s_mem: int | None
    s_gen: int | None
    delay_ratio: float
    test_acc_at_mem: float
    train_acc_at_gen: float
    weight_norm_at_mem: float
    weight_norm_at_gen: float
    final_train_acc: float
    final_test_acc: float
    detected: bool


def detect_grokking(
    run: Any,
    *,
    train_threshold: float = 0.99,
    test_threshold: float = 0.9,
    min_delay_ratio: float = 3.0,
    max_test_acc_at_mem: float = 0.5,
) -> GrokkingEvidence:
    """Grokking = the train accuracy reaches ``train_threshold`` at ``s_mem`` while the test accuracy is
    still ≤ ``max_test_acc_at_mem``, and the test accuracy reaches ``test_threshold`` only at
    ``s_gen ≥ min_delay_ratio · s_mem`` (``s_mem = 0`` counts as step 1 for the ratio)."""
    df, _ = _frame(run)
    _need(df, "train_acc", "test_acc")
    s_mem = _first_step(df, "train_acc", train_threshold)
    s_gen = _first_step(df, "test_acc", test_threshold)
    ratio = s_gen / max(s_mem, 1) if s_mem is not None and s_gen is not None else math.nan
    test_at_mem = _value_at(df, "test_acc", s_mem)
    detected = bool(
        s_mem is not None
        and s_gen is not None
        and ratio >= min_delay_ratio
        and test_at_mem <= max_test_acc_at_mem
    )
    return GrokkingEvidence(
        s_mem=s_mem,
        s_gen=s_gen,
        delay_ratio=ratio,
        test_acc_at_mem=test_at_mem,
        train_acc_at_gen=_value_at(df, "train_acc", s_gen),
        weight_norm_at_mem=_value_at(df, "weight_norm", s_mem),
        weight_norm_at_gen=_value_at(df, "weight_norm", s_gen),
        final_train_acc=float(df["train_acc"].iloc[-1]),
        final_test_acc=float(df["test_acc"].iloc[-1]),
        detected=detected,
    )


# ------------------------------------------------------------------ benign overfitting → grokking
@dataclass(frozen=True)
class XorGrokkingEvidence(_Evidence):
    """``s_fit``: first step with train accuracy 1 (every label, flipped ones included); ``s_gen``: first
    step with test accuracy ≥ ``bayes_accuracy − gap``; accuracies at both steps (``train_acc_flipped``
    is ``nan`` when the run did not log the split)."""

    s_fit: int | None
    s_gen: int | None
    bayes_accuracy: float
    test_acc_at_fit: float
    test_acc_at_gen: float
    train_acc_at_gen: float
    train_acc_flipped_at_gen: float
    delay_ratio: float
    detected: bool


def detect_xor_grokking(
    run: Any,
    *,
    bayes_accuracy: float | None = None,
    max_test_acc_at_fit: float = 0.6,
    gap: float = 0.05,
    min_delay_ratio: float = 3.0,
) -> XorGrokkingEvidence:
    """Benign overfitting then grokking (Xu et al. 2023): train accuracy 1.0 at ``s_fit`` with test
    accuracy ≤ ``max_test_acc_at_fit``; test accuracy ≥ ``bayes_accuracy − gap`` first at
    ``s_gen ≥ min_delay_ratio · s_fit`` (``s_fit = 0`` counts as 1); train accuracy still 1 at ``s_gen``
    (the flipped labels are still fit). ``bayes_accuracy``: default the run's ``extra["bayes_accuracy"]``."""
    df, r = _frame(run)
    _need(df, "train_acc", "test_acc")
    if bayes_accuracy is None:
        bayes_accuracy = ((r.config.get("extra") or {}) if r is not None else {}).get("bayes_accuracy")
    if not isinstance(bayes_accuracy, (int, float)) or not 0 < float(bayes_accuracy) <= 1:
        raise ValueError(
            "detect_xor_grokking needs bayes_accuracy in (0, 1] (argument or run extra), "
            f"got {bayes_accuracy!r}"
        )
    bayes = float(bayes_accuracy)
    s_fit = _first_step(df, "train_acc", 1.0)
    s_gen = _first_step(df, "test_acc", bayes - gap)
    ratio = s_gen / max(s_fit, 1) if s_fit is not None and s_gen is not None else math.nan
    test_at_fit = _value_at(df, "test_acc", s_fit)
    train_at_gen = _value_at(df, "train_acc", s_gen)
    detected = bool(
        s_fit is not None
        and s_gen is not None
        and test_at_fit <= max_test_acc_at_fit
        and ratio >= min_delay_ratio
        and train_at_gen >= 1.0
    )
    return XorGrokkingEvidence(
        s_fit=s_fit,
        s_gen=s_gen,
        bayes_accuracy=bayes,
        test_acc_at_fit=test_at_fit,
        test_acc_at_gen=_value_at(df, "test_acc", s_gen),
        train_acc_at_gen=train_at_gen,
        train_acc_flipped_at_gen=_value_at(df, "train_acc_flipped", s_gen),
        delay_ratio=ratio,
        detected=detected,
    )


# --------------------------------------------------------------------------------- double descent
@dataclass(frozen=True)
class DoubleDescentEvidence(_Evidence):
    """Peak of ``metric`` over the sweep variable ``x`` relative to the interpolation ``threshold``.

    ``ratio_to_neighbours``: peak / mean of the two adjacent sweep points; ``ratio_to_under``: peak /
    best value at x ≤ threshold/2; ``ratio_to_over``: peak / value at the largest x (≥ 10·threshold when
    the sweep reaches that far, else the last point); ``cond_peak_x``: argmax of the condition number.
    """

    metric: str
    threshold: float
    peak_x: float
    peak_location: float
    peak_value: float
    ratio_to_neighbours: float
    ratio_to_under: float
    ratio_to_over: float
    best_under_x: float
    over_x: float
    cond_peak_x: float
    cond_peak_value: float
    detected: bool


#: A model "fits the training set" when its mean train error (or loss) along the sweep is at most this.
FIT_TOLERANCE = 1e-3
#: Sweep variables that count random features p, whose interpolation threshold is p = n_train.
FEATURE_COUNT_COLUMNS = ("n_features", "p")


def interpolation_threshold(run: Any, metrics: Any, x: str) -> float | None:
    """Where the model starts to interpolate, along column ``x`` of ``metrics`` (``None``: unknown).

    The one rule, in order: the run's ``extra["interpolation_threshold"]`` (when ``x`` is the run's
    sweep variable or none is recorded); the training-set size ``n`` when ``x`` counts random features
    (``p = n``); else the smallest ``x`` whose mean train error (or train loss) is ≤ ``FIT_TOLERANCE``,
    i.e. the first model that fits the training set. ``run``: a Run or ``None`` (metrics only).
    """
    config = run.config if run is not None else {}
    extra = config.get("extra") or {}
    given, sweep = extra.get("interpolation_threshold"), extra.get("sweep_variable")
    if isinstance(given, (int, float)) and not isinstance(given, bool) and sweep in (None, x):
        return float(given)
    if x in FEATURE_COUNT_COLUMNS:
        n = extra.get("n_train", (config.get("dataset") or {}).get("n_train"))
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            return float(n)
    if metrics is None or x not in metrics.columns:
        return None
    for col in ("train_error", "train_err", "train_mse", "train_loss"):
        if col in metrics.columns:
            mean = metrics.groupby(x)[col].mean()
            fitted = mean[mean <= FIT_TOLERANCE]
            if len(fitted):
                return float(fitted.index.min())
    return None


def detect_double_descent(
    run: Any,
    *,
    metric: str = "test_mse",
    x: str | None = None,
    threshold: float | None = None,
    location_tol: float = 0.1,
    min_ratio: float = 2.0,
) -> DoubleDescentEvidence:
    """Find the peak of ``metric`` (default ``test_mse``) over the sweep variable ``x`` (default: the
    run's ``extra["sweep_variable"]`` column, else ``step``). ``threshold``: the interpolation threshold
    in units of ``x`` (default: :func:`interpolation_threshold`). Detected when
    |peak_x / threshold − 1| ≤ ``location_tol`` and the peak is ≥ ``min_ratio`` times both the best
    under-parameterised value and the over-parameterised end of the sweep."""
    df, r = _frame(run)
    extra = (r.config.get("extra") or {}) if r is not None else {}
    if x is None:
        x = extra.get("sweep_variable", "step")
        if x not in df.columns:
            x = "step"
    if threshold is None:
        threshold = interpolation_threshold(r, df, x)
        if threshold is None:
            raise ValueError(
                "detect_double_descent needs threshold= (the interpolation threshold in x units)"
            )
    threshold = float(threshold)
    _need(df, x, metric)
    d = df[[x, metric] + (["cond"] if "cond" in df.columns else [])].dropna(subset=[metric])
    d = d.sort_values(x).reset_index(drop=True)
    if len(d) < 3:
        raise ValueError(f"double descent needs at least 3 sweep points, got {len(d)}")
    xs, ys = d[x].to_numpy(float), d[metric].to_numpy(float)
    i = int(np.nanargmax(np.where(np.isfinite(ys), ys, -np.inf)))
    peak = ys[i]
    nb = [ys[j] for j in (i - 1, i + 1) if 0 <= j < len(ys)]
    under = ys[xs <= threshold / 2]
    ui = int(np.argmin(under)) if len(under) else None
    best_under = float(under[ui]) if ui is not None else math.nan
    far = np.nonzero(xs >= 10 * threshold)[0]
    oi = int(far[0]) if len(far) else len(xs) - 1
    if "cond" in d.columns and d["cond"].notna().any():
        c = d["cond"].to_numpy(float)
        ci = int(np.nanargmax(np.where(np.isnan(c), -np.inf, c)))
        cond_x, cond_v = float(xs[ci]), float(c[ci])
    else:
        cond_x = cond_v = math.nan
    ratio_under = peak / best_under if best_under > 0 else math.nan
    ratio_over = peak / ys[oi] if ys[oi] > 0 and oi != i else math.nan
    detected = bool(
        abs(xs[i] / threshold - 1) <= location_tol and ratio_under >= min_ratio and ratio_over >= min_ratio
    )
    return DoubleDescentEvidence(
        metric=metric,
        threshold=threshold,
        peak_x=float(xs[i]),
        peak_location=float(xs[i] / threshold),
        peak_value=float(peak),
        ratio_to_neighbours=float(peak / np.mean(nb)) if nb and np.mean(nb) > 0 else math.nan,
        ratio_to_under=float(ratio_under),
        ratio_to_over=float(ratio_over),
        best_under_x=float(xs[xs <= threshold / 2][ui]) if ui is not None else math.nan,
        over_x=float(xs[oi]),
        cond_peak_x=cond_x,
        cond_peak_value=cond_v,
        detected=detected,
    )


# ----------------------------------------------------------------------------- edge of stability
@dataclass(frozen=True)
class EdgeOfStabilityEvidence(_Evidence):
    """``entry_step``: first checkpoint with λ_max ≥ ``entry_fraction``·2/η; ``fraction_in_band``: share of
    the later checkpoints with λ_max·η/2 in ``band``; ``loss_increases``: logged steps after entry where
    the train loss rose; ``final_over_entry`` = final loss / loss at entry."""

    lr: float
    two_over_lr: float
    initial_sharpness: float
    initial_ratio: float
    entry_step: int | None
    n_after: int
    fraction_in_band: float
    min_ratio_after: float
    max_ratio_after: float
    loss_increases: int
    loss_at_entry: float
    final_loss: float
    final_over_entry: float
    detected: bool
    #: what was compared: λ_max(H) against 2/η, or (Adam) λ_max(P⁻¹H) against its threshold
    quantity: str = "lambda_max(H) vs 2/lr"


_SHARPNESS_COLUMNS = ("sharpness", "lambda_max", "hessian_lambda_max")


def detect_edge_of_stability(
    run: Any,
    *,
    lr: float | None = None,
    sharpness_column: str | None = None,
    entry_fraction: float = 0.95,
    band: tuple[float, float] = (0.9, 1.2),
    min_fraction: float = 0.9,
) -> EdgeOfStabilityEvidence:
    """Edge of stability from a ``sharpness`` column (λ_max at checkpoints; other rows may be empty) and
    ``train_loss``. ``lr`` (η): given, else the run's optimizer lr, else the ``lr`` column. Detected when
    the sharpness enters (≥ ``entry_fraction``·2/η), ≥ ``min_fraction`` of the later sharpness
    measurements lie in ``band`` (in units of 2/η), and the loss rises at least once after entry.

    A run with no λ_max(H) column but a ``precond_sharpness`` one (adaptive optimizers, e.g. the
    ``edge_of_stability_adam`` recipe) is judged the same way on λ_max(P⁻¹H) against its logged
    threshold ``precond_threshold`` (38/η for Adam with β₁ = 0.9) in place of 2/η."""
    df, r = _frame(run)
    threshold: float | None = None
    if sharpness_column is None:
        sharpness_column = next((c for c in _SHARPNESS_COLUMNS if c in df.columns), None)
        if sharpness_column is None and {"precond_sharpness", "precond_threshold"} <= set(df.columns):
            sharpness_column = "precond_sharpness"
            threshold = float(df["precond_threshold"].dropna().median())
        if sharpness_column is None:
            raise ValueError(
                f"metrics lack a sharpness column (one of {_SHARPNESS_COLUMNS}, or precond_sharpness with "
                f"precond_threshold); have {list(df.columns)}"
            )
    _need(df, sharpness_column, "train_loss")
    if lr is None and r is not None:
        lr = (r.config.get("optimizer") or {}).get("lr")
    if lr is None and "lr" in df.columns and df["lr"].notna().any():
        lr = float(df["lr"].dropna().iloc[0])
    if lr is None or not lr > 0:
        raise ValueError(f"detect_edge_of_stability needs a positive lr (η), got {lr!r}")
    lr = float(lr)
    edge = 2.0 / lr if threshold is None else threshold
    s = df[["step", sharpness_column]].dropna()
    if s.empty:
        raise ValueError(f"column {sharpness_column!r} holds no values")
    steps, lam = s["step"].to_numpy(int), s[sharpness_column].to_numpy(float)
    ratio = lam / edge
    hit = np.nonzero(lam >= entry_fraction * edge)[0]
    loss = df[["step", "train_loss"]].dropna()
    ls, lv = loss["step"].to_numpy(int), loss["train_loss"].to_numpy(float)
    if len(hit):
        e = int(hit[0])
        entry = int(steps[e])
        after = ratio[e + 1 :]
        in_band = float(np.mean((after >= band[0]) & (after <= band[1]))) if len(after) else math.nan
        post = lv[ls >= entry]
        increases = int(np.sum(np.diff(post) > 0)) if len(post) > 1 else 0
        at_entry = float(lv[ls >= entry][0]) if len(post) else math.nan
    else:
        entry, after, in_band, increases, at_entry = None, np.array([]), math.nan, 0, math.nan
    final = float(lv[-1]) if len(lv) else math.nan
    detected = bool(entry is not None and len(after) > 0 and in_band >= min_fraction and increases >= 1)
    return EdgeOfStabilityEvidence(
        lr=lr,
        two_over_lr=edge,
        initial_sharpness=float(lam[0]),
        initial_ratio=float(ratio[0]),
        entry_step=entry,
        n_after=int(len(after)),
        fraction_in_band=in_band,
        min_ratio_after=float(after.min()) if len(after) else math.nan,
        max_ratio_after=float(after.max()) if len(after) else math.nan,
        loss_increases=increases,
        loss_at_entry=at_entry,
        final_loss=final,
        final_over_entry=final / at_entry if at_entry and at_entry > 0 else math.nan,
        detected=detected,
        quantity="lambda_max(H) vs 2/lr" if threshold is None else f"lambda_max(P^-1 H) vs {threshold:.6g}",
    )


# ------------------------------------------------------------------------ learning-rate transfer
@dataclass(frozen=True)
class LrTransferEvidence(_Evidence):
    """Per width (ascending ``widths``): ``optimal_lrs`` = the grid rate with the lowest final train loss
    (ties: the smaller rate; ``None`` when every rate diverged). ``optimum_shift``: max − min of the
    optima's grid indices (grid points); ``optimum_trend``: index at the widest − at the narrowest.
    Sharpness (η units) at the reference rate, per logged step: ``spread`` = max / min over widths;
    ``spread_at_init`` (step 0), ``spread_peak`` (max over all steps), ``spread_median`` /
    ``spread_max`` over the steps after warm-up (step > 0 and ≥ ``warmup``·steps), ``fraction_in_band``
    = share of those steps with spread ≤ ``band``. ``transfers``: optimum_shift ≤ max_shift and
    fraction_in_band ≥ min_fraction. ``detected``: the behaviour the parametrisation predicts — μP
    transfers; SP and NTK do not: the optimum moves by at least one grid point and the sharpness of
    the widths differs by at least ``spread_factor`` at some step (spread_peak)."""

    parametrization: str | None
    widths: list[int]
    optimal_lrs: list[float | None]
    optimum_shift: int | None
    optimum_trend: int | None
    reference_lr: float
    spread_at_init: float
    spread_peak: float
    spread_median: float
    spread_max: float
    fraction_in_band: float
    n_steps_compared: int
    band: float
    transfers: bool
    detected: bool

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["optimal_lrs"] = [v if v is None or math.isfinite(v) else None for v in self.optimal_lrs]
        return out


def detect_lr_transfer(
    run: Any,
    *,
    max_shift: int = 0,
    band: float = 1.35,
    warmup: float = 0.1,
    min_fraction: float = 0.5,
    spread_factor: float = 1.5,
) -> LrTransferEvidence:
    """Learning-rate transfer across widths in an ``lr_transfer`` run (a Run or its folder); the criteria
    are those of :class:`LrTransferEvidence`. Defaults from the recipe's full runs, seeds 0/1/2: μP keeps
    the optimum at η = 16 for every width and its widths' sharpness within ×1.17 / ×1.40 / ×1.25 after
    step 10 (≤ ×1.35 on 100 / 90 / 100 % of those steps: ``band`` 1.35, ``min_fraction`` 0.5); SP
    spreads ×10.0 / ×10.7 / ×9.7 at init (λ_max ∝ width) and moves the optimum down by 1 / 1 / 2 grid
    points; NTK spreads ×2.2 / ×1.8 / ×2.2 (median after warm-up; narrow nets sharpen, wide ones stay
    lazy) and moves it up by one (``spread_factor`` 1.5 on spread_peak)."""
    from .lr_transfer import read_lr_sweep

    r = run if isinstance(run, Run) else Run.open(run)
    extra = r.config.get("extra") or {}
    cfg = extra.get("config") or {}
    sweep = read_lr_sweep(r)
    grid = sorted({float(v) for v in sweep["lr"]})
    widths = sorted({int(w) for w in sweep["width"]})
    optima: list[float | None] = []
    for w in widths:
        part = sweep[sweep["width"] == w].sort_values("lr")
        loss = part["final_train_loss"].astype(float).to_numpy()
        ok = np.isfinite(loss)
        optima.append(float(part["lr"].to_numpy()[ok][np.argmin(loss[ok])]) if ok.any() else None)
    idx = [grid.index(o) for o in optima if o is not None]
    shift = max(idx) - min(idx) if idx and len(idx) == len(widths) else None
    trend = idx[-1] - idx[0] if shift is not None else None
    metrics = r.metrics()
    _need(metrics, "step", "width", "sharpness")
    wide = metrics.pivot_table(index="step", columns="width", values="sharpness", aggfunc="last")
    wide = wide.reindex(columns=widths).dropna()
    spread = (wide.max(axis=1) / wide.min(axis=1)).astype(float)
    steps = int(cfg.get("steps", int(metrics["step"].max())))
    after = spread[(spread.index >= warmup * steps) & (spread.index > 0)]
    in_band = float((after <= band).mean()) if len(after) else math.nan
    peak = float(spread.max()) if len(spread) else math.nan
    transfers = bool(shift is not None and shift <= max_shift and in_band >= min_fraction)
    param = extra.get("parametrization")
    if param == "mup":
        detected = transfers
    else:
        detected = bool(shift is not None and shift > max_shift and peak >= spread_factor)
    return LrTransferEvidence(
        parametrization=param,
        widths=widths,
        optimal_lrs=optima,
        optimum_shift=shift,
        optimum_trend=trend,
        reference_lr=float(cfg.get("reference_lr", math.nan)),
        spread_at_init=float(spread.loc[0]) if 0 in spread.index else math.nan,
        spread_peak=peak,
        spread_median=float(after.median()) if len(after) else math.nan,
        spread_max=float(after.max()) if len(after) else math.nan,
        fraction_in_band=in_band,
        n_steps_compared=int(len(after)),
        band=float(band),
        transfers=transfers,
        detected=detected,
    )


# ------------------------------------------------------------------------------- neural collapse
@dataclass(frozen=True)
class NeuralCollapseEvidence(_Evidence):
    """NC metrics of the training set at the run's checkpoints (``probes.neural_collapse``).
    ``fit_step``: first checkpoint with training accuracy 1, where the terminal phase begins;
    ``nc1_decades`` = log₁₀(NC1 at ``fit_step`` / final NC1), the fall within the terminal phase;
    ``nc1_decades_total`` the same from step 0."""

    steps: list[int]
    nc1: list[float]
    fit_step: int | None
    nc1_initial: float
    nc1_at_fit: float
    nc1_final: float
    nc1_decades: float
    nc1_decades_total: float
    etf_distance_initial: float
    etf_distance_final: float
    nc3_final: float
    nc4_final: float
    detected: bool


def detect_neural_collapse(
    run: Any,
    *,
    min_decades: float = 1.0,
    min_nc4: float = 0.99,
    max_checkpoints: int = 16,
) -> NeuralCollapseEvidence:
    """Neural collapse (Papyan, Han & Donoho 2020) in a run of a classifier: the training set is fit
    (accuracy 1 at ``fit_step``), NC1 = Tr(Σ_W Σ_B⁺)/C then falls by ≥ ``min_decades`` decades, the final
    network agrees with the nearest-class-mean rule on ≥ ``min_nc4`` of the samples (NC4) and the class
    means end nearer a simplex ETF than they started (NC2). Computed here on at most ``max_checkpoints``
    checkpoints (log-spaced selection; the first and last always) over the run's training split."""
    from ..probes import neural_collapse

    r = run if isinstance(run, Run) else Run.open(run)
    all_steps = r.steps()
    if not all_steps:
        raise ValueError(f"run '{r.path}' has no checkpoints")
    pick = np.unique(np.round(np.linspace(0, len(all_steps) - 1, max_checkpoints)).astype(int))
    steps = [all_steps[i] for i in pick]
    data = r.load_dataset().train
    res = [neural_collapse(r.load_model(s), data) for s in steps]
    nc1 = [float(x.nc1) for x in res]
    fit = next((i for i, x in enumerate(res) if x.accuracy >= 1.0), None)
    at_fit = nc1[fit] if fit is not None else math.nan

    def decades(a: float, b: float) -> float:
        return math.log10(a / b) if a > 0 and b > 0 else math.nan

    fall = decades(at_fit, nc1[-1])
    etf0, etf1 = float(res[0].nc2_etf_distance), float(res[-1].nc2_etf_distance)
    detected = bool(fit is not None and fall >= min_decades and res[-1].nc4 >= min_nc4 and etf1 < etf0)
    return NeuralCollapseEvidence(
        steps=steps,
        nc1=nc1,
        fit_step=steps[fit] if fit is not None else None,
        nc1_initial=nc1[0],
        nc1_at_fit=at_fit,
        nc1_final=nc1[-1],
        nc1_decades=fall,
        nc1_decades_total=decades(nc1[0], nc1[-1]),
        etf_distance_initial=etf0,
        etf_distance_final=etf1,
        nc3_final=float(res[-1].nc3),
        nc4_final=float(res[-1].nc4),
        detected=detected,
    )


def detect(run: Any, **kwargs: Any) -> _Evidence:
    """Run the detector matching the run's ``extra["phenomenon"]``."""
    r = run if isinstance(run, Run) else Run.open(run)
    phen = (r.config.get("extra") or {}).get("phenomenon")
    fns = {
        "grokking": detect_grokking,
        "xor_grokking": detect_xor_grokking,
        "double_descent": detect_double_descent,
        "edge_of_stability": detect_edge_of_stability,
        "lr_transfer": detect_lr_transfer,
        "neural_collapse": detect_neural_collapse,
    }
    if phen not in fns:
        raise ValueError(f"run '{r.path}' names no known phenomenon (extra.phenomenon = {phen!r})")
    return fns[phen](r, **kwargs)
