"""Neural collapse (Papyan, Han & Donoho 2020) and its imbalanced-data variant.

Features ``h_i ∈ R^d`` are the *input* of the classifier layer (an ``nn.Linear`` with weight
``W ∈ R^{C×d}`` and bias ``b``), captured by a forward hook that is removed afterwards (also on error).
All statistics are accumulated in float64 in two streaming passes over the data:

* pass 1: class counts ``n_c`` and sums → class means ``μ_c``;
* pass 2: within-class scatter ``Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ`` (exact, no cancellation),
  nearest-class-centre predictions and the network's predictions.

Definitions (``C`` classes, ``N`` samples, ``μ_G = (1/C) Σ_c μ_c`` the mean of the class means — equal
to the sample mean when classes are balanced — and ``M̃ = [μ_c − μ_G]_c ∈ R^{d×C}``):

* ``Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ``,  ``Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ``;
* NC1 ``= Tr(Σ_W Σ_B⁺)/C`` (``Σ_B⁺``: Hermitian pseudo-inverse, singular values below
  ``pinv_rtol · σ_max`` dropped); variant ``nc1_trace_ratio = Tr Σ_W / Tr Σ_B``;
* NC2 equinorm: ``std_c ‖μ_c − μ_G‖ / mean_c ‖μ_c − μ_G‖`` (population std), and the same for the rows
  ``w_c`` of ``W``; equiangularity: ``mean_{c<c'} |cos(μ̃_c, μ̃_c') + 1/(C−1)|`` (also for ``W``);
  ETF distance: ``‖ M̃ᵀM̃/‖M̃ᵀM̃‖_F − (I − 11ᵀ/C)/√(C−1) ‖_F`` (Gram of the raw centred means,
  Frobenius-normalised; ``‖I − 11ᵀ/C‖_F = √(C−1)``);
* NC3 ``= ‖ W/‖W‖_F − M̃ᵀ/‖M̃‖_F ‖²_F`` (squared Frobenius distance, in [0, 4]);
* NC4: fraction of samples on which ``argmin_c ‖h − μ_c‖₂`` equals the classifier's own prediction
  ``argmax_c (W h + b)_c`` (bias included).

Imbalanced data (features collapse to an *orthogonal frame* whose lengths grow with class size — e.g.
Dang et al. 2023, Thrampoulidis et al. 2022): class sizes; ``orthogonality_offdiag`` — the off-diagonal
mass ``‖Ĝ − diag Ĝ‖_F / ‖Ĝ‖_F`` of the cosine-normalised *uncentred* Gram matrix
``Ĝ_{cc'} = cos(μ_c, μ_c')`` (0 for an orthogonal frame); and whether the uncentred class-mean norms
``‖μ_c‖`` are ordered like the class sizes (``n_c > n_c'`` ⇒ ``‖μ_c‖ ≥ ‖μ_c'‖``, relative tolerance 1e-6),
with the Spearman rank correlation between sizes and norms.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..datasets.batching import as_batches
from .functional import ModeGuard, check_finite, check_mode
from .losses import check_model_input
from .results import Result, make_meta, train_randomness
from .trajectory import checkpoint_models
from .validation import check_float, check_int

__all__ = [
    "NeuralCollapseResult",
    "NeuralCollapseTrajectoryResult",
    "neural_collapse",
    "nc_trajectory",
    "find_classifier",
    "collapse_metrics",
]

NC_FIELDS = (
    "nc1",
    "nc1_trace_ratio",
    "nc2_equinorm",
    "nc2_equinorm_classifier",
    "nc2_equiangular",
    "nc2_equiangular_classifier",
    "nc2_etf_distance",
    "nc3",
    "nc4",
)


@dataclass(frozen=True, kw_only=True)
class NeuralCollapseResult(Result):
    """Neural-collapse metrics of one model on one dataset (see the module docstring for formulas)."""

    nc1: float
    nc1_trace_ratio: float
    nc2_equinorm: float
    nc2_equinorm_classifier: float
    nc2_equiangular: float
    nc2_equiangular_classifier: float
    nc2_etf_distance: float
    nc3: float
    nc4: float
    accuracy: float
    n_classes: int
    feature_dim: int
    n_samples: int
    class_sizes: list[int]
    class_mean_norms: list[float]
    class_mean_norms_uncentred: list[float]
    classifier_row_norms: list[float]
    orthogonality_offdiag: float
    norms_ordered_by_size: bool
    size_norm_spearman: float | None
    within_class_trace: float
    between_class_trace: float

    def to_frame(self):  # -> pandas.DataFrame
        """One row per class: size, centred / uncentred mean norms, classifier row norm; scalars repeated."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "class": list(range(self.n_classes)),
                "class_size": self.class_sizes,
                "class_mean_norm": self.class_mean_norms,
                "class_mean_norm_uncentred": self.class_mean_norms_uncentred,
                "classifier_row_norm": self.classifier_row_norms,
            }
        )
        for name in (*NC_FIELDS, "accuracy", "orthogonality_offdiag", "norms_ordered_by_size"):
            frame[name] = getattr(self, name)
        return frame


