"""Loss-landscape slices: the loss (and accuracy) on a 1-D line or a 2-D plane through a checkpoint.

``L(θ + a d₁ [+ b d₂])`` on a grid of ``(a, b)`` around ``θ`` (the selected parameters; buffers and the
other parameters stay fixed), with the loss the dataset mean ``(1/N) Σ_i ℓ_i`` (float64 accumulation)
and the accuracy where targets are class labels (or one-hot rows). Directions (``directions=``):

* ``"random"`` — filter-normalised Gaussian directions (Li, Xu, Taylor, Studer & Goldstein 2018): for
  every parameter with ≥ 2 dims (linear/conv/embedding weights) each *filter* — the slice along dim 0
  (an output unit's row, a conv output channel) — is rescaled to the norm of the same filter of ``θ``:
  ``d_f ← d_f · ‖θ_f‖ / ‖d_f‖``. Biases and BatchNorm/LayerNorm parameters (≤ 1 dim) are zeroed in the
  direction, as in Li et al.'s ``ignore="biasbn"`` (``bias_bn="copy"``: ``d = θ`` for them, their other
  option). Random direction ``j`` (0-based) is drawn from a CPU generator seeded with
  ``seed + LANDSCAPE_DIRECTION_OFFSET + j`` (:mod:`~dynascope.probes.seeds`; ``seed`` starts Lanczos).
* ``"hessian"`` — the top eigenvectors of the Hessian (unit norm, :func:`hessian_eigenvalues`): the
  ``j``-th ``"hessian"`` entry is ``v_{j+1}``. Along ``v₁`` the slice's curvature at 0 is ``λ₁``.
* ``"pca"`` — the principal directions (unit norm) of the trajectory's differences ``θ_t − θ`` (centred
  PCA, as Li et al. §7 with scikit-learn), with the variance each explains reported.
* a model or state dict — the direction ``θ_other − θ`` to it (``a = 1`` is the other model), optionally
  after permuting the other model's hidden units to align with this one (``align=True``, weight matching);
* a ``[P]`` tensor — used as given.

A string gives two directions of that kind (a plane); a list of one or two entries gives a line or a
plane. BatchNorm statistics: ``bn="frozen"`` (default) keeps the checkpoint's running statistics at
every grid point (eval mode); ``bn="recompute"`` re-estimates them at every point from ``data`` (one
pass, see :func:`~dynascope.probes.connectivity.reestimate_batchnorm`) and then evaluates in eval mode.
Frozen grid points are evaluated ``points_per_batch`` at a time with ``vmap`` over stacked parameters
(one data pass per batch of points); recomputed ones one at a time.

Trajectory (``trajectory=``): checkpoints (a run, models or state dicts, see
:mod:`dynascope.probes.trajectory`) projected on the plane: coordinates ``c_t`` minimise
``‖θ_t − θ − D c_t‖`` (least squares; for orthonormal PCA directions these are the dot products) and
``in_plane`` is the fraction of ``‖θ_t − θ‖²`` the projection keeps. The loss at each checkpoint (its
own parameters, the centre's buffers unless ``bn="recompute"``) is reported beside it.

Memory (``memory_budget``, :mod:`~dynascope.probes.budget`; :func:`plan_landscape`): the vectors held are

    (1 + d + T)·P·itemsize + 4·c·P·itemsize + 3·T·r·8

— the centre θ, the ``d`` directions, the ``T`` trajectory checkpoints (``T = 0`` without one), a block of
``c`` grid points (``θ + C D``, its product ``C D`` and the vmapped forward's copies of the points'
parameters: 3.6 vectors a point measured on an MLP, ``c ≤ points_per_batch``) and the float64 work of the
trajectory's PCA and projection over ``r`` coordinates at a time (``r = P`` where it fits: the centred
differences, their Gram and projections are then formed at once). Where the budget binds, ``c`` and then
``r`` shrink (the same numbers to rounding); below ``c = r = 1`` a
:class:`~dynascope.probes.budget.MemoryBudgetError` names the knob. The model's own activations for ``c``
points are on top. ``"hessian"`` directions run :func:`hessian_eigenvalues` within the same budget.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import vmap

from .budget import largest, names_the_knob, resolve_budget, too_small
from .connectivity import _batchnorms, _is_onehot, reestimate_batchnorm
from .functional import FunctionalModel
from .losses import Loss, resolve_loss
from .memory import peak_memory
from .results import Result, make_meta, to_jsonable
from .seeds import LANDSCAPE_DIRECTION_OFFSET
from .trajectory import checkpoint_models
from .validation import check_choice, check_float, check_int

DIRECTION_KINDS = ("random", "hessian", "pca")
BN_MODES = ("frozen", "recompute")


@dataclass(frozen=True, kw_only=True)
class LandscapeResult(Result):
    """A 1-D or 2-D slice of the loss.

    ``coords``: the grid along each direction (1 or 2 lists); ``loss`` ``[r₀]`` or ``[r₀, r₁]`` (entry
    ``[i, j]`` at ``(coords[0][i], coords[1][j])``), ``accuracy`` the same or ``None``; ``kinds`` and
    ``norms`` of the directions; ``center_loss``; ``eigenvalues`` of Hessian directions (else ``None``);
    ``explained_variance`` of PCA directions (ratio per direction, else ``None``); the trajectory, when
    given: ``trajectory_steps``, ``trajectory_coords`` ``[T, k]``, ``trajectory_in_plane`` ``[T]``,
    ``trajectory_loss`` ``[T]``. ``directions`` ``[k, P]`` (left out of ``to_dict``).
    """

    omitted: ClassVar[tuple[str, ...]] = ("directions",)

    coords: list[list[float]]
    loss: torch.Tensor
    accuracy: torch.Tensor | None
    kinds: list[str]
    norms: list[float]
    center_loss: float
    eigenvalues: list[float] | None = None
    explained_variance: list[float] | None = None
    trajectory_steps: list[Any] | None = None
    trajectory_coords: torch.Tensor | None = None
    trajectory_in_plane: torch.Tensor | None = None
    trajectory_loss: torch.Tensor | None = None
    directions: torch.Tensor | None = None

    @property
    def dims(self) -> int:
        return len(self.coords)

    def to_frame(self):
        """One row per grid point: ``a`` (and ``b``), ``loss``, ``accuracy`` (when measured)."""
        import numpy as np
        import pandas as pd

        if self.dims == 1:
            cols: dict[str, Any] = {"a": self.coords[0], "loss": self.loss.reshape(-1).tolist()}
        else:
            A, B = np.meshgrid(self.coords[0], self.coords[1], indexing="ij")
            cols = {"a": A.reshape(-1), "b": B.reshape(-1), "loss": self.loss.reshape(-1).tolist()}
        if self.accuracy is not None:
            cols["accuracy"] = self.accuracy.reshape(-1).tolist()
        return pd.DataFrame(cols)

    def trajectory_frame(self):
        """One row per checkpoint: ``step, a (, b), in_plane, loss`` (empty without a trajectory)."""
        import pandas as pd

        if self.trajectory_coords is None:
            return pd.DataFrame(columns=["step", "a", "b", "in_plane", "loss"][: 3 + self.dims])
        c = torch.as_tensor(self.trajectory_coords).reshape(-1, self.dims)
        cols: dict[str, Any] = {
            "step": list(self.trajectory_steps or range(c.shape[0])),
            "a": c[:, 0].tolist(),
        }
        if self.dims == 2:
            cols["b"] = c[:, 1].tolist()
        cols["in_plane"] = torch.as_tensor(self.trajectory_in_plane).tolist()
        cols["loss"] = torch.as_tensor(self.trajectory_loss).tolist()
        return pd.DataFrame(cols)


# ------------------------------------------------------------------------------------------ directions
def filter_normalized_direction(fm: FunctionalModel, *, seed: int, bias_bn: str = "zero") -> torch.Tensor:
    """A Gaussian direction with every filter rescaled to the norm of ``θ``'s filter (module docstring)."""
    check_choice("bias_bn", bias_bn, ("zero", "copy"))
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for name in fm.names:
        w = fm.params[name]
        if w.dim() <= 1:
            parts.append(torch.zeros_like(w) if bias_bn == "zero" else w.clone())
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        scale = wn / dn.clamp_min(1e-10)
        parts.append(d * scale.reshape(-1, *([1] * (w.dim() - 1))))
    return fm.space.flatten(parts)


