"""Lanczos on any symmetric :class:`~dynascope.probes.operators.LinearOperator`.

* :func:`eigsh` — extremal eigenpairs by **block** Lanczos with thick (Krylov–Schur) restarts.
  Each step applies the operator to a block ``X`` of ``b`` orthonormal vectors in one ``matmat``
  (one data pass), projects ``W = A X`` on the whole basis ``V`` (``H[:, X] = Vᵀ W``, float64),
  orthogonalises ``W`` against ``V`` twice (classical Gram–Schmidt, "twice is enough") and takes
  ``W = X₊ R`` (QR) as the next block. Then ``A V = V H + X₊ R E_Xᵀ``: a Ritz pair
  ``(θ, y = V s)`` of ``H`` has residual ``‖A y − θ y‖ = ‖R s_X‖`` (``s_X``: the rows of ``s`` on the
  last block) and is *converged* when that is at most ``tol · max(|θ|, 1e-3 · ‖H‖)``.
  Iteration stops on residuals only (never on the change of θ); unconverged pairs are reported
  as such.

  *Multiplicities.* A block Krylov space from ``b`` random vectors holds at most ``b`` copies of an
  eigenvalue (a single vector cannot see a repeated eigenvalue at all). When a run has converged,
  Ritz values whose error intervals ``θ ± max(residual, tol·|θ|)`` overlap form a cluster; a
  cluster of ``b`` values (the block's capacity) followed by other wanted values could be hiding
  further copies. Then the run's wanted vectors are *locked*, a new run starts from a fresh random
  block on their orthogonal complement (the deflated operator), and the results are merged; this
  repeats until no full cluster remains. A cluster that could still hide copies when the budget or
  the memory runs out marks the values after it as not converged.

  *Memory.* The basis grows block by block (never preallocated, except on small problems whose
  whole ``max_basis`` fits in :data:`SLAB_MAX_BYTES`) until locked vectors plus basis reach
  ``max_basis`` vectors of the operator's dtype, then restarts in place on the ``p`` best Ritz vectors.
  Peak memory: ``max_basis · P`` numbers — locked vectors, basis and the product block ``W``
  (orthonormalised in place) — reported as ``EigshOutput.peak_basis_vectors``. The default
  ``max_basis`` (:func:`default_max_basis`) is capped by :data:`BASIS_MEMORY_BYTES` on large models.

  *Small or degenerate operators.* When ``P`` is at most :data:`DENSE_MAX_SIZE` (without a warm start),
  or ``k'`` is at least a tenth of ``P`` (and the matrix fits :data:`DENSE_MAX_BYTES`), ``method="auto"``
  builds the matrix from ``P`` products (blocks of unit columns, one ``matmat`` per block) and solves it
  with a dense float64 ``eigh``: every copy of every eigenvalue, in exactly ``P`` products (Lanczos would
  need more than ``k'`` with restarts and locking). ``EigshOutput.method`` says which solver ran.
* :func:`lanczos_tridiagonal` — several independent recurrences at once (one ``matmat`` per step
  serves all probes), as needed by stochastic Lanczos quadrature.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import column_dots, resolve_budget, too_small
from .operators import LinearOperator, random_vectors
from .seeds import LANCZOS_RESTART_STRIDE
from .space import VectorSpace
from .validation import check_choice, check_float, check_int

#: Ritz pairs are converged when ``‖A u − θ u‖ ≤ tol·max(|θ|, EIGENVALUE_FLOOR·max|θ|)``: eigenvalues
#: below this fraction of the largest are judged on an absolute scale (relative error is meaningless there).
EIGENVALUE_FLOOR = 1e-3
#: float64 breakdown: ``β_j ≤ 1e-10·scale`` marks an invariant subspace (see :func:`breakdown_rtol`).
BREAKDOWN_RTOL_FLOAT64 = 1e-10
#: In lower precisions rounding alone leaves ``β ≈ eps·‖A‖``: breakdown below ``10·eps`` of the scale.
BREAKDOWN_EPS_MULTIPLE = 10


def breakdown_rtol(dtype: torch.dtype) -> float:
    """Relative size below which a Lanczos ``β_j`` (a block's ``|R_ii|``) is a breakdown — an invariant
    subspace — in ``dtype``: ``max(1e-10, 10·eps)`` — 1e-10 in float64, 1.2e-6 in float32, 9.8e-3 in
    float16, 7.8e-2 in bfloat16."""
    return max(BREAKDOWN_RTOL_FLOAT64, BREAKDOWN_EPS_MULTIPLE * torch.finfo(dtype).eps)


WHICH = ("LA", "SA", "LM", "BE")
METHODS = ("auto", "lanczos", "dense")

#: ``method="auto"`` solves operators of at most this size densely (``P`` products, float64 ``eigh``).
DENSE_MAX_SIZE = 64
#: ... and larger ones when ``k' ≥ P / DENSE_FRACTION`` and the float64 matrix fits ``DENSE_MAX_BYTES``.
DENSE_FRACTION = 10
DENSE_MAX_BYTES = 256 * 2**20
#: Unit columns per ``matmat`` when the dense matrix is built.
DENSE_BLOCK = 64


def use_dense(P: int, n_want: int, budget: int | None = None, warm: bool = False) -> bool:
    """Whether ``method="auto"`` solves densely: ``n_want ≥ P/10``, or ``P ≤ DENSE_MAX_SIZE`` without a
    warm start (which Lanczos uses), with the float64 matrix within ``DENSE_MAX_BYTES`` and a product
    budget of at least ``P``."""
    fits = 8 * P * P <= DENSE_MAX_BYTES
    small = (P <= DENSE_MAX_SIZE and not warm) or DENSE_FRACTION * n_want >= P
    return fits and small and (budget is None or budget >= P)


#: The default ``max_basis`` holds at most this many bytes of vectors on large models (at k = 3 it binds
#: above 6.1M float32 parameters: ResNet-18 gets 18 vectors), but never fewer than ``2k' + 4 + 2b``.
BASIS_MEMORY_BYTES = 768 * 2**20


def default_max_basis(n_want: int, b: int, size: int, itemsize: int, cap_bytes: int | None = None) -> int:
    """``min(3k' + 20 + 2b, cap_bytes / (P · itemsize))`` (default ``cap_bytes``: :data:`BASIS_MEMORY_BYTES`),
    at least ``2k' + 4 + 2b``, at most P.

    ``3k' + 20 + 2b`` lets a run find ``k'`` values without restarting on typical Hessians; on large
    models the memory cap trades restarts (more products) for a smaller peak."""
    full = 3 * n_want + 20 + 2 * b
    fits = (BASIS_MEMORY_BYTES if cap_bytes is None else cap_bytes) // max(size * itemsize, 1)
    return min(size, max(2 * n_want + 4 + 2 * b, min(full, fits)))


@dataclass(frozen=True)
class EigshOutput:
    """Eigenpairs from :func:`eigsh`, sorted by descending eigenvalue.

    ``values`` (float64), ``vectors`` ``[P, k]`` (operator dtype, unit columns, or ``None``),
    ``residuals`` ``‖A y − θ y‖`` (float64), ``converged`` (bool per value), ``n_matvecs``,
    ``n_iter`` (basis vectors expanded, = products), ``n_passes`` (``matmat`` calls),
    ``block_size``, ``n_restarts`` (thick restarts), ``n_runs`` (runs after locking, see
    :func:`eigsh`), ``peak_basis_vectors`` (most vectors of length P held at once: locked vectors,
    basis and the product block) and ``max_basis`` (the cap it ran under).
    """

    values: torch.Tensor
    vectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    n_iter: int
    n_passes: int = 0
    block_size: int = 1
    n_restarts: int = 0
    n_runs: int = 1
    peak_basis_vectors: int = 0
    max_basis: int = 0
    method: str = "lanczos"  # "lanczos" (block Lanczos) or "dense" (P products, float64 eigh)
    memory_budget: int = 0  # bytes of vectors the solver planned within (eigsh's memory_budget)
    budget_binds: bool = False  # max_basis below 3k' + 20 + 2b (capped by the budget)

    def memory_bytes(self, size: int, dtype: torch.dtype) -> int:
        """Bytes of the solver's vectors at their peak for an operator of ``size`` in ``dtype``."""
        return self.peak_basis_vectors * size * torch.empty((), dtype=dtype).element_size()

    def meta(self, size: int, dtype: torch.dtype) -> dict[str, int | str]:
        """The solver's keys of a probe's ``.meta``: block size, restarts, runs, data passes and memory."""
        return {
            "eigensolver": "dense float64 eigh of the P×P matrix (P products)"
            if self.method == "dense"
            else "block Lanczos",
            "block_size": self.block_size,
            "n_passes_solver": self.n_passes,
            "n_restarts": self.n_restarts,
            "n_runs": self.n_runs,
            "peak_basis_vectors": self.peak_basis_vectors,
            "max_basis": self.max_basis,
            "solver_memory_bytes": self.memory_bytes(size, dtype),
            "solver_memory_formula": "(locked + basis + product block) vectors × P × dtype bytes",
            "memory_budget": self.memory_budget,
            "memory_formula": "(max_basis + 2b)·P·itemsize (locked + basis + product block; the block's "
            "projection and QR), max_basis = min(3k' + 20 + 2b, memory_budget / (P·itemsize) − 2b); "
            "dense: 8·P² + 64·P·itemsize",
            "budget_binds": self.budget_binds,
        }


#: Rows per chunk when restarting the basis in place (bounds the temporary to chunk × basis size).
RESTART_CHUNK_ROWS = 1 << 13


def _tridiagonal(alpha: list[float], beta: list[float]) -> torch.Tensor:
    a = torch.tensor(alpha, dtype=torch.float64)
    T = torch.diag(a)
    if len(alpha) > 1:
        b = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
        T += torch.diag(b, 1) + torch.diag(b, -1)
    return T


def _orders(theta: torch.Tensor, k: int, which: str) -> list[tuple[torch.Tensor, int]]:
    """``[(indices in preference order, how many of them are wanted)]`` for ascending ``theta``.

    ``"BE"`` has two ends, each with ``k`` wanted values.
    """
    m = theta.numel()
    desc, asc = torch.arange(m - 1, -1, -1), torch.arange(m)
    if which == "LA":
        return [(desc, min(k, m))]
    if which == "SA":
        return [(asc, min(k, m))]
    if which == "LM":
        return [(torch.argsort(theta.abs(), descending=True), min(k, m))]
    return [(desc, min(k, m)), (asc, min(k, m))]


def _wanted(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices (into ascending ``theta``) of the wanted Ritz values, without repeats."""
    idx = torch.cat([order[:n] for order, n in _orders(theta, k, which)])
    return torch.unique(idx)


def _keep_order(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """All Ritz indices by preference for a restart (the ends of ``"BE"`` interleaved)."""
    orders = _orders(theta, k, which)
    if len(orders) == 1:
        return orders[0][0]
    a, b = orders[0][0], orders[1][0]
    seen: list[int] = []
    for i, j in zip(a.tolist(), b.tolist()):
        for t in (i, j):
            if t not in seen:
                seen.append(t)
    return torch.tensor(seen, dtype=torch.long)


#: A run whose whole basis (``max_basis · P`` numbers) fits in this many bytes keeps it in one column-major
#: slab allocated up front: the Gram–Schmidt sweeps are then one matrix product each instead of one per
#: block, which is most of the solver's own time on small models; larger bases grow block by block.
SLAB_MAX_BYTES = 64 * 2**20


class _Basis:
    """Orthonormal columns ``V = [B_1 | B_2 | …]`` kept as a list of blocks (grown without copies), or —
    given a ``slab`` ``[P, C]`` — as the first columns of that one preallocated tensor. The rows are those
    ``vspace`` holds in this process (all of them, or this rank's shard: :mod:`.space`)."""

    def __init__(self, vspace: VectorSpace, slab: torch.Tensor | None = None) -> None:
        self.blocks: list[torch.Tensor] = []
        self.vspace = vspace
        self.slab = slab

    @classmethod
    def for_run(cls, vspace: VectorSpace, cap: int, like: torch.Tensor) -> _Basis:
        """A slab basis when ``cap`` vectors fit in :data:`SLAB_MAX_BYTES`, else a list of blocks."""
        P = vspace.local_size
        if cap * P * like.element_size() > SLAB_MAX_BYTES:
            return cls(vspace)
        return cls(vspace, torch.empty(cap, P, dtype=like.dtype, device=like.device).T)  # column-major

    @property
    def size(self) -> int:
        return sum(B.shape[1] for B in self.blocks)

    def append(self, X: torch.Tensor) -> None:
        lo, b = self.size, X.shape[1]
        if self.slab is None or lo + b > self.slab.shape[1]:
            self.blocks.append(X)
            return
        self.slab[:, lo : lo + b].copy_(X)
        self.blocks = [self.slab[:, : lo + b]]

    def detached_blocks(self) -> list[torch.Tensor]:
        """The blocks, copied out of the slab (so that keeping them does not keep the whole slab)."""
        return [_column_major(B.clone()) if self.slab is not None else B for B in self.blocks]

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """``Vᵀ W``."""
        return self.vspace.reduce(torch.cat([B.T @ W for B in self.blocks], dim=0))

    def subtract(self, W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """``W − V C`` in place."""
        lo = 0
        for B in self.blocks:
            W.addmm_(B, C[lo : lo + B.shape[1]].to(W.dtype), alpha=-1.0)
            lo += B.shape[1]
        return W

    def orthogonalize(self, W: torch.Tensor) -> torch.Tensor:
        """Remove the span of ``V`` from ``W`` (two classical Gram–Schmidt sweeps), in place."""
        for _ in range(2):
            if self.blocks:
                self.subtract(W, self.project(W))
        return W

    def restart(self, S: torch.Tensor) -> None:
        """``V ← V S`` (``S``: ``[m, p]``, ``p ≤ m``) in place, by row chunks: no second basis in memory."""
        p = S.shape[1]
        S = S.to(self.blocks[0].dtype)
        P = self.blocks[0].shape[0]
        for r0 in range(0, P, RESTART_CHUNK_ROWS):
            rows = slice(r0, min(r0 + RESTART_CHUNK_ROWS, P))
            Y = torch.cat([B[rows] for B in self.blocks], dim=1) @ S
            lo = 0
            for B in self.blocks:
                n = min(B.shape[1], p - lo)
                if n <= 0:
                    break
                B[rows, :n] = Y[:, lo : lo + n]
                lo += n
        kept, lo = [], 0
        for B in self.blocks:
            n = min(B.shape[1], p - lo)
            if n <= 0:
                break
            kept.append(B[:, :n])
            lo += n
        self.blocks = kept


def _random_block(vspace: VectorSpace, b: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """``b`` seeded random vectors of ``vspace`` (this process's rows of them)."""
    rand = random_vectors(vspace.size, b, seed=seed, dtype=like.dtype, device=like.device)
    return _column_major(vspace.rows(rand))


def _column_major(X: torch.Tensor) -> torch.Tensor:
    """``X [P, b]`` stored column by column, so each vector is contiguous: products of one column at a
    time read and write it in place (no per-column copy), and ``zeros_like`` keeps the layout."""
    return X if X.stride(0) == 1 else X.t().contiguous().t()


def _start_block(
    op: LinearOperator, v0: torch.Tensor | None, b: int, seed: int, device: torch.device
) -> torch.Tensor:
    """The first block: ``v0``'s columns (a warm start) filled up to ``b`` with seeded random vectors."""
    rand = op.vspace.rows(random_vectors(op.vspace.size, b, seed=seed, dtype=op.dtype, device=device))
    if v0 is None:
        return rand
    v0 = v0.to(device=device, dtype=op.dtype)
    v0 = v0[:, None] if v0.dim() == 1 else v0
    if (
        v0.dim() != 2
        or v0.shape[0] != op.size
        or not bool(torch.isfinite(v0).all())
        or not bool((op.vspace.norms(v0) > 0).all())
    ):
        raise ValueError(f"v0 must be a finite nonzero vector of length {op.size} (or [P, j] eigenvectors)")
    fill = max(b - v0.shape[1], 0)
    return torch.cat([v0, rand[:, :fill]], dim=1) if fill else v0


def _orthonormal_block(
    W: torch.Tensor, basis: _Basis, scale: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = X R`` by modified Gram–Schmidt (twice) *in place*: ``W`` becomes ``X``, orthonormal and
    orthogonal to ``basis`` (no second block in memory). A column whose ``|R_ii|`` is at breakdown level
    becomes a fresh random direction orthogonal to everything before it (``R_ii = 0``; later columns
    are projected on the new direction, so ``W = X R`` stays exact)."""
    b, sp = W.shape[1], basis.vspace
    R = torch.zeros(b, b, dtype=torch.float64)
    tiny = breakdown_rtol(W.dtype) * max(scale, 1e-300)
    for i in range(b):
        w = W[:, i]
        for _ in range(2):
            if i:
                c = sp.reduce(W[:, :i].T @ w)
                w.sub_(W[:, :i] @ c)
                R[:i, i] += c.double().cpu()
        r = sp.norm(w)
        if r > tiny:
            R[i, i] = r
            w.div_(r)
            continue
        for attempt in range(4):
            z = _random_block(sp, 1, seed + LANCZOS_RESTART_STRIDE * (i * 4 + attempt + 1), W)
            before = sp.norm(z)
            basis.orthogonalize(z)
            for _ in range(2):
                if i:
                    z -= W[:, :i] @ sp.reduce(W[:, :i].T @ z)
            norm = sp.norm(z)
            if norm > breakdown_rtol(W.dtype) * before:  # else the basis already spans (almost) everything
                w.copy_(z[:, 0] / norm)
                break
        else:
            w.zero_()  # the space is exhausted (basis spans everything): a null direction
    return W, R


def _clusters(values: torch.Tensor, radii: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end)]`` runs of consecutive ``values`` (in the given order) whose intervals
    ``value ± radius`` overlap their neighbour's."""
    runs, start = [], 0
    for i in range(1, values.numel() + 1):
        if i == values.numel() or float((values[i] - values[i - 1]).abs()) > float(radii[i] + radii[i - 1]):
            runs.append((start, i - 1))
            start = i
    return runs


def _capacity_ends(
    theta: torch.Tensor, res: torch.Tensor, radius: torch.Tensor, k: int, which: str, block: int
) -> list[float | None]:
    """Per preference order (one, or two for ``"BE"``): the last value of the first cluster of
    ``block`` wanted Ritz values (the block's capacity: it may hide further copies), else ``None``."""
    out: list[float | None] = []
    for order, n in _orders(theta, k, which):
        window = order[: min(order.numel(), n + block)]
        found = None
        for start, end in _clusters(theta[window], radius[window]):
            if start >= n:
                break
            if end - start + 1 >= block:
                found = float(theta[window[end]])
                break
        out.append(found)
    return out


def _displaced(
    values: torch.Tensor, e: float, k: int, which: str, end: int, tol: float, scale: float
) -> torch.Tensor:
    """Mask of the wanted ``values`` (the best ``k`` per end) that come after ``e`` — the last value of
    a full cluster — in the preference order of ``end`` (by more than ``e``'s convergence radius)."""
    margin = tol * max(abs(e), EIGENVALUE_FLOOR * scale)
    order = torch.argsort(values)
    wanted = torch.zeros_like(values, dtype=torch.bool)
    wanted[order[_wanted(values[order], k, which)]] = True
    if which == "LM":
        behind = values.abs() < abs(e) - margin
    elif which == "SA" or (which == "BE" and end == 1):
        behind = values > e + margin
    else:
        behind = values < e - margin
    return wanted & behind


@dataclass
class _Run:
    """One block Krylov run on the complement of the locked vectors (see :func:`eigsh`)."""

    theta: torch.Tensor  # ascending Ritz values of the run's projected matrix
    res: torch.Tensor  # their residuals
    S: torch.Tensor
    basis: _Basis
    used: int
    passes: int
    restarts: int
    peak: int
    exhausted: bool  # locked + basis span the whole space: the values are exact


def _krylov_run(
    op: LinearOperator,
    locked: _Basis,
    X: torch.Tensor,
    *,
    k: int,
    which: str,
    tol: float,
    budget: int,
    cap: int,
    seed: int,
    device: torch.device,
) -> _Run:
    """Block Lanczos with thick restarts on ``locked``'s orthogonal complement, from block ``X``,
    until the ``k`` wanted values (per end) converge, ``budget`` products are spent, or the space is
    exhausted. ``cap``: most basis vectors of this run."""
    P, n_locked = op.vspace.size, locked.size
    n_want = min(2 * k if which == "BE" else k, P - n_locked)
    basis = _Basis.for_run(op.vspace, cap, X)
    H = torch.zeros(0, 0, dtype=torch.float64)
    used = passes = restarts = peak = 0
    width = X.shape[1]
    while True:
        lo = basis.size
        basis.append(X)
        m = basis.size
        W = op.matmat(X).to(device)
        used += X.shape[1]
        passes += 1
        C = basis.project(W)
        basis.subtract(W, C)
        locked.orthogonalize(W)
        C2 = basis.project(W)  # second Gram–Schmidt sweep: its coefficients belong to H too
        basis.subtract(W, C2)
        col = (C + C2).double().cpu()
        Hn = torch.zeros(m, m, dtype=torch.float64)
        Hn[:lo, :lo] = H
        Hn[:, lo:] = col
        Hn[lo:, :] = col.T
        H = (Hn + Hn.T) / 2
        theta, S = torch.linalg.eigh(H)
        scale = float(theta.abs().max()) or 1.0
        peak = max(peak, n_locked + m + X.shape[1])
        exhausted = n_locked + m >= P
        if exhausted:
            R = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
            Xn = X
        else:
            both = _Basis(op.vspace)
            both.blocks = locked.blocks + basis.blocks
            Xn, R = _orthonormal_block(W, both, scale, seed + LANCZOS_RESTART_STRIDE * (used + 1))
        del W
        res = (R @ S[lo:, :]).norm(dim=0)  # ‖A y − θ y‖ for every Ritz pair
        wanted = _wanted(theta, k, which)
        conv = res[wanted] <= tol * torch.clamp(theta[wanted].abs(), min=EIGENVALUE_FLOOR * scale)
        room = budget - used
        if exhausted or room <= 0 or (wanted.numel() >= n_want and bool(conv.all())):
            return _Run(theta, res, S, basis, used, passes, restarts, peak, exhausted)
        next_width = min(width, P - n_locked - m, room)
        Xn = Xn[:, :next_width]
        if basis.size + 2 * Xn.shape[1] > cap:  # the next step holds the basis, Xn and Xn's product
            keep = _keep_order(theta, k, which)
            room_left = cap - 2 * Xn.shape[1]
            p = min(room_left, max(n_want + width, (2 * room_left) // 3))
            basis.restart(S[:, keep[:p]])
            H = torch.diag(theta[keep[:p]])
            restarts += 1
        X = Xn


class _Float32Krylov(LinearOperator):
    """A bfloat16/float16 operator seen in float32: products run in the operator's dtype, the Krylov
    vectors, their inner products and QR (no half-precision kernels on CPU) in float32."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.size, torch.float32, op.device)
        self.vspace = op.vspace
        self.inner = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.inner.matmat(V).to(torch.float32)


def krylov_precision(op: LinearOperator) -> LinearOperator:
    """``op`` itself, or seen in float32 when its products are bfloat16/float16 (:class:`_Float32Krylov`)."""
    return _Float32Krylov(op) if op.dtype in (torch.bfloat16, torch.float16) else op


def eigsh(
    op: LinearOperator,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_iter: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    return_vectors: bool = True,
    block_size: int | None = None,
    max_basis: int | None = None,
    basis_device: torch.device | str | None = None,
    method: str = "auto",
    memory_budget: int | None = None,
) -> EigshOutput:
    """Extremal eigenpairs of a symmetric operator by block Lanczos with thick restarts (module docstring).

    ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude,
    ``"BE"`` k from both ends. ``v0``: start vector, or ``[P, j]`` previous eigenvectors for a warm
    start (the first block is then ``j`` wide, at least ``block_size``). ``max_iter``: budget of
    operator-vector products (default ``max(300, 60 k)``). ``block_size``: ``b ≥ 1`` (default 2, or 1 when
    a single value is wanted: copies of λ_max cannot change it).
    ``max_basis``: most vectors held (locked + basis + the product block; default
    :func:`default_max_basis`: ``3 k' + 20 + 2 b`` for ``k'`` wanted values, fewer when that would
    exceed :data:`BASIS_MEMORY_BYTES`), so memory is at most ``max_basis · P`` numbers of the
    operator's dtype.
    ``memory_budget``: bytes of vectors held (:mod:`~dynascope.probes.budget`): the default ``max_basis`` is
    then ``min(3k' + 20 + 2b, memory_budget / (P · itemsize) − 2b)`` (``2b``: the product block's projection
    and QR temporaries; instead of :data:`BASIS_MEMORY_BYTES`'s cap),
    a given ``max_basis`` is lowered to fit, and a budget below ``k' + 4b`` vectors raises
    :class:`~dynascope.probes.budget.MemoryBudgetError`; the dense solver runs only when its float64
    matrix (``8·P²`` bytes) fits too. ``None``: the cap of :data:`BASIS_MEMORY_BYTES` (or half the available
    memory when that is less).
    ``basis_device``: where the vectors live (e.g. ``"cpu"`` while the products run on a GPU).
    ``method``: ``"lanczos"``, ``"dense"`` (``P`` products, dense float64 ``eigh``: exact, every copy) or
    ``"auto"`` (dense for small or degenerate problems, :func:`use_dense`).

    Multiplicities: a run with block size ``b`` holds at most ``b`` copies of an eigenvalue. When a
    converged run shows a cluster of ``b`` values followed by other wanted values, its wanted
    vectors are *locked* and a new run from a fresh random block on their orthogonal complement
    looks for further copies; the results are merged. A cluster that could still hide copies when
    the budget or the memory runs out marks the values after it as not converged.
    """
    check_choice("which", which, WHICH)
    check_int("k", k, min=1, max=op.vspace.size)
    check_float("tol", tol, min=0, min_open=True)
    check_int("seed", seed)
    check_choice("method", method, METHODS)
    op = krylov_precision(op)
    P = op.vspace.size  # the dimension; this process holds op.size rows of each vector
    n_want, b, budget, cap, cap_bytes = _plan(op, k, which, max_iter, max_basis, block_size, memory_budget)
    device = torch.device(basis_device) if basis_device is not None else op.device
    dense_fits = memory_budget is None or 8 * P * P <= memory_budget
    dense = dense_fits and use_dense(P, n_want, max_iter, v0 is not None)
    if method == "dense" or (method == "auto" and dense):
        if v0 is not None:
            _start_block(op, v0, b, seed, device)  # validated; a dense solve needs no start
        out = _dense_eigsh(op, k, which, tol, return_vectors, basis_device)
        return dataclasses.replace(out, memory_budget=cap_bytes)
    start_matvecs = op.n_matvecs
    found = _locked_runs(
        op, _start_block(op, v0, b, seed, device), k=k, which=which, tol=tol, n_want=n_want, b=b,
        budget=budget, cap=cap, seed=seed, device=device,
    )  # fmt: skip
    sel, out_conv = _select(found, k, which, tol)
    return EigshOutput(
        values=found.values[sel].clone(),
        vectors=_gather_vectors(op, found.locked, sel, device) if return_vectors else None,
        residuals=found.residuals[sel].clone(),
        converged=out_conv,
        n_matvecs=op.n_matvecs - start_matvecs,
        n_iter=found.used,
        n_passes=found.passes,
        block_size=b,
        n_restarts=found.restarts,
        n_runs=found.runs,
        peak_basis_vectors=found.peak,
        max_basis=cap,
        memory_budget=cap_bytes,
        budget_binds=cap < min(P, 3 * n_want + 20 + 2 * b),
    )


def _plan(
    op: LinearOperator,
    k: int,
    which: str,
    max_iter: int | None,
    max_basis: int | None,
    block_size: int | None,
    memory_budget: int | None = None,
) -> tuple[int, int, int, int, int]:
    """``(n_want, b, budget, cap, cap_bytes)``: wanted values, block width, product budget, most vectors
    held and the bytes they were planned within (validated against each other and ``memory_budget``; see
    :func:`eigsh`)."""
    check_int("max_iter", max_iter, min=1, optional=True)
    check_int("max_basis", max_basis, min=1, optional=True)
    check_int("block_size", block_size, min=1, optional=True)
    P = op.vspace.size
    n_want = min(2 * k if which == "BE" else k, P)
    b = min(block_size if block_size is not None else 1 if n_want == 1 else 2, P)
    budget = max_iter if max_iter is not None else max(300, 60 * k)
    if budget < n_want:
        raise ValueError(f"max_iter={budget} is smaller than the number of wanted eigenvalues {n_want}")
    itemsize = torch.empty(0, dtype=op.dtype).element_size()
    if memory_budget is None:
        cap_bytes = min(BASIS_MEMORY_BYTES, resolve_budget(None, op.device))  # and at least 2k' + 4 + 2b
        cap = default_max_basis(n_want, b, P, itemsize, cap_bytes) if max_basis is None else min(P, max_basis)
    else:
        check_int("memory_budget", memory_budget, min=1)
        cap_bytes = memory_budget
        fits = memory_budget // max(op.size * itemsize, 1) - 2 * b  # 2b: the block's projection and QR
        cap = min(P, 3 * n_want + 20 + 2 * b if max_basis is None else max_basis, fits)
        if cap < min(P, n_want + 2 * b):
            need = (min(P, n_want + 2 * b) + 2 * b) * op.size * itemsize
            what = f"{n_want} wanted vectors, two blocks of {b} and the block's temporaries: (k' + 4b)·P"
            raise too_small("hessian_eigenvalues", memory_budget, need, what)
    if cap < min(P, n_want + 2 * b):
        raise ValueError(
            f"max_basis={cap} is too small: it must hold the {n_want} wanted vectors plus two blocks "
            f"of {b} (at least {n_want + 2 * b})"
        )
    return n_want, b, budget, cap, cap_bytes


@dataclass
class _Found:
    """What the Krylov runs of :func:`eigsh` found: the locked wanted values, their residuals and flags,
    their vectors (``locked``), the full clusters not yet looked behind (``doubt``) and the counts."""

    locked: _Basis
    values: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    doubt: list[float | None] = field(default_factory=list)
    scale: float = 1.0
    used: int = 0
    passes: int = 0
    restarts: int = 0
    peak: int = 0
    runs: int = 0


def _locked_runs(
    op: LinearOperator, start: torch.Tensor, *, k: int, which: str, tol: float, n_want: int, b: int,
    budget: int, cap: int, seed: int, device: torch.device,
) -> _Found:  # fmt: skip
    """Krylov runs, each on the orthogonal complement of the vectors the earlier ones locked, until no
    full cluster can hide further copies of a wanted value (or the budget or memory runs out)."""
    P = op.vspace.size
    empty = torch.zeros(0, dtype=torch.float64)
    f = _Found(_Basis(op.vspace), empty, empty, torch.zeros(0, dtype=torch.bool))
    k_run = k
    while True:
        width = min(start.shape[1], budget - f.used, P - f.locked.size)
        X = start[:, :width]
        if f.locked.size:
            f.locked.orthogonalize(X)
        X = _column_major(op.vspace.qr(X)[0])
        run = _krylov_run(
            op, f.locked, X, k=k_run, which=which, tol=tol, budget=budget - f.used, cap=cap - f.locked.size,
            seed=seed + LANCZOS_RESTART_STRIDE * f.runs, device=device,
        )  # fmt: skip
        f.runs, f.used, f.passes = f.runs + 1, f.used + run.used, f.passes + run.passes
        f.restarts, f.peak = f.restarts + run.restarts, max(f.peak, run.peak)
        f.scale = max(float(run.theta.abs().max()), float(f.values.abs().max()) if f.values.numel() else 0.0)
        f.scale = f.scale or 1.0
        floor = tol * torch.clamp(run.theta.abs(), min=EIGENVALUE_FLOOR * f.scale)
        idx = _wanted(run.theta, k_run, which)
        conv = run.res[idx] <= floor[idx]
        # lock this run's wanted vectors; the answer is the best n_want of everything found so far
        run.basis.restart(run.S[:, idx])  # in place: the wanted Ritz vectors, the rest of the basis freed
        f.locked.blocks.extend(run.basis.detached_blocks())
        f.values = torch.cat([f.values, run.theta[idx]])
        f.residuals = torch.cat([f.residuals, run.res[idx]])
        f.converged = torch.cat([f.converged, conv])
        if not bool(conv.all()):
            return f  # out of budget: the doubt of the previous run (if any) stands
        f.doubt = [] if run.exhausted else _capacity_ends(run.theta, run.res, torch.maximum(run.res, floor),
                                                           k_run, which, b)  # fmt: skip
        need = max((int(_displaced(f.values, e, k, which, end, tol, f.scale).sum())
                    for end, e in enumerate(f.doubt) if e is not None), default=0)  # fmt: skip
        if need == 0:
            f.doubt = []
            return f
        if f.used >= budget or f.locked.size + min(need, n_want) + 2 * b > cap:
            return f
        k_run = need
        start = op.vspace.rows(random_vectors(P, b, seed=seed + LANCZOS_RESTART_STRIDE * (f.runs + 101),
                                              dtype=op.dtype, device=device))  # fmt: skip


def _select(found: _Found, k: int, which: str, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, converged)`` of the ``k`` wanted values among those found (descending); a full cluster
    not looked behind marks the values it may displace as not converged."""
    values = found.values
    order = torch.argsort(values)
    sel = order[_wanted(values[order], k, which)]
    sel = sel[torch.argsort(values[sel], descending=True)]
    out_conv = found.converged[sel].clone()
    for end, e in enumerate(found.doubt):
        if e is not None:
            out_conv &= ~_displaced(values, e, k, which, end, tol, found.scale)[sel]
    return sel, out_conv


def _gather_vectors(
    op: LinearOperator, locked: _Basis, sel: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The selected locked columns as one new ``[rows, k]`` tensor (one copy; the basis is freed)."""
    offsets = torch.cumsum(torch.tensor([0] + [B.shape[1] for B in locked.blocks]), 0).tolist()
    vectors = torch.empty(op.size, sel.numel(), dtype=op.dtype, device=device)
    for j, c in enumerate(sel.tolist()):
        blk = max(i for i, o in enumerate(offsets[:-1]) if o <= c)
        vectors[:, j] = locked.blocks[blk][:, c - offsets[blk]]
    locked.blocks.clear()
    return vectors.div_(op.vspace.norms(vectors)).to(op.device)


def _dense_eigsh(
    op: LinearOperator, k: int, which: str, tol: float, return_vectors: bool, basis_device: Any
) -> EigshOutput:
    """Eigenpairs from the dense matrix: ``P`` products in blocks of :data:`DENSE_BLOCK` unit columns, the
    float64 matrix symmetrised, ``torch.linalg.eigh``. Residuals ``‖A y − θ y‖`` are taken with the
    unsymmetrised matrix, so the products' own asymmetry (rounding) shows in them."""
    P, start, sp = op.vspace.size, op.n_matvecs, op.vspace
    device = torch.device(basis_device) if basis_device is not None else op.device
    A = torch.empty(P, P, dtype=torch.float64, device=device)
    passes = 0
    for lo in range(0, P, DENSE_BLOCK):
        hi = min(lo + DENSE_BLOCK, P)
        E = torch.zeros(P, hi - lo, dtype=op.dtype, device=op.device)
        E[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
        A[:, lo:hi] = sp.full(op.matmat(sp.rows(E))).to(device=device, dtype=torch.float64)
        passes += 1
    theta, U = torch.linalg.eigh(0.5 * (A + A.T))
    theta, U = theta.cpu(), U
    idx = _wanted(theta, k, which)
    idx = idx[torch.argsort(theta[idx], descending=True)]
    vals, vecs = theta[idx].clone(), U[:, idx.to(U.device)]
    res = (A @ vecs - vecs * vals.to(vecs.device)).norm(dim=0).cpu()
    scale = float(theta.abs().max()) or 1.0
    conv = res <= tol * torch.clamp(vals.abs(), min=EIGENVALUE_FLOOR * scale)
    return EigshOutput(
        values=vals,
        vectors=sp.rows(vecs).to(device=op.device, dtype=op.dtype) if return_vectors else None,
        residuals=res,
        converged=conv,
        n_matvecs=op.n_matvecs - start,
        n_iter=P,
        n_passes=passes,
        block_size=min(DENSE_BLOCK, P),
        peak_basis_vectors=3 * P * 8 // max(torch.empty((), dtype=op.dtype).element_size(), 1)
        + min(DENSE_BLOCK, P),
        max_basis=P,
        method="dense",
    )


@dataclass(frozen=True)
class TridiagonalBatch:
    """Lanczos tridiagonals of K independent probes.

    ``alpha`` ``[K, m]``, ``beta`` ``[K, m-1]`` (float64), ``steps`` ``[K]`` the valid length of
    each (a probe whose recurrence broke down stops early), ``norms`` ``[K]`` the start vectors' norms;
    ``orthogonality`` ``[K]``: ``max_j |q₁ᵀ q_j|`` over the probe's Lanczos vectors (measured; a lower
    bound on its basis' loss of orthogonality ``max_{i<j} |q_iᵀ q_j|``, ~eps with full reorthogonalisation).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    steps: torch.Tensor
    norms: torch.Tensor
    orthogonality: torch.Tensor | None = None

    def tridiagonal(self, i: int) -> torch.Tensor:
        """The ``[m_i, m_i]`` tridiagonal matrix of probe ``i``."""
        m = int(self.steps[i])
        return _tridiagonal(self.alpha[i, :m].tolist(), self.beta[i, : max(m - 1, 0)].tolist())

    def ritz(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values θ_j and Gauss-quadrature weights τ_j = (e₁ᵀ s_j)² of probe ``i`` (weights sum to 1)."""
        theta, S = torch.linalg.eigh(self.tridiagonal(i))
        return theta, S[0] ** 2


def lanczos_tridiagonal(
    op: LinearOperator, V0: torch.Tensor, steps: int, *, reorthogonalize: bool = True,
    window: int | None = None,
) -> TridiagonalBatch:  # fmt: skip
    """Run ``K = V0.shape[1]`` independent Lanczos recurrences, one ``matmat`` per step for all of them.

    Each column is reorthogonalised (classical Gram–Schmidt, twice) against the ``window`` most recent
    vectors of its own basis (default ``steps``: the whole basis, full reorthogonalisation). Memory:
    ``w · K`` vectors of the basis (a ring buffer, ``w = min(window, steps)``), plus ``q₁`` when ``w < steps``
    (to measure ``orthogonality``), plus the product block and its temporaries. ``window ≥ 2`` keeps the
    three-term recurrence; below ``steps`` the basis may lose orthogonality (ghost copies of converged
    Ritz values; the Gauss moments ``v₁ᵀ A^p v₁`` stay right while orthogonality holds), which
    ``orthogonality`` reports.
    """
    if V0.dim() != 2 or V0.shape[0] != op.size:
        raise ValueError(f"V0 must be [{op.size}, K]; got {tuple(V0.shape)}")
    sp = op.vspace
    steps = min(int(steps), sp.size)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    check_int("window", window, min=2, optional=True)
    w = steps if window is None else min(int(window), steps)
    V0 = V0.to(device=op.device, dtype=op.dtype)
    K = V0.shape[1]
    norms = sp.norms(V0)
    if not torch.all(norms > 0):
        raise ValueError("start vectors must be nonzero")
    Q = torch.zeros(w, op.size, K, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(K, steps, dtype=torch.float64)
    beta = torch.zeros(K, max(steps - 1, 0), dtype=torch.float64)
    length = torch.full((K,), steps, dtype=torch.long)
    active = torch.ones(K, dtype=torch.bool)
    lost = torch.zeros(K, dtype=torch.float64)
    q = V0 / norms
    del V0
    first = q if w < steps else Q[0]
    for j in range(steps):
        Q[j % w] = q
        W = op.matmat(q)
        a = sp.reduce(column_dots(q, W))
        W.sub_(a.to(op.dtype) * q)
        if j > 0:
            W.sub_(beta[:, j - 1].to(op.dtype).to(op.device) * Q[(j - 1) % w])
        if reorthogonalize:
            held = Q[: j + 1] if j < w else Q
            for _ in range(2):
                h = sp.reduce(torch.einsum("jpk,pk->jk", held, W))
                W.sub_(torch.einsum("jpk,jk->pk", held, h))
        alpha[:, j] = torch.where(active, a.cpu(), alpha[:, j])
        if j + 1 == steps:
            break
        b = sp.norms(W.double()).cpu()
        scale = alpha[:, : j + 1].abs().max(dim=1).values.clamp(min=1e-300)
        broke = active & (b <= breakdown_rtol(op.dtype) * scale)
        length = torch.where(broke, torch.full_like(length, j + 1), length)
        active = active & ~broke
        if not bool(active.any()):
            break
        beta[:, j] = torch.where(active, b, torch.zeros_like(b))
        safe = torch.where(active, b, torch.ones_like(b)).to(op.dtype).to(op.device)
        q = torch.where(active.to(op.device), W.div_(safe), torch.zeros_like(W))
        del W
        dots = sp.reduce(column_dots(first, q)).abs().cpu()
        lost = torch.where(active, torch.maximum(lost, dots), lost)
    return TridiagonalBatch(alpha=alpha, beta=beta, steps=length, norms=norms.double().cpu(),
                            orthogonality=lost)  # fmt: skip
