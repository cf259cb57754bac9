"""Shared plumbing of the Hessian-spectrum probes: product recording, the determinism check, the product
self-check (:func:`product_check`), ``.meta``.

Every spectral probe (:mod:`.hessian`, :mod:`.trace`, :mod:`.density`) builds one
:class:`~dynascope.probes.operators.CurvatureOperator` from an
:class:`~dynascope.probes.operators.OperatorSpec`, wraps it in :class:`RecordingOperator` (which counts
its products and checks afterwards that a product comes out the same twice) and fills ``.meta``
with :func:`spectral_meta` (the operator's keys from ``CurvatureOperator.meta()``, as in every probe
that uses an operator).

Every curvature probe takes ``spec: OperatorSpec``; :func:`takes_operator_spec` lets its callers write the
spec's fields as keywords instead (``loss=``, ``operator=``, ``params=`` ...), turned into the spec in one
place, :func:`operator_spec`.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from .operators import CurvatureOperator, LinearOperator, OperatorSpec, random_vectors
from .results import make_meta, stochastic_modules

#: The operator keywords a curvature probe accepts instead of ``spec=``: keyword → (``OperatorSpec`` field,
#: default, annotation). ``operator`` is the spec's ``kind``; the defaults are the spec's.
OPERATOR_KEYWORDS: dict[str, tuple[str, Any, str]] = {
    "loss": ("loss", "auto", "str | Callable | Loss"),
    "operator": ("kind", "hessian", "str"),
    "output": ("output", None, "OutputSelector"),
    "params": ("params", None, "Sequence[str] | str | None"),
    "batch_size": ("batch_size", None, "int | None"),
    "mode": ("mode", "eval", "str"),
    "dtype": ("dtype", None, "torch.dtype | None"),
    "device": ("device", None, "torch.device | str | None"),
    "reduce_fn": ("reduce_fn", None, "Callable | None"),
}


def operator_spec(spec: OperatorSpec | None = None, /, **keywords: Any) -> OperatorSpec:
    """The probe's :class:`OperatorSpec`: ``spec`` itself, or one built from the operator keywords
    (:data:`OPERATOR_KEYWORDS`; validated by the spec). Both at once is a ``ValueError``: which should win
    would be a guess."""
    if spec is not None:
        if not isinstance(spec, OperatorSpec):
            raise ValueError(f"spec must be an OperatorSpec or None; got {type(spec).__name__}")
        if keywords:
            raise ValueError(
                f"pass either spec= or the operator keywords {sorted(keywords)}, not both "
                f"(spec.replace({', '.join(f'{k}=...' for k in sorted(keywords))}) combines them)"
            )
        return spec
    return OperatorSpec(**{OPERATOR_KEYWORDS[name][0]: value for name, value in keywords.items()})


def spec_settings(spec: OperatorSpec) -> dict[str, Any]:
    """The spec's keys of a probe's recorded settings (``meta["params"]``): the parameter block and the
    batch size (the other fields are recorded from the operator, :meth:`CurvatureOperator.meta`)."""
    return {"params": list(spec.params) if spec.params is not None else None, "batch_size": spec.batch_size}


F = TypeVar("F", bound=Callable[..., Any])


def takes_operator_spec(*names: str) -> Callable[[F], F]:
    """Decorate a curvature probe whose body takes a keyword-only ``spec: OperatorSpec``: callers pass
    ``spec=`` or the operator keywords ``names`` (default: all of :data:`OPERATOR_KEYWORDS`), which
    :func:`operator_spec` turns into the spec. The probe's signature (``help``, the runner's parameter list
    and cache key) shows ``spec=None`` followed by the keywords with their defaults."""
    chosen = names or tuple(OPERATOR_KEYWORDS)
    unknown = sorted(set(chosen) - set(OPERATOR_KEYWORDS))
    if unknown:
        raise ValueError(f"not operator keywords: {unknown}; choose from {list(OPERATOR_KEYWORDS)}")

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        at = [p.name for p in params].index("spec")
        extra = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=OPERATOR_KEYWORDS[n][1],
                              annotation=OPERATOR_KEYWORDS[n][2])
            for n in chosen
        ]  # fmt: skip
        shown = params[:at] + [params[at].replace(default=None)] + extra + params[at + 1 :]

        @functools.wraps(fn)
        def probe(*args: Any, spec: OperatorSpec | None = None, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in chosen if n in kwargs}
            return fn(*args, spec=operator_spec(spec, **given), **kwargs)

        probe.__signature__ = sig.replace(parameters=shown)  # type: ignore[attr-defined]
        return probe  # type: ignore[return-value]

    return decorate


#: A recomputed product is deterministic when it agrees with the first to within this many units of
#: the operator dtype's machine epsilon, relatively (float64: 1.8e-15, float32: 9.5e-7); products on
#: CPU repeat bit for bit, so the check flags nondeterministic kernels and train-mode randomness.
DETERMINISM_EPS_MULTIPLE = 8


def determinism_rtol(dtype: torch.dtype) -> float:
    """``DETERMINISM_EPS_MULTIPLE · eps(dtype)``: the largest relative difference still deterministic."""
    return DETERMINISM_EPS_MULTIPLE * torch.finfo(dtype).eps


#: The determinism check keeps the first product's column (two vectors) only while they take at most this
#: many bytes: on small models it saves a product; on large ones memory binds, and two products are cheaper.
KEEP_FIRST_MAX_BYTES = 16 * 2**20


class RecordingOperator(LinearOperator):
    """Delegates to ``op``, counting only the products requested through it; :meth:`determinism`
    checks afterwards that a product comes out the same twice.

    When ``op`` computes every column on its own (:attr:`CurvatureOperator.columnwise`) and two vectors
    fit in :data:`KEEP_FIRST_MAX_BYTES`, the first column of the algorithm's first product is kept and
    the check recomputes only it: one product instead of two."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.size, op.dtype, op.device)
        self.vspace = op.vspace
        self.inner = op
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None
        two_vectors = 2 * op.size * torch.empty((), dtype=op.dtype).element_size()
        self._keep_first = bool(getattr(op, "columnwise", False)) and two_vectors <= KEEP_FIRST_MAX_BYTES
        self.determinism_matvecs = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.inner.matmat(V)
        if self._keep_first and self._first is None:
            self._first = (V[:, 0].clone(), out[:, 0].clone())
        return out

    def determinism(self, seed: int = 0) -> float:
        """``‖A v − A v‖ / ‖A v‖`` for one vector evaluated twice in the same shape (a batched and a
        one-vector product may differ in rounding; that is not nondeterminism): the algorithm's first
        column against a recomputation when products are column-wise, else a seeded random ``v``
        twice. Sets :attr:`determinism_matvecs` to the products it cost (1 or 2)."""
        if self._first is not None:
            v, first = self._first
            again = self.inner.matmat(v[:, None])[:, 0]
            self.determinism_matvecs = 1
        else:
            v = random_vectors(self.vspace.size, 1, seed=seed, dtype=self.dtype, device=self.device)
            v = self.vspace.rows(v)
            first, again = self.inner.matmat(v), self.inner.matmat(v)
            self.determinism_matvecs = 2
        self._first = None
        return self.vspace.norm(again - first) / (self.vspace.norm(first) or 1.0)