def _state_vector(
    fm: FunctionalModel, other: nn.Module | Mapping[str, torch.Tensor], what: str
) -> torch.Tensor:
    """The selected parameters of another model / state dict, flattened like ``fm``."""
    state = other.state_dict() if isinstance(other, nn.Module) else other
    missing = [n for n in fm.names if n not in state]
    if missing:
        raise ValueError(f"{what} has no parameters {missing[:5]} (state dict keys differ from the model's)")
    parts = []
    for n, shape in zip(fm.names, fm.space.shapes):
        t = torch.as_tensor(state[n])
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{what}: parameter {n!r} has shape {tuple(t.shape)}; the model's is {tuple(shape)}"
            )
        parts.append(t.detach().to(device=fm.device, dtype=fm.dtype))
    return fm.space.flatten(parts)


LANDSCAPE_FORMULA = (
    "(1 + d + T)·P·itemsize (centre, d directions, T trajectory checkpoints) + 4·c·P·itemsize (c grid points "
    "per batch, their product and the vmapped forward's parameter copies) + 3·T·r·8 (float64 PCA / "
    "projection work over r coordinates at a time)"
)


def plan_landscape(
    size: int, itemsize: int, *, n_directions: int, n_trajectory: int, points_per_batch: int, budget: int
) -> dict[str, Any]:
    """The plan within ``budget`` bytes (module docstring): ``points_per_batch`` grid points per batch
    (``c``) and ``coordinate_chunk`` coordinates of the trajectory's float64 work (``r``), the largest that
    fit, ``c`` shrinking first; :class:`MemoryBudgetError` below ``c = r = 1``."""
    T = n_trajectory

    def need(c: int, r: int) -> int:
        return (1 + n_directions + T + 4 * c) * size * itemsize + 3 * T * r * 8

    r = size if T else 0
    c = largest(lambda c: need(c, r) <= budget, 1, points_per_batch)
    if c is None and T:
        r = largest(lambda r: need(1, r) <= budget, 1, size) or 0
        c = 1 if r else None
    if c is None:
        raise too_small("loss_landscape", budget, need(1, min(T, 1)),
                        "the centre, the directions, the trajectory and one grid point")  # fmt: skip
    return {"memory_budget": budget, "memory_formula": LANDSCAPE_FORMULA, "vector_bytes": need(c, r),
            "points_per_batch_used": c, "coordinate_chunk": r,
            "budget_binds": c < points_per_batch or (T > 0 and r < size)}  # fmt: skip