@dataclass(frozen=True, kw_only=True)
class NeuralCollapseTrajectoryResult(Result):
    """NC metrics over checkpoints: one entry per step in every list field."""

    former_names: ClassVar[tuple[str, ...]] = ("NeuralCollapseTrajectory",)

    steps: list[int]
    nc1: list[float]
    nc1_trace_ratio: list[float]
    nc2_equinorm: list[float]
    nc2_equinorm_classifier: list[float]
    nc2_equiangular: list[float]
    nc2_equiangular_classifier: list[float]
    nc2_etf_distance: list[float]
    nc3: list[float]
    nc4: list[float]
    accuracy: list[float]


# --------------------------------------------------------------------------- classifier / features
def find_classifier(model: nn.Module, classifier: nn.Linear | str | None = None) -> tuple[str, nn.Linear]:
    """Resolve the classifier layer: ``model.head`` if it is an ``nn.Linear``, else the last ``nn.Linear``
    in ``model.named_modules()`` order; a qualified name or a submodule of ``model`` may be given."""
    named = dict(model.named_modules())
    if classifier is None:
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear):
            return "head", head
        linears = [(n, m) for n, m in named.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "no nn.Linear classifier found in the model; pass classifier= (module or qualified name)"
            )
        return linears[-1]
    if isinstance(classifier, str):
        if classifier not in named:
            raise ValueError(f"classifier {classifier!r} is not a submodule of the model")
        module = named[classifier]
        if not isinstance(module, nn.Linear):
            raise TypeError(f"classifier {classifier!r} is a {type(module).__name__}, not an nn.Linear")
        return classifier, module
    if isinstance(classifier, nn.Module):
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear, got {type(classifier).__name__}")
        for n, m in named.items():
            if m is classifier:
                return n, classifier
        raise ValueError("the classifier module given is not a submodule of the model")
    raise TypeError(
        f"classifier must be None, a module name or an nn.Linear; got {type(classifier).__name__}"
    )