def spectral_meta(
    probe: str,
    model: nn.Module,
    op: CurvatureOperator,
    rec: RecordingOperator | None,
    *,
    started: float,
    seed: int,
    settings: dict[str, Any],
    check_determinism: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The ``.meta`` block of a spectral probe.

    ``n_matvecs`` counts the algorithm's operator-vector products; the determinism check (one or
    two more products, when enabled) is counted separately in ``determinism_matvecs``.
    """
    n_matvecs = rec.n_matvecs if rec is not None else op.n_matvecs
    n_passes = rec.n_passes if rec is not None else op.n_passes
    wall = time.perf_counter() - started
    det = rec.determinism() if (check_determinism and rec is not None) else None
    rtol = determinism_rtol(op.dtype)
    stochastic = stochastic_modules(model, op.mode)
    _warn_nondeterministic(probe, det, stochastic, rtol)
    checked = product_check(probe, op) if check_determinism and not stochastic else None
    return make_meta(
        probe,
        model=model,
        params=settings,
        **op.meta(),
        n_matvecs=n_matvecs,
        n_passes=n_passes,
        wall_time_s=wall,
        seed=seed,
        determinism_rel_diff=det,
        determinism_matvecs=rec.determinism_matvecs if (rec is not None and det is not None) else 0,
        determinism_rtol=rtol if det is not None else None,
        deterministic=None if det is None else bool(det <= rtol),
        stochastic_modules=stochastic,
        product_check=checked,
        **extra,
    )


#: Self-check results by architecture (every module's name and class, parameter block and shapes, dtype,
#: loss, mode): the product mechanism of an architecture is checked once per process, not at every
#: checkpoint.
_CHECKED: dict[tuple, dict[str, Any]] = {}


def product_check(probe: str, op: CurvatureOperator) -> dict[str, Any] | None:
    """:func:`~dynascope.probes.selfcheck.check_product` of a Hessian operator, once per architecture
    (later calls return it with ``"cached": True``); a failed check warns loudly. ``None`` for the GGN and
    Fisher (no finite-difference relation) and for operators summed over ranks (checked on one rank's
    shard it would compare different functions)."""
    from .selfcheck import check_product

    if op.kind != "hessian" or op.reduce_fn is not None:
        return None
    modules = tuple((name, type(m)) for name, m in op.model.named_modules())
    shapes = tuple(tuple(s) for s in op.space.shapes)
    key = (modules, tuple(op.space.names), shapes, op.dtype, op.loss.name, op.mode, str(op.device))
    if key in _CHECKED:
        return {**_CHECKED[key], "cached": True}
    result = check_product(op)
    if len(_CHECKED) > 256:
        _CHECKED.clear()
    _CHECKED[key] = result
    if result["passed"] is False:
        warnings.warn(
            f"{probe}: the model's Hessian-vector products disagree with differences of its gradients by "
            f"{result['agreement']:.2g} (relative; tolerance {result['tolerance']:.2g}): some layer's double "
            "backward is wrong, so these curvature numbers are not the model's. Recorded in "
            ".meta['product_check']",
            UserWarning,
            stacklevel=4,
        )
    return result


def _warn_nondeterministic(probe: str, det: float | None, stochastic: list[str], rtol: float) -> None:
    if stochastic or (det is not None and det > rtol):
        why = f"mode='train' with dropout ({', '.join(stochastic[:5])})" if stochastic else "the model"
        measured = f"; two products of the same vector differ by {det:.2g} (relative)" if det else ""
        warnings.warn(
            f"{probe}: {why} makes the curvature operator random, so results change between calls"
            f"{measured}. Use mode='eval' for reproducible numbers (recorded in .meta: "
            "'stochastic_modules', 'determinism_rel_diff')",
            UserWarning,
            stacklevel=4,
        )