def _chunks(size: int, cols: int) -> list[slice]:
    return [slice(lo, lo + cols) for lo in range(0, size, max(cols, 1))]


def _pca(
    traj: torch.Tensor, theta: torch.Tensor, k: int, cols: int | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Top-``k`` principal directions ``[k, P]`` (unit rows) of the differences ``traj − θ`` (rows, centred)
    and the ratio of variance each explains; float64 work over ``cols`` coordinates at a time (default
    all; the differences are never formed whole)."""
    parts = _chunks(traj.shape[1], cols or traj.shape[1])

    def centred(sl: slice) -> torch.Tensor:
        X = (traj[:, sl] - theta[sl]).double()
        return X - X.mean(dim=0, keepdim=True)

    gram = sum((X @ X.T for X in map(centred, parts)), torch.zeros((), dtype=torch.float64))
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    total = float(evals.sum())
    if total <= 0 or int((evals > 1e-12 * total).sum()) < k:
        raise ValueError(f"the trajectory spans fewer than {k} directions; pass more distinct checkpoints")
    dirs = torch.cat([(evecs[:, :k].T @ centred(sl)) / evals[:k].sqrt()[:, None] for sl in parts], dim=1)
    return dirs, [float(e) / total for e in evals[:k]]


def _project(
    D: torch.Tensor, traj: torch.Tensor, theta: torch.Tensor, cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coordinates ``[T, k]`` of the rows of ``traj − θ`` in ``span(D)`` and the fraction of
    each row's squared norm the projection keeps; float64 work over ``cols`` coordinates at a time."""
    parts = _chunks(D.shape[1], cols or D.shape[1])
    zero = torch.zeros((), dtype=torch.float64)

    def deltas(sl: slice) -> torch.Tensor:
        return (traj[:, sl] - theta[sl]).double()

    G = sum((D[:, sl].double() @ D[:, sl].double().T for sl in parts), zero)
    B = sum((D[:, sl].double() @ deltas(sl).T for sl in parts), zero)
    C = torch.linalg.solve(G, B).T
    kept = sum(((C @ D[:, sl].double()).pow(2).sum(1) for sl in parts), zero)
    sq = sum((deltas(sl).pow(2).sum(1) for sl in parts), zero)
    frac = torch.where(sq > 0, kept / sq.clamp_min(1e-300), torch.ones_like(sq))
    return C, frac


# ------------------------------------------------------------------------------------------ evaluation
class _Evaluator:
    """Dataset-mean loss and accuracy at many parameter vectors of one model."""

    def __init__(self, fm: FunctionalModel, data: Any, loss: Loss, batch_size: int | None, bn: str) -> None:
        self.fm, self.loss, self.bn = fm, loss, bn
        self.source = fm.batches(data, batch_size)
        self.n = self.source.num_samples()
        self.work: nn.Module | None = None

    def _correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Correct predictions per point (``out`` ``[K, B, C]``), or ``None`` when not classification."""
        if out.dim() != 3:
            return None
        if not y.is_floating_point() and y.dim() == 1:
            return (out.argmax(-1) == y).sum(-1)
        if _is_onehot(y, out[0]):
            return (out.argmax(-1) == y.argmax(-1)).sum(-1)
        return None

    def batched(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss and accuracy at the rows of ``thetas`` ``[K, P]`` (frozen buffers, one vmap per batch)."""
        params = {n: t.movedim(-1, 0) for n, t in self.fm.space.split(thetas.T).items()}
        total = torch.zeros(thetas.shape[0], dtype=torch.float64)
        correct: torch.Tensor | None = torch.zeros(thetas.shape[0], dtype=torch.float64)
        with torch.no_grad(), self.fm.guard():
            for b in self.source:
                out = vmap(lambda p: self.fm(p, b.x))(params)  # noqa: B023
                total += vmap(lambda o: self.loss.per_sample(o, b.y))(out).double().sum(-1).cpu()  # noqa: B023
                c = self._correct(out, b.y)
                correct = None if (c is None or correct is None) else correct + c.double().cpu()
        return total / self.n, (None if correct is None else correct / self.n)

    def single(self, theta: torch.Tensor) -> tuple[float, float | None]:
        """Loss and accuracy at one vector, BatchNorm statistics re-estimated there first."""
        if self.work is None:
            self.work = copy.deepcopy(self.fm.model)
        live = dict(self.work.named_parameters())
        with torch.no_grad():
            for n, t in self.fm.space.split(theta).items():
                live[n].copy_(t)
        reestimate_batchnorm(self.work, self.source)
        fm = FunctionalModel(self.work, params=self.fm.names, mode="eval")
        saved, self.fm = self.fm, fm
        try:
            loss, acc = self.batched(theta[None])
        finally:
            self.fm = saved
        return float(loss[0]), (None if acc is None else float(acc[0]))

    def evaluate(
        self, thetas: torch.Tensor | Callable[[int, int], torch.Tensor], n: int, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss and accuracy at ``n`` points, ``chunk`` at a time: the rows of ``thetas`` ``[n, P]``, or
        ``thetas(lo, hi)`` building rows ``lo..hi−1`` on demand (memory ``chunk · P``, never ``n · P``)."""
        losses, accs = [], []
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            block = thetas(lo, hi) if callable(thetas) else thetas[lo:hi]
            if self.bn == "recompute":
                for row in block:
                    v, a = self.single(row)
                    losses.append(torch.tensor([v], dtype=torch.float64))
                    accs.append(None if a is None else torch.tensor([a], dtype=torch.float64))
            else:
                v, a = self.batched(block)
                losses.append(v)
                accs.append(a)
        acc = None if any(a is None for a in accs) else torch.cat(accs)  # type: ignore[arg-type]
        return torch.cat(losses), acc


def _per_axis(span: Any, dims: int) -> list[Any]:
    """``span`` for each axis: a pair of spans (``[(lo_a, hi_a), (lo_b, hi_b)]``) is per axis, else shared."""
    if isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(v, (tuple, list)) for v in span):
        return list(span)[:dims]
    return [span] * dims


def _axis(span: Any, resolution: int) -> list[float]:
    if isinstance(span, (tuple, list)):
        if len(span) != 2:
            raise ValueError(f"span must be a number or a (low, high) pair; got {span!r}")
        lo = check_float("span[0]", span[0])
        hi = check_float("span[1]", span[1])
        if not hi > lo:
            raise ValueError(f"span must have low < high; got {span!r}")
    else:
        hi = check_float("span", span, min=0, min_open=True)
        lo = -hi
    return torch.linspace(lo, hi, resolution, dtype=torch.float64).tolist()


def _direction_entries(directions: Any) -> list[Any]:
    if isinstance(directions, str):
        check_choice("directions", directions, DIRECTION_KINDS)
        return [directions, directions]
    if isinstance(directions, (nn.Module, Mapping, torch.Tensor)):
        return [directions]
    if isinstance(directions, Sequence) and 1 <= len(directions) <= 2:
        for d in directions:
            if isinstance(d, str):
                check_choice("directions entry", d, DIRECTION_KINDS)
            elif not isinstance(d, (nn.Module, Mapping, torch.Tensor)):
                raise ValueError(
                    "directions entries must be 'random', 'hessian', 'pca', a model, a state dict or a "
                    f"tensor; got {type(d).__name__}"
                )
        return list(directions)
    raise ValueError(
        "directions must be 'random', 'hessian' or 'pca' (a plane), or a list of one or two entries "
        f"(kinds, models, state dicts or [P] tensors); got {directions!r}"
    )


# ------------------------------------------------------------------------------------------ probe
@dataclass
class _Directions:
    """The rows of ``D`` (one per axis) and what each is, plus what finding them recorded."""

    rows: list[torch.Tensor] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    eigenvalues: list[float] | None = None
    explained: list[float] | None = None
    alignment: list[str] = field(default_factory=list)
    hessian_meta: dict[str, Any] = field(default_factory=dict)


def _trajectory_vectors(
    fm: FunctionalModel, trajectory: Any, steps: Sequence[Any] | None
) -> tuple[torch.Tensor, list[Any]]:
    """The trajectory's checkpoints as parameter vectors ``[T, P]`` and their step labels."""
    ck = checkpoint_models(trajectory, steps, model=fm.model, name="trajectory")
    thetas = [_state_vector(fm, m, "a trajectory checkpoint") for m in ck.models]
    if not thetas:
        raise ValueError("trajectory holds no checkpoints")
    labels = list(ck.steps) if ck.steps is not None else list(range(len(thetas)))
    return torch.stack(thetas), labels


def _hessian_directions(
    fm: FunctionalModel,
    data: Any,
    k: int,
    resolved: Any,
    tol: float,
    batch_size: int | None,
    seed: int,
    found: _Directions,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """The top-``k`` Hessian eigenvectors as rows; eigenvalues and solver record into ``found``."""
    from .hessian import hessian_eigenvalues

    res = hessian_eigenvalues(fm.model, data, k=k, loss=resolved, tol=tol, params=fm.names,
                              batch_size=batch_size, seed=seed, check_determinism=False,
                              memory_budget=memory_budget)  # fmt: skip
    assert res.vectors is not None
    found.eigenvalues = [float(v) for v in res.values]
    found.hessian_meta = {"hessian_converged": res.converged.tolist(),
                          "hessian_residuals": res.residuals.tolist(),
                          "hessian_n_matvecs": res.n_matvecs}  # fmt: skip
    return res.vectors.T.to(dtype=fm.dtype, device=fm.device)


def _model_direction(
    fm: FunctionalModel, theta: torch.Tensor, other: Any, align: bool, found: _Directions
) -> None:
    """The direction from this model to ``other`` (a model or state dict), permutation-aligned first when
    ``align``."""
    if align:
        if not isinstance(other, nn.Module):
            raise ValueError("align=True needs a model (not a state dict) as the direction")
        from .alignment import weight_matching

        other = weight_matching(fm.model, other)
        found.alignment.append("weight matching")
    found.rows.append(_state_vector(fm, other, "the direction's model") - theta)
    found.kinds.append("to model" + (" (permutation-aligned)" if align else ""))


def _directions(
    fm: FunctionalModel,
    theta: torch.Tensor,
    data: Any,
    entries: list[Any],
    *,
    traj: torch.Tensor | None,
    resolved: Any,
    bias_bn: str,
    align: bool,
    hessian_tol: float,
    batch_size: int | None,
    seed: int,
    cols: int | None = None,
    memory_budget: int | None = None,
) -> _Directions:
    """One row per entry of ``directions``, in order (module docstring); the PCA's float64 work over
    ``cols`` coordinates at a time, Hessian eigenvectors within ``memory_budget``."""
    found = _Directions()
    count = {kind: sum(1 for e in entries if isinstance(e, str) and e == kind) for kind in DIRECTION_KINDS}
    named: dict[str, list[torch.Tensor]] = {}
    if count["hessian"]:
        vecs = _hessian_directions(fm, data, count["hessian"], resolved, hessian_tol, batch_size, seed, found,
                                   memory_budget)  # fmt: skip
        named["hessian"] = list(vecs)
    if count["pca"]:
        assert traj is not None
        pca_dirs, found.explained = _pca(traj, theta, count["pca"], cols)
        named["pca"] = list(pca_dirs.to(fm.dtype))
    used = dict.fromkeys(DIRECTION_KINDS, 0)
    for e in entries:
        if isinstance(e, str):
            i = used[e]
            used[e] += 1
            if e == "random":
                seed_i = seed + LANDSCAPE_DIRECTION_OFFSET + i
                found.rows.append(filter_normalized_direction(fm, seed=seed_i, bias_bn=bias_bn))
                found.kinds.append("random (filter-normalised)")
            else:
                found.rows.append(named[e][i])
                what = "hessian eigenvector" if e == "hessian" else "trajectory PCA"
                found.kinds.append(f"{what} {i + 1}")
        elif isinstance(e, torch.Tensor):
            if e.shape != (fm.size,):
                raise ValueError(f"a direction tensor must have shape [{fm.size}]; got {tuple(e.shape)}")
            found.rows.append(e.detach().to(device=fm.device, dtype=fm.dtype))
            found.kinds.append("given vector")
        else:
            _model_direction(fm, theta, e, align, found)
    return found


def _plane(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    """``D`` (rows stacked) and the rows' norms; a zero or a parallel pair of directions is an error."""
    D = torch.stack(rows)
    norms = [float(r.double().norm()) for r in D]
    if any(n == 0 for n in norms):
        raise ValueError(f"a direction is zero (norms {norms}): e.g. the other model equals this one")
    if len(rows) == 2 and float(torch.linalg.matrix_rank(D.double())) < 2:
        raise ValueError("the two directions are parallel; they do not span a plane")
    return D, norms


def _grid(
    span: Any, resolution: int, n_axes: int, C: torch.Tensor | None
) -> tuple[Any, list[list[float]], torch.Tensor]:
    """The span (``"auto"`` resolved from the projected trajectory ``C``), each axis' coordinates and every
    grid point's coordinates ``[resolution^n_axes, n_axes]`` (float64)."""
    if span == "auto":
        assert C is not None
        reach = float(C.abs().max())
        span = round(1.25 * reach, 12) if reach > 0 else 1.0
    grids = [_axis(one, resolution) for one in _per_axis(span, n_axes)]
    axes = [torch.tensor(g, dtype=torch.float64) for g in grids]
    return span, grids, torch.cartesian_prod(*axes).reshape(-1, n_axes)


def loss_landscape(
    model: nn.Module,
    data: Any,
    *,
    directions: Any = "random",
    span: float | tuple[float, float] | str = 1.0,
    resolution: int = 21,
    loss: str | Callable = "auto",
    bn: str = "frozen",
    bias_bn: str = "zero",
    trajectory: Any = None,
    steps: Sequence[Any] | None = None,
    align: bool = False,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    points_per_batch: int = 16,
    hessian_tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> LandscapeResult:
    """The loss (and accuracy) on a line or plane through ``model``'s parameters (module docstring).

    ``span``: ``s`` (coordinates in ``[−s, s]``) or ``(low, high)``, the same on both axes (or one per
    axis: ``[(low_a, high_a), (low_b, high_b)]``), in units of
    each direction (filter-normalised random directions: ``1`` moves every filter by its own norm; unit
    eigen/PCA directions: parameter-space distance; a model direction: ``1`` reaches the model);
    ``"auto"`` (with a trajectory): ``1.25 ×`` the largest |coordinate| of the projected trajectory.
    ``resolution``: grid points per axis. ``trajectory`` / ``steps``: checkpoints to project on the plane
    (needed by ``"pca"``). ``align``: permute model directions' hidden units to this model first.
    ``memory_budget``: bytes of length-``P`` vectors held (default: half the available memory; formula and
    plan in the module docstring, recorded in ``meta`` with the measured peak).
    """
    t0 = time.perf_counter()
    check_int("resolution", resolution, min=2)
    check_int("points_per_batch", points_per_batch, min=1)
    check_int("seed", seed)
    check_choice("bn", bn, BN_MODES)
    check_choice("bias_bn", bias_bn, ("zero", "copy"))
    check_choice("align", align, (True, False))
    entries = _direction_entries(directions)
    if span == "auto":
        if trajectory is None:
            raise ValueError("span='auto' needs trajectory= (it is sized to the projected checkpoints)")
    else:
        for one in _per_axis(span, 2):
            _axis(one, resolution)  # validate before any work
    if trajectory is None and any(isinstance(e, str) and e == "pca" for e in entries):
        raise ValueError(
            "directions='pca' needs trajectory= (the checkpoints whose differences give the plane)"
        )
    fm = FunctionalModel(model, params=params, mode="eval", dtype=dtype, device=device)
    budget = resolve_budget(memory_budget, fm.device)
    with names_the_knob("loss_landscape", budget, LANDSCAPE_FORMULA), peak_memory(fm.device) as peak:
        res = _loss_landscape(
            fm, model, data, entries=entries, span=span, resolution=resolution, loss=loss, bn=bn,
            bias_bn=bias_bn, trajectory=trajectory, steps=steps, align=align, params=params,
            batch_size=batch_size, points_per_batch=points_per_batch, hessian_tol=hessian_tol, seed=seed,
            budget=budget, memory_budget=memory_budget, started=t0,
        )  # fmt: skip
    meta = {**res.meta, "measured_peak_bytes": peak.bytes, "measured_peak_how": peak.how}
    return dataclasses.replace(res, meta=meta)


def _loss_landscape(
    fm: FunctionalModel, model: nn.Module, data: Any, *, entries: list[Any], span: Any, resolution: int,
    loss: Any, bn: str, bias_bn: str, trajectory: Any, steps: Any, align: bool, params: Any,
    batch_size: int | None, points_per_batch: int, hessian_tol: float, seed: int, budget: int,
    memory_budget: int | None, started: float,
) -> LandscapeResult:  # fmt: skip
    """:func:`loss_landscape` after its checks, within ``budget`` bytes of vectors."""
    t0 = started
    theta = fm.parameters_vector()
    first = next(iter(fm.batches(data, batch_size)), None)
    if first is None:
        raise ValueError("the data holds no samples")
    resolved = resolve_loss(loss, first.y)
    bn_used = "frozen (the model has no BatchNorm)" if bn == "recompute" and not _batchnorms(fm.model) else bn
    traj, traj_steps = _trajectory_vectors(fm, trajectory, steps) if trajectory is not None else (None, None)
    itemsize = torch.empty((), dtype=fm.dtype).element_size()
    plan = plan_landscape(fm.size, itemsize, n_directions=len(entries), points_per_batch=points_per_batch,
                          n_trajectory=0 if traj is None else traj.shape[0], budget=budget)  # fmt: skip
    cols = plan["coordinate_chunk"] or None
    found = _directions(fm, theta, data, entries, traj=traj, resolved=resolved, bias_bn=bias_bn,
                        align=align, hessian_tol=hessian_tol, batch_size=batch_size, seed=seed, cols=cols,
                        memory_budget=memory_budget)  # fmt: skip
    D, norms = _plane(found.rows)
    C, frac = _project(D, traj, theta, cols) if traj is not None else (None, None)
    span, grids, coords = _grid(span, resolution, len(found.rows), C)
    C_grid = coords.to(device=fm.device, dtype=fm.dtype)

    def grid_points(lo: int, hi: int) -> torch.Tensor:
        return theta[None, :] + C_grid[lo:hi] @ D

    ev = _Evaluator(fm, data, resolved, batch_size, "recompute" if bn_used == "recompute" else "frozen")
    per_batch = plan["points_per_batch_used"]
    values, acc = ev.evaluate(grid_points, coords.shape[0], per_batch)
    center_loss, _ = ev.evaluate(theta[None], 1, 1)
    shape = [resolution] * len(found.rows)
    extra: dict[str, Any] = {}
    if traj is not None:
        tl, _ = ev.evaluate(traj, traj.shape[0], per_batch)
        extra = {"trajectory_steps": traj_steps, "trajectory_coords": C, "trajectory_in_plane": frac,
                 "trajectory_loss": tl}  # fmt: skip
    settings = {"directions": list(found.kinds), "span": to_jsonable(span),
                "resolution": resolution, "bn": bn, "bias_bn": bias_bn, "align": align, "params": params,
                "batch_size": batch_size, "points_per_batch": points_per_batch,
                "hessian_tol": hessian_tol, "memory_budget": memory_budget}  # fmt: skip
    meta = make_meta(
        "loss_landscape", model=model, params=settings, started=t0, seed=seed, loss=resolved.name,
        reduction=f"mean over {ev.n} samples", n_samples=ev.n, n_params=fm.size, mode="eval",
        batchnorm=("running statistics re-estimated from the data at every grid point"
                   if bn_used == "recompute"
                   else "running statistics frozen at the checkpoint's values (eval mode)"),
        bias_bn_in_random_directions=("zeroed (Li et al. 2018, ignore='biasbn')" if bias_bn == "zero"
                                      else "copied from the weights"),
        filter_definition="slice along dim 0 of every parameter with >= 2 dims",
        n_evaluations=int(coords.shape[0]) + 1 + (int(traj.shape[0]) if traj is not None else 0),
        alignment=found.alignment or None, **found.hessian_meta, **plan,
    )  # fmt: skip
    return LandscapeResult(
        coords=[list(g) for g in grids], loss=values.reshape(shape),
        accuracy=None if acc is None else acc.reshape(shape), kinds=found.kinds, norms=norms,
        center_loss=float(center_loss[0]), eigenvalues=found.eigenvalues, explained_variance=found.explained,
        directions=D.detach(), meta=meta, **extra,
    )  # fmt: skip


def landscape_trajectory(
    checkpoints: Any,
    data: Any,
    *,
    steps: Sequence[Any] | None = None,
    model: nn.Module | None = None,
    center: int = -1,
    directions: Any = "pca",
    span: float | tuple[float, float] | str = "auto",
    resolution: int = 21,
    loss: str | Callable = "auto",
    bn: str = "frozen",
    bias_bn: str = "zero",
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    points_per_batch: int = 16,
    hessian_tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> LandscapeResult:
    """The landscape around one checkpoint of a trajectory (default the last) with every checkpoint drawn
    on the plane: :func:`loss_landscape` of ``checkpoints[center]`` with ``trajectory=checkpoints``.
    ``checkpoints``: a run, a path, models or state dicts (with ``model=``); ``span="auto"``: see
    :func:`loss_landscape`; the other keywords are :func:`loss_landscape`'s. Memory: the checkpoints are
    held as models besides their vectors (``T·P`` more than ``memory_budget``'s formula counts)."""
    check_int("center", center)
    ck = checkpoint_models(checkpoints, steps, model=model)
    models = [copy.deepcopy(m) if ck.run is None else m for m in ck.models]
    if len(models) < 2:
        raise ValueError(f"landscape_trajectory needs at least 2 checkpoints; got {len(models)}")
    if not -len(models) <= center < len(models):
        raise ValueError(f"center must index one of the {len(models)} checkpoints; got {center}")
    labels = list(ck.steps) if ck.steps is not None else list(range(len(models)))
    res = loss_landscape(
        models[center], data, directions=directions, span=span, resolution=resolution, loss=loss, bn=bn,
        bias_bn=bias_bn, trajectory=models, steps=labels, params=params, batch_size=batch_size,
        points_per_batch=points_per_batch, hessian_tol=hessian_tol, seed=seed, dtype=dtype, device=device,
        memory_budget=memory_budget,
    )  # fmt: skip
    meta = dict(res.meta)
    meta["probe"] = "landscape_trajectory"
    meta["center_step"] = labels[center]
    return dataclasses.replace(res, meta=meta)


def landscape_between(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    align: bool = False,
    plane: bool = True,
    span: float | tuple[float, float] = (-0.5, 1.5),
    resolution: int = 21,
    loss: str | Callable = "auto",
    bn: str = "frozen",
    bias_bn: str = "zero",
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    points_per_batch: int = 16,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> LandscapeResult:
    """The loss around ``model_a`` along the direction to ``model_b`` (``a = 1`` is model B, after
    permuting its hidden units to align with A when ``align``) and, with ``plane``, a filter-normalised
    random direction: :func:`loss_landscape` with ``directions=[model_b, "random"]``. ``span``: the range
    along the direction to B; the random axis spans the same width, centred on 0. Both models are
    projected on the plane as a two-point trajectory (steps ``"a"``, ``"b"``)."""
    if align:
        from .alignment import weight_matching

        model_b = weight_matching(model_a, model_b)
    directions = [model_b, "random"] if plane else [model_b]
    lo, hi = (-float(span), float(span)) if not isinstance(span, (tuple, list)) else map(float, span)
    if plane:
        span = [(lo, hi), (-(hi - lo) / 2, (hi - lo) / 2)]
    res = loss_landscape(
        model_a, data, directions=directions, span=span, resolution=resolution,
        loss=loss, bn=bn, bias_bn=bias_bn, trajectory=[model_a, model_b], steps=["a", "b"], params=params,
        batch_size=batch_size, points_per_batch=points_per_batch, seed=seed, dtype=dtype, device=device,
        memory_budget=memory_budget,
    )  # fmt: skip
    meta = dict(res.meta)
    meta["probe"] = "landscape_between"
    meta["alignment"] = "weight matching" if align else None
    meta["checkpoint_hash_b"] = getattr(model_b, "dynascope_checkpoint_hash", None)
    kinds = ["to model B" + (" (permutation-aligned)" if align else ""), *res.kinds[1:]]
    return dataclasses.replace(res, kinds=kinds, meta=meta)


__all__ = [
    "BN_MODES",
    "DIRECTION_KINDS",
    "LandscapeResult",
    "filter_normalized_direction",
    "landscape_between",
    "landscape_trajectory",
    "loss_landscape",
    "plan_landscape",
]
