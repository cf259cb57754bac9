"""The ``memory_budget`` knob: how many bytes of length-``P`` vectors a probe may hold at once.

A probe states its memory as ``vectors × P × itemsize`` (plus ``int8`` probe signs, 1 byte per entry)
and sizes its blocks, sketches and bases so that this stays within ``memory_budget`` bytes. The
operator's own work inside one product (activations, their tangents) is not part of the formula: it
grows with the block of vectors per product, which the budget also caps; the peak measured over the
call (:mod:`~dynascope.probes.memory`) is recorded beside the formula in ``meta``.

Honoured by ``hessian_trace`` (:func:`~.trace.plan_trace`), ``hessian_diagonal``
(:func:`~.diagonal.plan_diagonal`), ``hessian_density`` / ``blockwise_spectra`` / ``layerwise_hessian``
(:func:`~.density.plan_slq`: probe blocks, then bounded reorthogonalisation), ``hessian_eigenvalues``
(:func:`~.lanczos.eigsh`: ``max_basis``), the NTK (:func:`~.ntk.empirical.plan_ntk`: Jacobian row-blocks or
tangent blocks) and the loss landscapes (:func:`~.landscape.plan_landscape`). Each records
``memory_budget``, ``memory_formula`` and its plan in ``meta``, and raises :class:`MemoryBudgetError`
naming the knob when the least it can run with does not fit.

Default (``memory_budget=None``): half of the memory available when the probe starts —
``MemAvailable`` (Linux) on CPU, free device memory (``torch.cuda.mem_get_info``) on CUDA — or
:data:`FALLBACK_BUDGET_BYTES` where neither is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .validation import check_int

#: Share of the available memory the default budget takes (the rest: the products' own work, other tensors).
DEFAULT_BUDGET_SHARE = 0.5
#: Budget where the platform reports no available memory.
FALLBACK_BUDGET_BYTES = 4 * 2**30


class MemoryBudgetError(MemoryError):
    """A probe cannot run within ``memory_budget`` (or ran out of memory); the message names the knob."""


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Free device memory on CUDA, ``MemAvailable`` on Linux CPU, else ``None``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_budget(memory_budget: int | None, device: torch.device | str | None = None) -> int:
    """``memory_budget`` bytes, or the default (module docstring) when ``None``."""
    if memory_budget is not None:
        check_int("memory_budget", memory_budget, min=1)
        return int(memory_budget)
    free = available_bytes(device)
    return int(DEFAULT_BUDGET_SHARE * free) if free is not None else FALLBACK_BUDGET_BYTES


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def too_small(probe: str, budget: int, need: int, what: str) -> MemoryBudgetError:
    """The error for a budget below the least a probe can run with."""
    return MemoryBudgetError(
        f"{probe}: memory_budget={budget} bytes ({gib(budget)}) is below the {need} bytes ({gib(need)}) "
        f"it needs at least ({what}); raise memory_budget"
    )


#: How CPU allocators word an allocation failure in a ``RuntimeError`` (CUDA: ``torch.OutOfMemoryError``).
_OOM_TEXT = ("can't allocate memory", "not enough memory", "out of memory")


@contextmanager
def names_the_knob(probe: str, budget: int, formula: str) -> Iterator[None]:
    """Re-raise an out-of-memory error as :class:`MemoryBudgetError` naming ``memory_budget`` and ``block``
    (never swallowed: the probe stops)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as err:
        text = str(err)
        if isinstance(err, MemoryBudgetError) or not (
            isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(s in text for s in _OOM_TEXT)
        ):
            raise
        raise MemoryBudgetError(
            f"{probe} ran out of memory within memory_budget={budget} bytes ({gib(budget)}; its vectors: "
            f"{formula}). The products' own work is on top of the budget: lower memory_budget or block "
            f"(fewer vectors per product). Original error: {text[:300]}"
        ) from err


#: Rows of two float64 ``[rows, b]`` chunks and their product: :func:`column_dots` holds at most 3 × this.
CHUNK_BYTES = 4 * 2**20


def chunk_bytes(size: int, b: int) -> int:
    """Bytes of :func:`column_dots`' float64 temporaries for ``[size, b]`` operands."""
    return 3 * min(size * b * 8, CHUNK_BYTES)


def column_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Σ_i X_ij Y_ij`` per column in float64, over row chunks (float64 temporaries of at most
    :data:`CHUNK_BYTES` each; one chunk — the plain ``(X.double() * Y.double()).sum(0)`` — when it fits)."""
    rows = max(1, CHUNK_BYTES // (8 * max(X.shape[1], 1)))
    out = (X[:rows].double() * Y[:rows].double()).sum(dim=0)
    for lo in range(rows, X.shape[0], rows):
        out += (X[lo : lo + rows].double() * Y[lo : lo + rows].double()).sum(dim=0)
    return out


class RademacherProbes:
    """The columns, in order, of the ``[P, m]`` Rademacher matrix that ``torch.randint(0, 2, (P, m),
    generator=gen)`` draws (as :func:`~dynascope.probes.operators.random_vectors`), ``n`` at a time.

    ``hold=True``: the signs are drawn at once and kept as ``int8`` (``P·m`` bytes), so the values are those
    of ``random_vectors``. ``hold=False``: each block is drawn ``[P, n]`` from ``gen`` when asked for (``P·n``
    bytes at a time; other values, the same distribution) — for budgets that cannot hold all the signs.
    ``rows``: keeps this process's rows of each draw (a sharded operator's :meth:`~.space.ShardedSpace.rows`).
    """

    def __init__(self, size: int, m: int, gen: torch.Generator, *, hold: bool, dtype: torch.dtype,
                 device: torch.device, rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> None:  # fmt: skip
        self.size, self.gen, self.dtype, self.device = size, gen, dtype, device
        self.rows = rows if rows is not None else (lambda t: t)
        signs = torch.randint(0, 2, (size, m), generator=gen, dtype=torch.int8) if hold else None
        self.held = self.rows(signs) if signs is not None else None
        self.next = 0

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` columns as ``±1`` in ``dtype`` on ``device``."""
        if self.held is not None:
            raw = self.held[:, self.next : self.next + n]
        else:
            raw = self.rows(torch.randint(0, 2, (self.size, n), generator=self.gen, dtype=torch.int8))
        self.next += n
        return raw.to(device=self.device, dtype=self.dtype).mul_(2).sub_(1)


def largest(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest ``n`` in ``[lo, hi]`` with ``fits(n)`` (monotone: true up to some n), else ``None``."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_BUDGET_SHARE",
    "RademacherProbes",
    "chunk_bytes",
    "column_dots",
    "FALLBACK_BUDGET_BYTES",
    "MemoryBudgetError",
    "available_bytes",
    "largest",
    "names_the_knob",
    "resolve_budget",
    "too_small",
]