class _Capture:
    """Forward hook storing the classifier's input (features) and output (logits) of the last call."""

    def __init__(self, module: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.calls += 1
        self.features, self.logits = inputs[0].detach(), output.detach()

    def run(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls = 0
        model(x)
        if self.calls != 1:
            raise ValueError(
                f"the classifier layer ran {self.calls} times in one forward pass; "
                "neural_collapse needs exactly one call per forward"
            )
        h, z = self.features, self.logits
        assert h is not None and z is not None
        if h.dim() != 2 or z.dim() != 2 or h.shape[0] != x.shape[0]:
            raise ValueError(
                f"classifier input/output must be [batch, features]/[batch, classes]; got {tuple(h.shape)} "
                f"and {tuple(z.shape)} for a batch of {x.shape[0]}"
            )
        return h.to(torch.float64), z.to(torch.float64)

    def remove(self) -> None:
        self.handle.remove()


def _labels(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer labels ``[B]``; one-hot (or score) float targets ``[B, C]`` are reduced by argmax."""
    if y.is_floating_point():
        if y.dim() != 2:
            raise ValueError(f"float targets must be one-hot [batch, classes]; got {tuple(y.shape)}")
        y = y.argmax(dim=1)
    if y.dim() != 1:
        raise ValueError(f"class labels must be a 1-D integer tensor; got shape {tuple(y.shape)}")
    y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}); got range [{int(y.min())}, {int(y.max())}]")
    return y


# --------------------------------------------------------------------------- metrics from statistics
def _cosines(v: torch.Tensor) -> torch.Tensor:
    """Cosine matrix of the rows of ``v`` (zero rows give cosine 0)."""
    n = v.norm(dim=1, keepdim=True)
    u = v / torch.where(n > 0, n, torch.ones_like(n))
    return u @ u.T


def _equinorm(norms: torch.Tensor) -> float:
    mean = norms.mean()
    return float(norms.std(unbiased=False) / mean) if mean > 0 else float("nan")


def _equiangular(v: torch.Tensor) -> float:
    c = v.shape[0]
    if c < 2:
        return float("nan")
    iu = torch.triu_indices(c, c, offset=1)
    cos = _cosines(v)[iu[0], iu[1]]
    return float((cos + 1.0 / (c - 1)).abs().mean())


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def collapse_metrics(
    means: torch.Tensor,
    counts: torch.Tensor,
    within_scatter: torch.Tensor,
    weight: torch.Tensor,
    *,
    pinv_rtol: float = 1e-6,
) -> dict[str, Any]:
    """NC1–NC3 and the imbalanced-case statistics from class means ``[C, d]``, class counts ``[C]``,
    the within-class scatter ``Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ`` ``[d, d]`` and the classifier weight
    ``[C, d]`` (all converted to float64). Formulas: module docstring."""
    means, within_scatter, weight = (t.to(torch.float64) for t in (means, within_scatter, weight))
    counts = counts.to(torch.float64)
    n_classes = means.shape[0]
    n = float(counts.sum())
    global_mean = means.mean(dim=0)
    centred = means - global_mean  # rows μ_c − μ_G, i.e. M̃ᵀ
    sigma_w = within_scatter / n
    sigma_b = centred.T @ centred / n_classes
    sigma_b_pinv = torch.linalg.pinv(sigma_b, rtol=pinv_rtol, hermitian=True)
    tr_w, tr_b = float(torch.trace(sigma_w)), float(torch.trace(sigma_b))

    gram = centred @ centred.T
    gram_norm = torch.linalg.matrix_norm(gram)
    etf = (torch.eye(n_classes, dtype=torch.float64) - 1.0 / n_classes) / max(n_classes - 1, 1) ** 0.5
    etf_distance = float(torch.linalg.matrix_norm(gram / gram_norm - etf)) if gram_norm > 0 else float("nan")
    w_norm, m_norm = torch.linalg.matrix_norm(weight), torch.linalg.matrix_norm(centred)
    nc3 = (
        float(torch.linalg.matrix_norm(weight / w_norm - centred / m_norm) ** 2)
        if w_norm > 0 and m_norm > 0
        else float("nan")
    )

    centred_norms = centred.norm(dim=1)
    raw_norms = means.norm(dim=1)
    cos = _cosines(means)
    offdiag = cos - torch.diag(torch.diag(cos))
    cos_norm = torch.linalg.matrix_norm(cos)
    sizes = counts.cpu().numpy()
    norms_np = raw_norms.cpu().numpy()
    bigger = sizes[:, None] > sizes[None, :]
    tol = 1e-6 * float(norms_np.max(initial=0.0))
    ordered = bool(np.all((norms_np[:, None] >= norms_np[None, :] - tol)[bigger]))
    return {
        "nc1": float(torch.trace(sigma_w @ sigma_b_pinv)) / n_classes,
        "nc1_trace_ratio": tr_w / tr_b if tr_b > 0 else float("inf"),
        "nc2_equinorm": _equinorm(centred_norms),
        "nc2_equinorm_classifier": _equinorm(weight.norm(dim=1)),
        "nc2_equiangular": _equiangular(centred),
        "nc2_equiangular_classifier": _equiangular(weight),
        "nc2_etf_distance": etf_distance,
        "nc3": nc3,
        "class_mean_norms": centred_norms.tolist(),
        "class_mean_norms_uncentred": raw_norms.tolist(),
        "classifier_row_norms": weight.norm(dim=1).tolist(),
        "orthogonality_offdiag": float(torch.linalg.matrix_norm(offdiag) / cos_norm)
        if cos_norm > 0
        else float("nan"),
        "norms_ordered_by_size": ordered,
        "size_norm_spearman": _spearman(sizes, norms_np),
        "within_class_trace": tr_w,
        "between_class_trace": tr_b,
    }


# --------------------------------------------------------------------------- probe
def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def neural_collapse(
    model: nn.Module,
    data: Any,
    *,
    classifier: nn.Linear | str | None = None,
    n_classes: int | None = None,
    pinv_rtol: float = 1e-6,
    mode: str = "eval",
    batch_size: int | None = 1024,
    device: torch.device | str | None = None,
) -> NeuralCollapseResult:
    """Neural-collapse metrics NC1–NC4 (+ imbalanced-data statistics) of ``model`` on ``data``.

    ``classifier``: the final ``nn.Linear`` (module or qualified name; default ``model.head`` or the last
    ``nn.Linear``); its input is the feature vector. ``n_classes`` defaults to the classifier's
    ``out_features``. Targets: integer labels ``[N]`` or one-hot ``[N, C]`` (argmax). ``mode``: the
    train/eval mode of the forward passes (restored afterwards). Two float64 streaming passes
    (class means, then exact within-class scatter); every class must have at least one sample.
    """
    started = time.perf_counter()
    check_mode(mode)
    stochastic = train_randomness("neural_collapse", model, mode)
    if check_float("pinv_rtol", pinv_rtol, min=0, max=1) == 1:
        raise ValueError(f"pinv_rtol must be a finite number in [0, 1); got {pinv_rtol!r}")
    name, layer = find_classifier(model, classifier)
    check_finite(model)
    weight = layer.weight.detach().to(torch.float64)
    if n_classes is None:
        n_classes = layer.out_features
    check_int("n_classes", n_classes, min=2)
    if n_classes != layer.out_features:
        raise ValueError(
            f"n_classes={n_classes} but the classifier {name!r} has {layer.out_features} outputs"
        )
    d = layer.in_features
    dev = torch.device(device) if device is not None else _device_of(model)
    source = as_batches(data, batch_size, device=dev)
    check_model_input(model, next(iter(source)).x)

    sums = torch.zeros(n_classes, d, dtype=torch.float64, device=dev)
    counts = torch.zeros(n_classes, dtype=torch.float64, device=dev)
    scatter = torch.zeros(d, d, dtype=torch.float64, device=dev)
    agree = correct = 0
    capture = _Capture(layer)
    try:
        with ModeGuard(model, mode), torch.no_grad():
            for batch in source:  # pass 1: counts and class sums
                h, _ = capture.run(model, batch.x)
                y = _labels(batch.y, n_classes)
                sums.index_add_(0, y, h)
                counts += torch.bincount(y, minlength=n_classes).to(torch.float64)
            empty = [c for c in range(n_classes) if counts[c] == 0]
            if empty:
                raise ValueError(
                    f"classes {empty} have no samples in the data; neural-collapse metrics need every "
                    f"class (n_classes={n_classes}) to be present"
                )
            means = sums / counts[:, None]
            for batch in source:  # pass 2: within-class scatter, NCC vs network predictions
                h, z = capture.run(model, batch.x)
                y = _labels(batch.y, n_classes)
                r = h - means[y]
                scatter += r.T @ r
                ncc = torch.cdist(h, means).argmin(dim=1)
                pred = z.argmax(dim=1)
                agree += int((ncc == pred).sum())
                correct += int((pred == y).sum())
    finally:
        capture.remove()
    n = int(counts.sum())
    stats = collapse_metrics(means, counts, scatter, weight, pinv_rtol=pinv_rtol)
    meta = make_meta(
        "neural_collapse",
        model=model,
        params={"classifier": name, "n_classes": n_classes, "pinv_rtol": pinv_rtol, "batch_size": batch_size},
        started=started,
        mode=mode,
        accumulation="float64, two passes (class means; exact within-class scatter)",
        global_mean="mean of class means",
        n_passes=2,
        stochastic_modules=stochastic,
    )
    return NeuralCollapseResult(
        meta=meta,
        nc4=agree / n,
        accuracy=correct / n,
        n_classes=n_classes,
        feature_dim=d,
        n_samples=n,
        class_sizes=[int(c) for c in counts.tolist()],
        **stats,
    )


def nc_trajectory(
    checkpoints: Iterable[nn.Module] | Any,
    data: Any,
    *,
    steps: Sequence[int] | None = None,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> NeuralCollapseTrajectoryResult:
    """:func:`neural_collapse` over checkpoints. ``checkpoints``: a run folder (``Run``, anything with
    ``steps()`` and ``load_model(step)``, or a path) or models / state dicts (loaded into ``model=``),
    one at a time if a generator — see :mod:`dynascope.probes.trajectory`. ``steps`` default: the run's
    steps, else 0, 1, 2, …; ``kwargs`` go to :func:`neural_collapse`."""
    started = time.perf_counter()
    ckpts = checkpoint_models(checkpoints, steps, model=model)
    results = [neural_collapse(m, data, **kwargs) for m in ckpts.models]
    if not results:
        raise ValueError("nc_trajectory needs at least one model")
    steps = list(range(len(results))) if ckpts.steps is None else [int(s) for s in ckpts.steps]
    if len(steps) != len(results):
        raise ValueError(f"got {len(steps)} steps for {len(results)} models")
    fields = {f: [getattr(r, f) for r in results] for f in (*NC_FIELDS, "accuracy")}
    meta = make_meta(
        "nc_trajectory",
        params={k: v for k, v in kwargs.items()},
        started=started,
        per_step=[r.meta for r in results],
    )
    return NeuralCollapseTrajectoryResult(meta=meta, steps=steps, **fields)
