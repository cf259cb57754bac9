"""Lanczos on any symmetric :class:`~dynascope.probes.operators.LinearOperator`.

Both routines keep the Krylov basis ``Q`` in the operator's dtype and device, orthogonalise every
new vector against the whole basis twice (classical Gram-Schmidt, "twice is enough"), and build the
tridiagonal ``T`` in float64.

* :func:`eigsh` — extremal eigenpairs. A Ritz pair ``(θ, y = Q s)`` has residual
  ``‖A y − θ y‖ = β_m |s_m|``; it is *converged* when that residual is at most
  ``tol · max(|θ|, 1e-3 · ‖T‖)``. Iteration stops when all wanted pairs are converged (never on the
  change of θ between iterations); unconverged pairs are reported as such.
* :func:`lanczos_tridiagonal` — several independent recurrences at once (one ``matmat`` per step
  serves all probes), as needed by stochastic Lanczos quadrature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .operators import LinearOperator, random_vectors
from .seeds import LANCZOS_RESTART_STRIDE
from .validation import check_choice, check_float, check_int

#: A warm start from ``[P, j]`` eigenvectors adds a seeded random direction of this relative norm, so the
#: Krylov space is not confined to their span.
WARM_START_NOISE = 1e-2
#: Ritz pairs are converged when ``‖A u − θ u‖ ≤ tol·max(|θ|, EIGENVALUE_FLOOR·max|θ|)``: eigenvalues
#: below this fraction of the largest are judged on an absolute scale (relative error is meaningless there).
EIGENVALUE_FLOOR = 1e-3
#: float64 breakdown: ``β_j ≤ 1e-10·scale`` marks an invariant subspace (see :func:`breakdown_rtol`).
BREAKDOWN_RTOL_FLOAT64 = 1e-10
#: In lower precisions rounding alone leaves ``β ≈ eps·‖A‖``: breakdown below ``10·eps`` of the scale.
BREAKDOWN_EPS_MULTIPLE = 10


def breakdown_rtol(dtype: torch.dtype) -> float:
    """Relative size below which a Lanczos ``β_j`` is a breakdown (an invariant subspace) in ``dtype``:
    ``max(1e-10, 10·eps)`` — 1e-10 in float64, 1.2e-6 in float32, 9.8e-3 in float16, 7.8e-2 in bfloat16."""
    return max(BREAKDOWN_RTOL_FLOAT64, BREAKDOWN_EPS_MULTIPLE * torch.finfo(dtype).eps)


WHICH = ("LA", "SA", "LM", "BE")


@dataclass(frozen=True)
class EigshOutput:
    """Eigenpairs from :func:`eigsh`, sorted by descending eigenvalue.

    ``values`` (float64), ``vectors`` ``[P, k]`` (operator dtype, unit columns, or ``None``),
    ``residuals`` ``‖A y − θ y‖`` (float64), ``converged`` (bool per value), ``n_matvecs``,
    ``n_iter`` (Krylov dimension reached).
    """

    values: torch.Tensor
    vectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    n_iter: int


def _tridiagonal(alpha: list[float], beta: list[float]) -> torch.Tensor:
    a = torch.tensor(alpha, dtype=torch.float64)
    T = torch.diag(a)
    if len(alpha) > 1:
        b = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
        T += torch.diag(b, 1) + torch.diag(b, -1)
    return T


def _pick(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices (into ascending ``theta``) of the wanted Ritz values."""
    m = theta.numel()
    k = min(k, m)
    if which == "LA":
        return torch.arange(m - k, m)
    if which == "SA":
        return torch.arange(0, k)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:k]
    lo = torch.arange(0, min(k, m))  # "BE": k from each end
    hi = torch.arange(max(m - k, 0), m)
    return torch.unique(torch.cat([lo, hi]))


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Remove the span of the rows of ``Q`` from ``w`` (two Gram-Schmidt sweeps)."""
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w


def _start_vector(op: LinearOperator, v0: torch.Tensor | None, seed: int) -> torch.Tensor:
    if v0 is None:
        return random_vectors(op.size, 1, seed=seed, dtype=op.dtype, device=op.device)[:, 0]
    v0 = v0.to(device=op.device, dtype=op.dtype)
    if v0.dim() == 2:  # warm start from previous eigenvectors: their sum plus a small random part
        noise = random_vectors(op.size, 1, seed=seed, dtype=op.dtype, device=op.device)[:, 0]
        v0 = v0.sum(dim=1) / max(v0.shape[1], 1) ** 0.5
        v0 = v0 + WARM_START_NOISE * v0.norm() * noise / noise.norm()
    if v0.shape != (op.size,) or not torch.isfinite(v0).all() or float(v0.norm()) == 0.0:
        raise ValueError(f"v0 must be a finite nonzero vector of length {op.size} (or [P, j] eigenvectors)")
    return v0


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
) -> EigshOutput:
    """Extremal eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
    magnitude, ``"BE"`` k from both ends. ``v0``: start vector, or ``[P, j]`` previous
    eigenvectors for a warm start. ``max_iter`` (default ``min(P, max(100, 20k))``) bounds the
    Krylov dimension, so memory is ``max_iter · P`` numbers of the operator's dtype.
    """
    check_choice("which", which, WHICH)
    check_int("k", k, min=1, max=op.size)
    check_float("tol", tol, min=0, min_open=True)
    check_int("max_iter", max_iter, min=1, optional=True)
    check_int("seed", seed)
    n_want = 2 * k if which == "BE" else k
    n_want = min(n_want, op.size)
    m_max = min(op.size, max_iter if max_iter is not None else max(100, 20 * k))
    if m_max < n_want:
        raise ValueError(f"max_iter={m_max} is smaller than the number of wanted eigenvalues {n_want}")
    start_matvecs = op.n_matvecs
    Q = torch.zeros(m_max, op.size, dtype=op.dtype, device=op.device)
    q = _start_vector(op, v0, seed)
    q = q / q.norm()
    alpha: list[float] = []
    beta: list[float] = []
    restarts = 0
    breakdown = breakdown_rtol(op.dtype)
    theta = S = idx = res = None
    for j in range(m_max):
        Q[j] = q
        w = op.matvec(q)
        a = float(torch.dot(q.double(), w.double()))
        w = w - a * q
        if j > 0:
            w = w - beta[j - 1] * Q[j - 1]
        w = _orthogonalize(w, Q[: j + 1])
        b = float(w.norm())
        alpha.append(a)
        T = _tridiagonal(alpha, beta)
        theta, S = torch.linalg.eigh(T)
        scale = float(theta.abs().max()) or 1.0
        idx = _pick(theta, k, which)
        res = b * S[-1, idx].abs()
        conv = res <= tol * torch.clamp(theta[idx].abs(), min=EIGENVALUE_FLOOR * scale)
        done = j + 1 == op.size or (idx.numel() >= n_want and bool(conv.all()))
        if done or j + 1 == m_max:
            break
        if b <= breakdown * scale * max(1.0, abs(a)) or b == 0.0:
            # invariant subspace: restart with a fresh random direction orthogonal to the basis
            restarts += 1
            w = random_vectors(
                op.size, 1, seed=seed + LANCZOS_RESTART_STRIDE * restarts, dtype=op.dtype, device=op.device
            )[:, 0]
            w = _orthogonalize(w, Q[: j + 1])
            b_next = float(w.norm())
            if b_next == 0.0:
                break
            beta.append(0.0)
            q = w / b_next
            continue
        beta.append(b)
        q = w / b
    assert theta is not None and S is not None and idx is not None and res is not None
    m = len(alpha)
    order = torch.argsort(theta[idx], descending=True)
    idx, res = idx[order], res[order]
    values = theta[idx]
    conv = res <= tol * torch.clamp(values.abs(), min=EIGENVALUE_FLOOR * (float(theta.abs().max()) or 1.0))
    vectors = None
    if return_vectors:
        vectors = Q[:m].T @ S[:, idx].to(op.dtype).to(op.device)
        vectors = vectors / vectors.norm(dim=0, keepdim=True)
    return EigshOutput(
        values=values.clone(),
        vectors=vectors,
        residuals=res.clone(),
        converged=conv.clone(),
        n_matvecs=op.n_matvecs - start_matvecs,
        n_iter=m,
    )


@dataclass(frozen=True)
class TridiagonalBatch:
    """Lanczos tridiagonals of K independent probes.

    ``alpha`` ``[K, m]``, ``beta`` ``[K, m-1]`` (float64), ``steps`` ``[K]`` the valid length of
    each (a probe whose recurrence broke down stops early), ``norms`` ``[K]`` the start vectors' norms.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    steps: torch.Tensor
    norms: torch.Tensor

    def tridiagonal(self, i: int) -> torch.Tensor:
        """The ``[m_i, m_i]`` tridiagonal matrix of probe ``i``."""
        m = int(self.steps[i])
        return _tridiagonal(self.alpha[i, :m].tolist(), self.beta[i, : max(m - 1, 0)].tolist())

    def ritz(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values θ_j and Gauss-quadrature weights τ_j = (e₁ᵀ s_j)² of probe ``i`` (weights sum to 1)."""
        theta, S = torch.linalg.eigh(self.tridiagonal(i))
        return theta, S[0] ** 2


def lanczos_tridiagonal(
    op: LinearOperator, V0: torch.Tensor, steps: int, *, reorthogonalize: bool = True
) -> TridiagonalBatch:
    """Run ``K = V0.shape[1]`` independent Lanczos recurrences, one ``matmat`` per step for all of them.

    Each column is fully reorthogonalised against its own basis (memory ``steps · P · K``).
    """
    if V0.dim() != 2 or V0.shape[0] != op.size:
        raise ValueError(f"V0 must be [{op.size}, K]; got {tuple(V0.shape)}")
    steps = min(int(steps), op.size)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    V0 = V0.to(device=op.device, dtype=op.dtype)
    K = V0.shape[1]
    norms = V0.norm(dim=0)
    if not torch.all(norms > 0):
        raise ValueError("start vectors must be nonzero")
    Q = torch.zeros(steps, op.size, K, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(K, steps, dtype=torch.float64)
    beta = torch.zeros(K, max(steps - 1, 0), dtype=torch.float64)
    length = torch.full((K,), steps, dtype=torch.long)
    active = torch.ones(K, dtype=torch.bool)
    q = V0 / norms
    for j in range(steps):
        Q[j] = q
        W = op.matmat(q)
        a = (q.double() * W.double()).sum(dim=0)
        W = W - a.to(op.dtype) * q
        if j > 0:
            W = W - beta[:, j - 1].to(op.dtype).to(op.device) * Q[j - 1]
        if reorthogonalize:
            for _ in range(2):
                h = torch.einsum("jpk,pk->jk", Q[: j + 1], W)
                W = W - torch.einsum("jpk,jk->pk", Q[: j + 1], h)
        alpha[:, j] = torch.where(active, a.cpu(), alpha[:, j])
        if j + 1 == steps:
            break
        b = W.double().norm(dim=0).cpu()
        scale = alpha[:, : j + 1].abs().max(dim=1).values.clamp(min=1e-300)
        broke = active & (b <= breakdown_rtol(op.dtype) * scale)
        length = torch.where(broke, torch.full_like(length, j + 1), length)
        active = active & ~broke
        if not bool(active.any()):
            break
        beta[:, j] = torch.where(active, b, torch.zeros_like(b))
        safe = torch.where(active, b, torch.ones_like(b)).to(op.dtype).to(op.device)
        q = torch.where(active.to(op.device), W / safe, torch.zeros_like(W))
    return TridiagonalBatch(alpha=alpha, beta=beta, steps=length, norms=norms.double().cpu())
