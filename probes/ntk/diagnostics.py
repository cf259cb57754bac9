"""NTK probes: spectrum and label alignment at one checkpoint, lazy→rich signals across checkpoints.

:func:`ntk_probe` — top-k eigenvalues of the empirical NTK on a data set (dense ``eigh`` of the formed
kernel when its size ``M`` (``N``, or ``N·O`` for the full kernel) is at most ``max_dense``; Lanczos
(:func:`~dynascope.probes.lanczos.eigsh`) on the matrix-free
:class:`~dynascope.probes.ntk.empirical.NTKOperator`
otherwise), its trace, the top-k condition number ``λ_1/λ_k``, the centered kernel-target alignment
and the fraction of the centered label energy ``‖U_kᵀ Y_c‖_F² / ‖Y_c‖_F²`` captured by the top-k
eigenvectors ``U_k`` of the (uncentered) kernel.

:func:`ntk_trajectory` — per checkpoint: kernel distance to the first checkpoint, kernel velocity,
label alignment and relative parameter change ``‖θ−θ0‖/‖θ0‖``. A network in the lazy (kernel)
regime keeps distance and parameter change near 0; grokking coincides with a late rise of the
kernel distance and label alignment (Kumar et al. 2023).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ...datasets.batching import as_batches, input_count
from ..lanczos import eigsh
from ..losses import check_labels, check_model_input
from ..results import Result, make_meta, train_randomness
from ..seeds import NTK_PROBE_OFFSET
from ..trajectory import checkpoint_models
from ..validation import check_choice, check_int
from .empirical import NTK_FORMULA, NTKOperator, empirical_ntk, ntk_budget
from .kernels import (
    center_kernel,
    center_targets,
    kernel_alignment,
    kernel_distance,
    relative_param_change,
    target_matrix,
)


@dataclass(frozen=True, kw_only=True)
class NTKResult(Result):
    """Spectrum and label alignment of the empirical NTK on one data set.

    ``eigenvalues`` top-k, descending (float64); ``label_energy[i]`` = ``‖u_iᵀ Y_c‖² / ‖Y_c‖_F²``;
    ``topk_label_energy`` their sum; ``condition_number`` = ``λ_1/λ_k`` over the reported top-k
    (``inf`` if ``λ_k ≤ 0``); ``converged`` per eigenvalue (all true for ``method="dense"``).
    """

    eigenvalues: torch.Tensor
    trace: float
    condition_number: float
    label_alignment: float
    topk_label_energy: float
    label_energy: torch.Tensor
    converged: torch.Tensor
    method: str

    def to_frame(self):  # -> pandas.DataFrame
        """One row per eigenvalue: rank, eigenvalue, label energy (and cumulative), converged + scalars."""
        import pandas as pd

        ev = self.eigenvalues.double().cpu()
        le = self.label_energy.double().cpu()
        frame = pd.DataFrame(
            {
                "rank": range(1, ev.numel() + 1),
                "eigenvalue": ev.tolist(),
                "label_energy": le.tolist(),
                "cumulative_label_energy": le.cumsum(0).tolist(),
                "converged": self.converged.cpu().tolist(),
            }
        )
        for name in ("trace", "condition_number", "label_alignment", "topk_label_energy", "method"):
            frame[name] = getattr(self, name)
        return frame


def _targets_for(y: torch.Tensor, size: int, n: int, n_outputs: int) -> torch.Tensor:
    """Centered targets as ``[size, C]``: ``[N, C]`` for a traced kernel, ``[N·O, 1]`` for a full one."""
    integer = not (y.is_floating_point() or y.is_complex())
    if integer and y.dim() >= 2:  # token sequences: no label kernel; alignment and energies are NaN
        return torch.zeros(size, 1, dtype=torch.float64)
    if integer and n_outputs > 1:  # class labels of a classifier: one-hot over its outputs
        check_labels(y, n_outputs)
    n_classes = n_outputs if integer and y.numel() and int(y.max()) < n_outputs else None
    Y = center_targets(target_matrix(y, n_classes))
    if size == n:
        return Y
    if Y.shape[1] != n_outputs:
        raise ValueError(
            f"the full kernel has {n_outputs} outputs per sample but the targets have {Y.shape[1]} columns"
        )
    return Y.reshape(-1, 1)


def _rademacher(size: int, s: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (size, s), generator=gen) * 2 - 1).to(dtype=dtype, device=device)


def _center_columns(V: torch.Tensor, n: int) -> torch.Tensor:
    """``C V`` with ``C = (I_N − 11ᵀ/N) ⊗ I_O`` applied to each column of ``V [N·O, s]``."""
    W = V.reshape(n, -1, V.shape[1])
    return (W - W.mean(dim=0, keepdim=True)).reshape(V.shape)


@dataclass
class _Spectrum:
    """Top-``k`` eigenpairs ``(values, U)`` of the kernel, its trace, the centered kernel-target alignment
    ``⟨K_c, Y_c Y_cᵀ⟩ / (‖K_c‖_F ‖Y_c Y_cᵀ‖_F)``, convergence per value and the keys it adds to ``meta``."""

    values: torch.Tensor
    U: torch.Tensor
    trace: float
    alignment: float
    converged: torch.Tensor
    extra: dict[str, Any]


def _alignment(num: float, kc_norm: float, Yc: torch.Tensor) -> float:
    """``num / (‖K_c‖_F ‖Y_c Y_cᵀ‖_F)`` with ``‖Y_c Y_cᵀ‖_F = ‖Y_cᵀ Y_c‖_F``; NaN when either norm is 0."""
    t_norm = float((Yc.T @ Yc).norm())
    return num / (kc_norm * t_norm) if kc_norm > 0 and t_norm > 0 else math.nan


def _dense_spectrum(
    model: nn.Module, x: Any, Yc: torch.Tensor, k: int, n_out: int, **kernel: Any
) -> _Spectrum:
    """Form ``K`` (:func:`empirical_ntk`) and take ``eigh`` in float64: exact eigenpairs, trace, ``‖K_c‖_F``
    and ``tr(Y_cᵀ K Y_c) = ⟨K_c, Y_c Y_cᵀ⟩`` (since ``C Y_c = Y_c``)."""
    K, plan = empirical_ntk(model, x, return_plan=True, **kernel)  # type: ignore[misc]
    Kd = K.double()
    evals, evecs = torch.linalg.eigh(Kd)
    kc_norm = float(center_kernel(Kd, n_out).norm())
    num = float((Yc * (Kd @ Yc)).sum())
    extra: dict[str, Any] = {"strategy": plan.as_meta(), "min_eigenvalue": float(evals.min())}
    if plan.fallback is not None:
        extra["ntk_fallback"] = plan.fallback
    return _Spectrum(evals.flip(0)[:k], evecs.flip(1)[:, :k], float(Kd.trace()), _alignment(num, kc_norm, Yc),
                     torch.ones(k, dtype=torch.bool), extra)  # fmt: skip


def _lanczos_spectrum(
    op: NTKOperator, Yc: torch.Tensor, k: int, *, n: int, tol: float, seed: int, n_probes: int,
    chunk_size: int | None, memory_budget: int,
) -> _Spectrum:  # fmt: skip
    """Matrix-free: Lanczos on ``op`` for the top ``k``, the exact trace ``Σ_i ‖J_i‖_F²`` and numerator
    ``tr(Y_cᵀ K Y_c)``, and ``‖K_c‖_F`` by Hutchinson (``E‖K_c z‖² = ‖K_c‖_F²`` over ``n_probes``
    Rademacher ``z``; the relative standard error of the norm goes to ``meta``)."""
    out = eigsh(op, k, tol=tol, seed=seed, memory_budget=memory_budget)
    trace = float(op.trace(chunk_size=chunk_size, memory_budget=memory_budget))
    num = float((Yc * op.matmat(Yc.to(op.dtype)).double()).sum())
    Z = _rademacher(op.size, n_probes, seed + NTK_PROBE_OFFSET, op.dtype, op.device)
    KcZ = _center_columns(op.matmat(_center_columns(Z, n)), n).double()
    sq = KcZ.pow(2).sum(dim=0)  # unbiased samples of ‖K_c‖_F²
    rel_se = float(sq.std() / (sq.mean() * math.sqrt(n_probes))) / 2 if n_probes > 1 else math.nan
    extra: dict[str, Any] = {} if op.fallback is None else {"ntk_fallback": op.fallback}
    extra.update(n_matvecs=op.n_matvecs, lanczos_iterations=out.n_iter, residuals=out.residuals,
                 alignment_norm_estimator=f"hutchinson({n_probes} Rademacher probes)",
                 alignment_relative_stderr=rel_se)  # fmt: skip
    return _Spectrum(out.values, out.vectors.double(), trace,  # type: ignore[union-attr]
                     _alignment(num, float(sq.mean().sqrt()), Yc), out.converged.cpu(), extra)  # fmt: skip


def ntk_probe(
    model: nn.Module,
    data: Any,
    *,
    k: int = 10,
    reduce_outputs: str | None = "trace",
    method: str = "auto",
    max_dense: int = 2048,
    strategy: str = "auto",
    chunk_size: int | None = None,
    batch_size: int | None = None,
    tol: float = 1e-4,
    n_probes: int = 32,
    mode: str = "eval",
    params: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
    seed: int = 0,
    max_memory: int | None = None,
) -> NTKResult:
    """Top-k NTK eigenvalues, trace, condition number and label alignment on ``data``.

    ``method``: ``"dense"`` (form the kernel with :func:`empirical_ntk` and ``eigh`` in float64),
    ``"lanczos"`` (matrix-free; ``batch_size`` samples per product) or ``"auto"`` (dense when the kernel
    size is at most ``max_dense``). With Lanczos the alignment's ``‖K_c‖_F`` is a Hutchinson estimate
    from ``n_probes`` Rademacher vectors (``E‖K_c z‖² = ‖K_c‖_F²``; its relative standard error is in
    ``meta``); the numerator ``tr(Y_cᵀ K Y_c)`` and the trace ``Σ_i ‖J_i‖_F²`` are exact.

    ``memory_budget``: bytes of Jacobian row-blocks / tangents (dense: :func:`empirical_ntk`'s plan, the
    kernel and its float64 ``eigh`` on top) or of Lanczos vectors and trace Jacobian chunks (Lanczos);
    default: 1 GiB or half the available memory, whichever is less (``max_memory``: deprecated name).
    ``meta`` records ``memory_budget`` and ``memory_formula``.
    """
    started = time.perf_counter()
    budget = ntk_budget(memory_budget, max_memory, device)
    check_choice("method", method, ("auto", "dense", "lanczos"))
    check_int("k", k, min=1)
    check_int("n_probes", n_probes, min=1)
    check_int("seed", seed)
    x, y = as_batches(data).tensors()
    check_model_input(model, x)
    op = NTKOperator(model, x, reduce_outputs=reduce_outputs, batch_size=batch_size, mode=mode, params=params,
                     device=device)  # fmt: skip
    n, O, M = input_count(op.x), op.n_outputs, op.size
    if k > M:
        raise ValueError(f"k={k} exceeds the kernel size {M}")
    Yc = _targets_for(y, M, n, O).to(device=op.device)
    if method == "auto":
        method = "dense" if M <= max_dense else "lanczos"
    if method == "dense":
        spec = _dense_spectrum(model, x, Yc, k, 1 if M == n else O, reduce_outputs=reduce_outputs,
                               strategy=strategy, chunk_size=chunk_size, mode=mode, params=params,
                               device=device, memory_budget=budget)  # fmt: skip
    else:
        spec = _lanczos_spectrum(op, Yc, k, n=n, tol=tol, seed=seed, n_probes=n_probes, chunk_size=chunk_size,
                                 memory_budget=budget)  # fmt: skip
    denom = float(Yc.pow(2).sum())
    U = spec.U
    energy = (U.T.to(Yc.device) @ Yc).pow(2).sum(dim=1) / denom if denom > 0 else torch.full((k,), math.nan)
    values = spec.values.double().cpu()
    lam_k = float(values[-1])
    settings = {"k": k, "reduce_outputs": reduce_outputs, "method": method, "max_dense": max_dense,
                "tol": tol, "n_probes": n_probes, "batch_size": batch_size, "params": params,
                "seed": seed, "memory_budget": memory_budget}  # fmt: skip
    meta = make_meta(
        "ntk_probe", model=model, params=settings, started=started, mode=mode,
        condition_number_definition="lambda_1 / lambda_k of the reported top-k",
        label_energy_definition="||U_k^T Y_c||^2 / ||Y_c||^2, U_k eigenvectors of the uncentered kernel",
        stochastic_modules=train_randomness("ntk_probe", op.fm.model, mode), **op.fm.kernel_meta(),
        kernel_size=M, n_samples=n, n_outputs=O, **spec.extra, memory_budget=budget,
        memory_formula=NTK_FORMULA if method == "dense" else "(Lanczos max_basis·M + trace c·O·P)·itemsize",
    )  # fmt: skip
    return NTKResult(
        eigenvalues=values, trace=spec.trace,
        condition_number=float(values[0]) / lam_k if lam_k > 0 else math.inf, label_alignment=spec.alignment,
        topk_label_energy=float(energy.sum()), label_energy=energy.double().cpu(), converged=spec.converged,
        method=method, meta=meta,
    )  # fmt: skip


# --------------------------------------------------------------------------- across checkpoints
@dataclass(frozen=True, kw_only=True)
class NTKTrajectoryResult(Result):
    """Lazy→rich signals per checkpoint (all lists have one entry per checkpoint).

    ``kernel_distance``: to the first checkpoint's kernel; ``kernel_velocity``: distance to the previous
    kernel per step (``nan`` at the first); ``label_alignment``: centered kernel-target alignment (``nan``
    without targets); ``relative_param_change``: ``‖θ−θ0‖/‖θ0‖``; ``kernel_trace``: ``tr K``.
    """

    former_names: ClassVar[tuple[str, ...]] = ("NTKTrajectory",)

    steps: list[float]
    kernel_distance: list[float]
    kernel_velocity: list[float]
    label_alignment: list[float]
    relative_param_change: list[float]
    kernel_trace: list[float]


def _inputs_and_targets(data: Any) -> tuple[Any, torch.Tensor | None]:
    """``data`` as ``(x, y)``: inputs alone (a tensor or a dict of tensors: no targets), or anything
    :func:`~dynascope.datasets.batching.as_batches` takes. Integer token sequences (``[N, T]`` labels)
    have no label kernel: ``y = None`` (the alignment is NaN)."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return data, None
    x, y = as_batches(data).tensors()
    if y is not None and y.dim() >= 2 and not (y.is_floating_point() or y.is_complex()):
        return x, None
    return x, y


