"""Opposing signals (Rosenfeld & Risteski 2023, "Outliers with opposing signals have an outsized effect on
neural network optimization"): the examples whose loss moves most at a training instability, split into the
two groups that pull the network in opposite directions.

Given checkpoints ``θ_0 … θ_T`` (consecutive steps of one run) and a dataset:

1. per-example losses ``ℓ_i(θ_t)`` at every checkpoint (eval mode) and their changes
   ``Δ_ti = ℓ_i(θ_{t+1}) − ℓ_i(θ_t)``;
2. the instability ``t*``: the step before the largest increase of the mean loss (the spike), or
   ``reference=`` (a step);
3. the score, ``score="spike"`` (default, the paper's ranking): the per-example loss change at the
   instability, ``s_i = Σ_{t ∈ W} |Δ_ti|`` over the ``window`` steps on either side of ``t*``
   (``W = t*−w … t*+w``; ``w = 1`` by default: the spike and the steps around it, so a group whose loss
   falls at the spike and rises one step later counts as much as the one that rises). ``score="oscillation"``
   (the earlier rule, kept as an option): ``s_i = Σ_t |Δ_ti| − |ℓ_i(θ_T) − ℓ_i(θ_0)|``, the loss movement
   over *all* checkpoints that went back and forth — it needs many oscillating checkpoints and also ranks
   examples that oscillate away from the instability;
4. selection (``n_examples=None``): with ``s_(1) ≥ s_(2) ≥ …`` (floored at :data:`NOISE_FLOOR` of
   ``s_(1)``), the top ``k`` for the ``k ∈ [2, max_fraction · N]`` that maximises ``s_(k) / s_(k+1)``, kept
   only when that ratio is at least ``min_gap`` (``selection_gap_ratio`` in ``meta``); otherwise — and
   when the mean loss never rose (no instability) — **nothing** is selected. Opposing groups' losses move
   an order of magnitude more at the instability than the bulk's (ratios 60–240 in the planted tests),
   while a shared oscillation or a smooth run has no such gap, so groups of 5 % to 40 % of the data are
   found and a run without them flags none. ``max_fraction`` (default 0.5: outliers are a minority) and
   ``min_gap`` (default 4 for ``"spike"``) are the visible parameters; ``n_examples`` takes a fixed count;
5. the direction ``V``: the unit update ``θ_{t*+1} − θ_{t*}`` (``direction="update"``, default) or the
   top-``k`` Hessian eigenvectors of the mean loss at ``θ_{t*}`` (``"hessian"``); projections
   ``Q_i = Σ_{t ∈ W'} Vᵀ ∇ℓ_i(θ_t)`` over the ``span`` checkpoints ``W' = t*, t*+1, …`` (default one) and
   ``p_i = Q_i · u`` along one axis ``u`` of ``span V``: ``u = 1`` for one direction; for ``k > 1``
   eigenvectors the update's component in their span, ``u ∝ Vᵀ(θ_{t*+1} − θ_{t*})`` (the sharp part of the
   step), or without a next checkpoint the top right singular vector of ``Q``. Groups: the selected examples
   with ``p_i > 0`` (``"+v"``) and ``< 0`` (``"-v"``); the sign of ``u`` is arbitrary, the split is not. The
   paper splits by the sign of the dominant direction the outliers share; the update at the instability is
   that direction as the iterate actually moves along it (at the edge of stability the top eigenvalues are
   often nearly equal, so ``v₁`` alone is an arbitrary vector of their eigenspace);
6. for each group: its mean loss at every checkpoint, and its share of each step's change of the total
   loss ``Σ_{i∈G} Δ_ti / Σ_i Δ_ti`` — at the spike (``spike_share``) and over all steps where the mean
   loss rose (``rise_share``). ``alternation`` is the correlation of the two groups' mean-loss changes
   over the steps (near −1 when one group's loss rises while the other's falls).

Planted-group tests (tests/test_opposing.py): two opposing groups of 5, 10, 20 and 30 % of the data are
found with precision and recall ≥ 0.9 for each group, and a control without planted groups flags nothing.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..datasets.batching import concat_inputs, slice_inputs
from .functional import FunctionalModel, select_output
from .losses import resolve_loss
from .operators import OperatorSpec
from .results import Result, make_meta
from .trajectory import checkpoint_models
from .validation import check_choice, check_float, check_int

DIRECTIONS = ("hessian", "update")
SCORES = ("spike", "oscillation")
#: ``score="spike"``: scores below this fraction of the largest are noise (float32 losses of well-fit
#: examples change by exactly 0 or by rounding); the gap ratio is taken on scores floored there.
NOISE_FLOOR = 1e-3
GROUP_NAMES = ("+v", "-v")


@dataclass(frozen=True, kw_only=True)
class OpposingSignalsResult(Result):
    """Opposing-signal groups (module docstring).

    ``steps`` ``[T]``; ``mean_loss`` ``[T]``; ``scores`` ``[N]`` (``score=``: loss change at the spike, or
    oscillation); ``threshold`` the selection cut (``None`` when ``n_examples`` was given or nothing was
    selected); ``selected`` example indices by descending
    score; ``projections`` ``g_i · v`` of the selected; ``example_loss`` ``[n_selected, T]``; ``groups``
    ``{name: example indices}``; ``group_loss`` ``[G, T]``; ``group_step_share`` ``[G, T−1]``;
    ``spike_index`` (``t*``, or ``None`` when the mean loss never rose), ``reference_step``;
    ``spike_share`` / ``rise_share`` per group; ``alternation``.
    """

    steps: list[Any]
    mean_loss: torch.Tensor
    scores: torch.Tensor
    threshold: float | None
    selected: list[int]
    projections: torch.Tensor
    example_loss: torch.Tensor
    groups: dict[str, list[int]]
    group_loss: torch.Tensor
    group_step_share: torch.Tensor
    spike_index: int | None
    reference_step: Any
    spike_share: dict[str, float]
    rise_share: dict[str, float]
    alternation: float | None
    direction: str

    def group_of(self, index: int) -> str | None:
        for name, members in self.groups.items():
            if index in members:
                return name
        return None

    def to_frame(self):
        """One row per selected example: ``example, group, score, projection, loss_min, loss_max``."""
        import pandas as pd

        return pd.DataFrame({
            "example": self.selected,
            "group": [self.group_of(i) for i in self.selected],
            "score": [float(self.scores[i]) for i in self.selected],
            "projection": self.projections.tolist(),
            "loss_min": self.example_loss.min(dim=1).values.tolist() if self.selected else [],
            "loss_max": self.example_loss.max(dim=1).values.tolist() if self.selected else [],
        })  # fmt: skip

    def groups_frame(self):
        """One row per group: ``group, n, fraction_of_data, spike_share, rise_share, mean_projection``."""
        import pandas as pd

        n_total = int(self.scores.numel())
        rows = []
        for name, members in self.groups.items():
            proj = [float(self.projections[self.selected.index(i)]) for i in members]
            rows.append({
                "group": name, "n": len(members), "fraction_of_data": len(members) / n_total,
                "spike_share": self.spike_share.get(name), "rise_share": self.rise_share.get(name),
                "mean_projection": sum(proj) / len(proj) if proj else float("nan"),
            })  # fmt: skip
        return pd.DataFrame(rows)

    def trajectory_frame(self):
        """One row per checkpoint: ``step, mean_loss`` and each group's mean loss (``loss_+v``, ...)."""
        import pandas as pd

        cols: dict[str, Any] = {"step": list(self.steps), "mean_loss": self.mean_loss.tolist()}
        for g, name in enumerate(self.groups):
            cols[f"loss_{name}"] = self.group_loss[g].tolist()
        return pd.DataFrame(cols)