def _given_steps(checkpoints: Any, ckpts: Any) -> list[float] | None:
    """The steps the checkpoints come with (``None``: numbered ``0, 1, …`` as they come), checked: as many
    as a sequence of models has, strictly increasing (the velocity divides by their differences)."""
    given = None if ckpts.steps is None else [float(v) for v in ckpts.steps]
    n_known = len(checkpoints) if ckpts.run is None and isinstance(checkpoints, Sequence) else None
    if n_known == 0:
        raise ValueError("ntk_trajectory needs at least one checkpoint")
    if given is not None and n_known is not None and len(given) != n_known:
        raise ValueError(f"got {n_known} checkpoints but {len(given)} steps")
    if given is not None and any(b <= a for a, b in zip(given, given[1:])):
        raise ValueError(f"steps must be strictly increasing; got {given}")
    return given


@dataclass
class _KernelTrack:
    """The running state of :func:`ntk_trajectory`: the first kernel ``K0`` and parameters ``θ0``, the
    previous kernel and step, and one list per signal (the fields of :class:`NTKTrajectoryResult`)."""

    centered: bool
    K0: torch.Tensor | None = None
    theta0: dict[str, torch.Tensor] | None = None
    previous: tuple[torch.Tensor, float] | None = None
    rows: dict[str, list[float]] = field(default_factory=dict)

    def add(self, K: torch.Tensor, theta: dict[str, torch.Tensor], step: float, y: Any, n_out: int,
            n_classes: int | None) -> None:  # fmt: skip
        """Append ``d(K0, K)``, the velocity ``d(K_prev, K)/(s − s_prev)`` (NaN at the first), the
        alignment ``A(K, y y^T)`` (NaN without targets), ``‖θ − θ0‖/‖θ0‖`` and ``tr K``."""
        if self.K0 is None:
            self.K0, self.theta0 = K, theta
        assert self.theta0 is not None
        c = self.centered
        values = {
            "kernel_distance": kernel_distance(self.K0, K, centered=c, n_outputs=n_out),
            "kernel_velocity": math.nan if self.previous is None else (
                kernel_distance(self.previous[0], K, centered=c, n_outputs=n_out) / (step - self.previous[1])
            ),
            "label_alignment": (
                math.nan if y is None else kernel_alignment(K, y, centered=c, n_classes=n_classes)
            ),
            "relative_param_change": relative_param_change(theta, self.theta0),
            "kernel_trace": float(K.trace()),
        }  # fmt: skip
        for name, v in values.items():
            self.rows.setdefault(name, []).append(v)
        self.previous = (K, step)


def ntk_trajectory(
    checkpoints: Any,
    data: Any,
    *,
    steps: Sequence[float] | None = None,
    model: nn.Module | None = None,
    reduce_outputs: str | None = "trace",
    centered: bool = True,
    strategy: str = "auto",
    chunk_size: int | None = None,
    mode: str = "eval",
    params: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> NTKTrajectoryResult:
    """Kernel distance to init, kernel velocity, label alignment and relative parameter change per checkpoint.

    ``checkpoints``: a run folder (``Run`` or path; its checkpoints at ``steps``, default all), or models,
    or state dicts loaded into (a copy of) ``model`` (see :mod:`dynascope.probes.trajectory`); the first
    is the reference ``θ0, K0``. ``steps`` default: the run's steps, else ``0, 1, …``. ``data``: ``(x, y)``
    (or a DataLoader / Dataset), or the inputs ``x`` alone (no label alignment). Kernels are formed
    on ``x`` with :func:`empirical_ntk` (two ``[N, N]`` kernels are held at a time) within
    ``memory_budget`` bytes of Jacobian row-blocks (:func:`empirical_ntk`).
    """
    started = time.perf_counter()
    x, y = _inputs_and_targets(data)
    ckpts = checkpoint_models(checkpoints, steps, model=model)
    given = _given_steps(checkpoints, ckpts)
    s: list[Any] = given if given is not None else []
    one_hot = y is not None and reduce_outputs is None and not (y.is_floating_point() or y.is_complex())
    track = _KernelTrack(centered)
    first: nn.Module | None = None
    kernel_notes: dict[str, str] = {}  # meta["attention"], meta["ntk_fallback"] from the kernels' plans
    n_items = 0
    for i, m in enumerate(ckpts.models):  # one model at a time (a state dict is loaded into model=)
        if given is None:
            s.append(i)
        elif i >= len(given):
            raise ValueError(f"more checkpoints than the {len(given)} steps")
        n_items, first = i + 1, first if first is not None else m
        K, plan = empirical_ntk(
            m, x, reduce_outputs=reduce_outputs, strategy=strategy, chunk_size=chunk_size, mode=mode,
            params=params, device=device, return_plan=True, memory_budget=memory_budget,
        )  # type: ignore[misc]  # fmt: skip
        kernel_notes.update({k: v for k, v in (("attention", plan.attention), ("ntk_fallback", plan.fallback))
                             if v is not None})  # fmt: skip
        n_out = 1 if reduce_outputs is not None else K.shape[0] // input_count(x)
        theta = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        track.add(K.double(), theta, s[i], y, n_out, n_out if one_hot else None)
    if n_items == 0:
        raise ValueError("ntk_trajectory needs at least one checkpoint")
    if len(s) != n_items:
        raise ValueError(f"got {n_items} checkpoints but {len(s)} steps")
    settings = {"reduce_outputs": reduce_outputs, "centered": centered, "strategy": strategy,
                "chunk_size": chunk_size, "params": params, "n_samples": input_count(x),
                "n_checkpoints": n_items, "memory_budget": memory_budget}  # fmt: skip
    meta = make_meta(
        "ntk_trajectory", model=model if model is not None else first, params=settings, started=started,
        mode=mode, **kernel_notes,
        kernel_distance_definition="1 - centered alignment" if centered else "1 - uncentered alignment",
    )  # fmt: skip
    return NTKTrajectoryResult(steps=s, meta=meta, **track.rows)