def _per_example_losses(model: nn.Module, source: Any, loss: Any) -> torch.Tensor:
    out = []
    from .functional import ModeGuard

    with torch.no_grad(), ModeGuard(model, "eval"):
        for b in source:
            raw = model(**b.x) if isinstance(b.x, dict) else model(b.x)
            out_b = raw if loss.takes_batch else select_output(raw)[0]
            out.append(loss.losses(out_b, b.y, b.x).double().cpu())
    return torch.cat(out)


def _rows(source: Any, index: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The samples at ``index`` (ascending positions in the data's order), gathered batch by batch."""
    xs, ys, lo = [], [], 0
    for b in source:
        hi = lo + b.n
        local = index[(index >= lo) & (index < hi)] - lo
        if local.numel():
            xs.append(slice_inputs(b.x, local.to(b.y.device)))
            ys.append(b.y[local.to(b.y.device)])
        lo = hi
    return concat_inputs(xs), torch.cat(ys)


def _select_gap(
    scores: torch.Tensor, n_examples: int | None, max_fraction: float, min_gap: float
) -> tuple[torch.Tensor, float | None, float | None]:
    """``(chosen indices by descending score, threshold, gap ratio)``: the widest relative gap of the
    sorted scores in the top ``max_fraction`` (``score="oscillation"``; the top ``max_fraction`` when no
    ratio reaches ``min_gap``)."""
    order = torch.argsort(scores, descending=True, stable=True)
    if n_examples is not None:
        return order[: min(n_examples, scores.numel())], None, None
    cap = min(max(2, int(max_fraction * scores.numel())), scores.numel() - 1)
    top = scores[order[: cap + 1]].clamp_min(0)
    eps = 1e-12 * float(top[0]) if float(top[0]) > 0 else 1e-300
    ratios = (top[:-1] + eps) / (top[1:] + eps)  # s_k / s_{k+1}, k = 1..cap
    ratios[:1] = 0  # at least two examples (two sides of a split)
    k = int(ratios.argmax()) + 1
    gap = float(ratios[k - 1])
    if gap < min_gap:  # no clear outliers: the top max_fraction
        return order[:cap], float(top[cap - 1]), gap
    threshold = float((top[k - 1] + eps).sqrt() * (top[k] + eps).sqrt())
    return order[:k], threshold, gap


def separate(scores: torch.Tensor, max_fraction: float, min_gap: float) -> tuple[int, float, float]:
    """The outlier class of ``score="spike"`` (module docstring, step 4): ``(k, threshold, gap)`` — the
    top ``k`` scores (``k = 0`` when the widest gap is below ``min_gap``), the cut between them and the rest
    and the gap ratio ``s_(k) / s_(k+1)``, scores floored at :data:`NOISE_FLOOR` of the largest."""
    n = scores.numel()
    cap = min(max(2, int(max_fraction * n)), n - 1)
    top = torch.sort(scores.double(), descending=True).values[: cap + 1]
    floor = NOISE_FLOOR * float(top[0]) if float(top[0]) > 0 else 1e-300
    t = top.clamp_min(floor)
    ratios = t[:-1] / t[1:]  # s_k / s_{k+1}, k = 1..cap
    ratios[:1] = 0  # at least two examples (two sides of a split)
    k = int(ratios.argmax()) + 1
    gap = float(ratios[k - 1])
    return (k if gap >= min_gap else 0), float((t[k - 1] * t[k]).sqrt()), gap


@dataclass
class _Losses:
    """Per-example losses ``L [T, N]`` at every checkpoint, the step labels, the data as batches, the
    resolved loss, and a way back to checkpoint ``t``'s model (kept copies, or reloaded from the run)."""

    L: torch.Tensor
    labels: list[Any]
    source: Any
    loss: Any
    model_at: Callable[[int], nn.Module]


def _checkpoint_losses(
    checkpoints: Any, data: Any, *, steps: Any, model: nn.Module | None, loss: Any, batch_size: int | None,
    device: Any,
) -> _Losses:  # fmt: skip
    """Step 1 of the module docstring: ``ℓ_i(θ_t)`` for every example ``i`` and checkpoint ``t`` (eval mode),
    one model at a time. Given models are copied (the caller's are never moved); a run's are reloaded
    when needed again."""
    ck = checkpoint_models(checkpoints, steps, model=model)
    kept: list[nn.Module | None] = []  # copies of given models; None for a run's (reloaded when needed)
    losses: list[torch.Tensor] = []
    resolved = source = None
    for m in ck.models:
        if ck.run is None:
            m = copy.deepcopy(m)  # the caller's model is never moved; a state dict's holder is reused
        if device is not None:
            m = m.to(device)
        if source is None:
            source = FunctionalModel(m, mode="eval").batches(data, batch_size)
            first = next(iter(source), None)
            if first is None:
                raise ValueError("the data holds no samples")
            resolved = resolve_loss(loss, first.y)
        losses.append(_per_example_losses(m, source, resolved))
        kept.append(m if ck.run is None else None)
    if len(kept) < 3:
        raise ValueError(f"opposing_signals needs at least 3 consecutive checkpoints; got {len(kept)}")
    labels = list(ck.steps) if ck.steps is not None else list(range(len(kept)))
    if len(labels) != len(kept):
        raise ValueError(f"got {len(kept)} checkpoints but {len(labels)} steps")

    @functools.lru_cache(maxsize=2)  # the reference and the next checkpoint are asked for several times
    def model_at(t: int) -> nn.Module:
        held = kept[t]
        if held is not None:
            return held
        loaded = ck.run.load_model(labels[t])
        return loaded.to(device) if device is not None else loaded

    return _Losses(torch.stack(losses), labels, source, resolved, model_at)


def _reference(mean_delta: torch.Tensor, labels: list[Any], reference: Any) -> tuple[int | None, int]:
    """Step 2: ``(spike, ref)`` — the index of the largest rise of the mean loss (``None`` when it never
    rose) and the reference index: ``reference``'s position, else the spike, else the middle checkpoint."""
    spike = int(mean_delta.argmax()) if bool((mean_delta > 0).any()) else None
    if reference is None:
        return spike, spike if spike is not None else len(labels) // 2
    if reference not in labels:
        raise ValueError(f"reference step {reference!r} is not among the checkpoints' steps {labels}")
    return spike, labels.index(reference)


@dataclass
class _Selection:
    """The scores ``[N]``, the chosen examples by descending score, the cut (``None`` for a fixed count or
    an empty selection), the gap ratio ``s_(k)/s_(k+1)`` and how the selection was made (for ``meta``)."""

    scores: torch.Tensor
    chosen: torch.Tensor
    threshold: float | None
    gap: float | None
    how: str


def _select(
    L: torch.Tensor, delta: torch.Tensor, *, score: str, ref: int, spike: int | None, reference: Any,
    n_examples: int | None, window: int, max_fraction: float, min_gap: float,
) -> _Selection:  # fmt: skip
    """Steps 3–4: the scores (``"oscillation"``: ``Σ_t |Δ_ti| − |ℓ_i(θ_T) − ℓ_i(θ_0)|``; ``"spike"``:
    ``Σ_{t ∈ W} |Δ_ti|`` over ``window`` steps either side of the reference) and the examples selected:
    a fixed count, or those above the widest gap (:func:`_select_gap` / :func:`separate`)."""
    if score == "oscillation":
        scores = delta.abs().sum(0) - (L[-1] - L[0]).abs()
        chosen, threshold, gap = _select_gap(scores, n_examples, max_fraction, min_gap)
        how = (f"top {n_examples} by score" if n_examples is not None
               else f"top {max_fraction:.3g} of the data (no gap ratio >= {min_gap:g})" if gap < min_gap
               else "cut at the largest ratio between consecutive sorted scores in the top "
               f"{max_fraction:.3g} of the data (at least 2)")  # fmt: skip
        return _Selection(scores, chosen, threshold, gap, how)
    centre = min(ref, delta.shape[0] - 1)
    lo, hi = max(0, centre - window), min(delta.shape[0], centre + window + 1)
    scores = delta[lo:hi].abs().sum(0)
    order = torch.argsort(scores, descending=True, stable=True)
    if n_examples is not None:
        chosen = order[: min(n_examples, scores.numel())]
        return _Selection(scores, chosen, None, None, f"top {n_examples} by score")
    if spike is None and reference is None:
        return _Selection(scores, order[:0], None, None, "nothing: the mean loss never rose (no instability)")
    n_sel, cut, gap = separate(scores, max_fraction, min_gap)
    verdict = f" >= min_gap={min_gap:g}" if n_sel else f" < min_gap={min_gap:g}: nothing selected"
    how = ("cut at the largest ratio between consecutive sorted scores in the top "
           f"{max_fraction:.3g} of the data (at least 2): {gap:.3g}{verdict}")  # fmt: skip
    return _Selection(scores, order[:n_sel], cut if n_sel else None, gap, how)


def _direction(
    losses: _Losses, data: Any, ref: int, *, direction: str, k: int, hessian_tol: float, seed: int,
    batch_size: int | None,
) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Step 5's directions ``V`` (``[P, j]``, unit columns) at the reference and their ``meta``: the top-``k``
    Hessian eigenvectors of the mean loss, or the unit update ``(θ_{ref+1} − θ_ref)/‖·‖``."""
    ref_model = losses.model_at(ref)
    fm = FunctionalModel(ref_model, mode="eval")
    if direction == "hessian":
        from .hessian import solve_eigenpairs

        spec = OperatorSpec(loss=losses.loss, batch_size=batch_size)
        eig = solve_eigenpairs(spec.build(ref_model, data), spec, ref_model, data, k=k, tol=hessian_tol,
                               seed=seed)  # fmt: skip
        assert eig.vectors is not None
        return eig.vectors.to(dtype=fm.dtype, device=fm.device), {
            "lambda_max": float(eig.values[0]), "hessian_eigenvalues": eig.values.tolist(),
            "hessian_converged": eig.converged.tolist(),
        }  # fmt: skip
    v = _update(losses, ref)
    if float(v.norm()) == 0:
        raise ValueError("the update at the reference step is zero; choose another reference")
    return (v / v.norm())[:, None], {}


def _update(losses: _Losses, ref: int) -> torch.Tensor:
    """``θ_{ref+1} − θ_ref``, the step taken at the reference checkpoint."""
    after = FunctionalModel(losses.model_at(ref + 1), mode="eval").parameters_vector()
    return after - FunctionalModel(losses.model_at(ref), mode="eval").parameters_vector()


def _projections(
    losses: _Losses, chosen: torch.Tensor, V: torch.Tensor, ref: int, window: list[int]
) -> tuple[torch.Tensor, list[float] | None]:
    """Step 5: ``p_i = Q_i · u`` for the chosen examples, ``Q_i = Σ_{t ∈ W'} Vᵀ ∇ℓ_i(θ_t)``, and the axis
    ``u``: 1 for one direction; for several, the update's component in their span ``u ∝ Vᵀ(θ_{ref+1} −
    θ_ref)``, or without a next checkpoint the top right singular vector of ``Q``."""
    if not chosen.numel():
        return torch.zeros(0, dtype=torch.float64), None
    from .per_example import iter_per_example_gradients, prepare

    sel_sorted = torch.sort(chosen).values
    xs, ys = _rows(losses.source, sel_sorted)
    Q = torch.zeros(chosen.numel(), V.shape[1], dtype=torch.float64)
    for t in window:
        ctx = prepare(losses.model_at(t), (xs, ys), loss=losses.loss, chunk_size=256)
        Q += torch.cat([(G @ V).double().cpu() for G, _ in iter_per_example_gradients(ctx)])
    if V.shape[1] > 1 and ref + 1 < losses.L.shape[0]:  # the update's component in the top eigenspace
        axis = (V.T @ _update(losses, ref)).double().cpu()
        axis = axis / axis.norm()
    else:
        axis = torch.linalg.svd(Q, full_matrices=False).Vh[0]  # the common axis of the projections
        axis = axis * (1.0 if float(axis[0]) >= 0 else -1.0)
    proj_sorted = Q @ axis
    position = {int(i): j for j, i in enumerate(sel_sorted)}
    return torch.stack([proj_sorted[position[int(i)]] for i in chosen]), axis.tolist()


def _group_statistics(
    groups: dict[str, list[int]], L: torch.Tensor, delta: torch.Tensor, spike: int | None
) -> dict[str, Any]:
    """Step 6: each group's mean loss per checkpoint, its share ``Σ_{i∈G} Δ_ti / Σ_i Δ_ti`` of every step's
    change (at the spike: ``spike_share``; over the rising steps: ``rise_share``) and the ``alternation``,
    the correlation of the two groups' mean-loss changes (``None`` when a group is empty or constant)."""
    total_delta = delta.sum(1)  # [T-1]
    rising = delta.mean(1) > 0
    group_loss, step_share, spike_share, rise_share = [], [], {}, {}
    for name, members in groups.items():
        idx = torch.tensor(members, dtype=torch.long)
        gl = L[:, idx].mean(1) if members else torch.full((L.shape[0],), float("nan"), dtype=torch.float64)
        gd = delta[:, idx].sum(1) if members else torch.zeros(delta.shape[0], dtype=torch.float64)
        group_loss.append(gl)
        step_share.append(torch.where(total_delta != 0, gd / total_delta, torch.full_like(gd, float("nan"))))
        spike_share[name] = float(gd[spike] / total_delta[spike]) if spike is not None else float("nan")
        rise_share[name] = (
            float(gd[rising].sum() / total_delta[rising].sum()) if bool(rising.any()) else float("nan")
        )
    alternation = None
    if all(groups.values()):
        a = torch.stack(group_loss)[:, 1:] - torch.stack(group_loss)[:, :-1]
        if float(a[0].std()) > 0 and float(a[1].std()) > 0:
            alternation = float(torch.corrcoef(a)[0, 1])
    return {"group_loss": torch.stack(group_loss), "group_step_share": torch.stack(step_share),
            "spike_share": spike_share, "rise_share": rise_share, "alternation": alternation}  # fmt: skip


def opposing_signals(
    checkpoints: Any,
    data: Any,
    *,
    steps: Sequence[Any] | None = None,
    model: nn.Module | None = None,
    loss: str | Callable = "auto",
    n_examples: int | None = None,
    score: str = "spike",
    window: int = 1,
    max_fraction: float | None = None,
    min_gap: float | None = None,
    direction: str = "update",
    reference: Any = None,
    span: int = 1,
    k: int = 1,
    batch_size: int | None = 1024,
    hessian_tol: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> OpposingSignalsResult:
    """Opposing-signal groups over consecutive checkpoints (module docstring).

    ``checkpoints``: a run (or path) — its checkpoints at ``steps`` (default all) — or models / state dicts
    (with ``model=``), in training order. ``score``: ``"spike"`` (default: the per-example loss change at
    the instability, summed over ``window`` steps on either side of it) or ``"oscillation"`` (module
    docstring, step 3). ``n_examples``: how many to select; by default those above the widest relative gap
    of the sorted scores in the top ``max_fraction`` — for ``"spike"`` (``max_fraction`` 0.5, ``min_gap`` 4)
    nothing when no ratio reaches ``min_gap`` or the loss never rose; for ``"oscillation"``
    (``max_fraction`` 0.1, ``min_gap`` 2) the top ``max_fraction`` then.
    ``direction``: ``"update"`` or ``"hessian"`` (top-``k`` eigenvectors at the reference, Lanczos to
    ``hessian_tol``). ``reference``: the step to split at (default: the one before the largest loss spike);
    ``span``: checkpoints from the reference on whose gradient projections are summed.
    """
    t0 = time.perf_counter()
    check_int("n_examples", n_examples, min=1, optional=True)
    check_choice("score", score, SCORES)
    check_int("window", window, min=0)
    check_float("max_fraction", max_fraction, min=0, max=1, min_open=True, optional=True)
    check_float("min_gap", min_gap, min=1, optional=True)
    max_fraction = max_fraction if max_fraction is not None else 0.5 if score == "spike" else 0.1
    min_gap = min_gap if min_gap is not None else 4.0 if score == "spike" else 2.0
    check_choice("direction", direction, DIRECTIONS)
    check_int("batch_size", batch_size, min=1, optional=True)
    check_int("seed", seed)
    check_int("span", span, min=1)
    check_int("k", k, min=1)
    losses = _checkpoint_losses(checkpoints, data, steps=steps, model=model, loss=loss, batch_size=batch_size,
                                device=device)  # fmt: skip
    L, labels = losses.L, losses.labels
    delta = L[1:] - L[:-1]  # [T-1, N]
    spike, ref = _reference(delta.mean(1), labels, reference)
    sel = _select(L, delta, score=score, ref=ref, spike=spike, reference=reference, n_examples=n_examples,
                  window=window, max_fraction=max_fraction, min_gap=min_gap)  # fmt: skip
    if direction == "update" and ref == len(labels) - 1:
        raise ValueError("direction='update' needs a checkpoint after the reference one")
    V, dir_meta = _direction(losses, data, ref, direction=direction, k=k, hessian_tol=hessian_tol, seed=seed,
                             batch_size=batch_size)  # fmt: skip
    proj_window = list(range(ref, min(ref + span, len(labels))))
    projections, axis = _projections(losses, sel.chosen, V, ref, proj_window)
    if axis is not None:
        dir_meta["axis_in_eigenbasis"] = axis
    selected = [int(i) for i in sel.chosen]
    groups = {
        GROUP_NAMES[0]: [i for i, p in zip(selected, projections.tolist()) if p > 0],
        GROUP_NAMES[1]: [i for i, p in zip(selected, projections.tolist()) if p < 0],
    }
    settings = {"n_examples": n_examples, "score": score, "window": window, "max_fraction": max_fraction,
                "min_gap": min_gap, "direction": direction, "reference": reference, "span": span, "k": k,
                "batch_size": batch_size, "hessian_tol": hessian_tol}  # fmt: skip
    meta = make_meta(
        "opposing_signals", model=losses.model_at(ref), params=settings, started=t0, seed=seed,
        loss=losses.loss.name, n_samples=int(L.shape[1]), n_checkpoints=len(labels), mode="eval",
        reference_index=ref,
        score_definition=("sum_t |l_i(t+1) - l_i(t)| - |l_i(T) - l_i(0)|" if score == "oscillation" else
                          f"sum over the {window} step(s) either side of the spike of |l_i(t+1) - l_i(t)|"),
        selection=sel.how, selection_gap_ratio=sel.gap, projection_steps=[labels[t] for t in proj_window],
        direction_definition=("top Hessian eigenvector of the mean loss at the reference checkpoint"
                              if direction == "hessian" else "unit update theta(ref+1) - theta(ref)"),
        **dir_meta,
    )  # fmt: skip
    return OpposingSignalsResult(
        steps=labels, mean_loss=L.mean(1), scores=sel.scores, threshold=sel.threshold, selected=selected,
        projections=projections, example_loss=L[:, sel.chosen].T.contiguous(), groups=groups,
        spike_index=spike, reference_step=labels[ref], direction=direction, meta=meta,
        **_group_statistics(groups, L, delta, spike),
    )  # fmt: skip


__all__ = ["DIRECTIONS", "OpposingSignalsResult", "opposing_signals"]
