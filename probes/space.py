"""The vector space the Krylov solvers work in: where a vector's numbers live and how inner products sum.

:class:`VectorSpace` holds whole vectors in one process; its operations are the plain tensor ops, so the
solvers (:mod:`.lanczos`, :mod:`.density`, :mod:`.trace`) compute exactly what they computed before it.
:class:`ShardedSpace` holds each vector as this rank's rows of it (the rest on the other ranks of a
``torch.distributed`` group): an inner product is a local product summed over ranks (``all_reduce``), so a
Krylov basis of ``m`` vectors of dimension ``P`` takes ``m · P_local`` numbers per rank (``P_local ≈ P /
world size``). The solvers touch the basis only through

* ``reduce(t)`` — the sum over ranks of a small local result (``Xᵀ W``, column dots, squared norms),
* ``norms(X)`` — column 2-norms,
* ``qr(X)`` — an orthonormal basis of the columns (``(Q, R)``, ``X = Q R``),
* ``rows(V)`` / ``full(X)`` — this rank's rows of a whole ``[P, K]`` matrix and back (random start
  vectors are drawn whole from their seed and cut, so every world size starts from the same vectors).

An operator's ``size`` is the length of the vectors it takes (``P_local``); ``op.vspace.size`` is ``P``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ShardedSpace", "VectorSpace"]


class VectorSpace:
    """Vectors of length ``size`` held whole in this process (the plain tensor operations)."""

    sharded = False

    def __init__(self, size: int) -> None:
        self.size = int(size)

    @property
    def local_size(self) -> int:
        return self.size

    def reduce(self, t: Tensor) -> Tensor:
        """The sum over ranks of a small local result: ``t`` itself in one process."""
        return t

    def norm(self, x: Tensor) -> float:
        """The 2-norm of a vector (or Frobenius norm of a block)."""
        return float(x.norm())

    def norms(self, X: Tensor) -> Tensor:
        """Column 2-norms of ``X`` ``[P, K]`` (in ``X``'s dtype)."""
        return X.norm(dim=0)

    def qr(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``X = Q R`` (``torch.linalg.qr``, reduced)."""
        return torch.linalg.qr(X)

    def rows(self, V: Tensor) -> Tensor:
        """This process's rows of a whole ``[P, K]`` matrix: all of them."""
        return V

    def full(self, X: Tensor) -> Tensor:
        """The whole ``[P, K]`` matrix from this process's rows: ``X`` itself."""
        return X


class ShardedSpace(VectorSpace):
    """Vectors of dimension ``size`` of which this rank holds the rows ``index`` (a ``long`` tensor, in the
    order of the local vectors); the ranks' index sets partition ``range(size)``. Inner products are summed
    over the default process group."""

    sharded = True

    def __init__(self, size: int, index: Tensor) -> None:
        super().__init__(size)
        self.index = index

    @classmethod
    def even(cls, size: int) -> ShardedSpace:
        """Contiguous rows split as evenly as the ranks allow (rank ``r``: ``[r P / W, (r + 1) P / W)``)."""
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        lo, hi = (size * r // world for r in (rank, rank + 1))
        return cls(size, torch.arange(lo, hi))

    @property
    def local_size(self) -> int:
        return int(self.index.numel())

    def reduce(self, t: Tensor) -> Tensor:
        out = t.detach().clone()
        torch.distributed.all_reduce(out)
        return out

    def norm(self, x: Tensor) -> float:
        return float(self.reduce(x.double().pow(2).sum()).sqrt())

    def norms(self, X: Tensor) -> Tensor:
        return self.reduce(X.double().pow(2).sum(dim=0)).sqrt().to(X.dtype)

    def qr(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Modified Gram–Schmidt, each column twice, with all-reduced inner products (``b`` small
        reductions per sweep). A column that is numerically in the span of the earlier ones (``|R_ii| ≤
        eps · ‖X‖``) becomes zero, ``R_ii = 0`` — ``QQᵀ`` stays the projector on ``X``'s span."""
        Q = X.clone()
        b = X.shape[1]
        R = torch.zeros(b, b, dtype=torch.float64)
        tiny = torch.finfo(X.dtype).eps * max(float(self.norms(X).max()) if b else 0.0, 1e-300) * b
        for i in range(b):
            w = Q[:, i]
            for _ in range(2):
                if i:
                    c = self.reduce(Q[:, :i].T @ w)
                    w.sub_(Q[:, :i] @ c)
                    R[:i, i] += c.double().cpu()
            r = self.norm(w)
            if r > tiny:
                R[i, i] = r
                w.div_(r)
            else:
                w.zero_()
        return Q, R.to(device=X.device, dtype=X.dtype)

    def rows(self, V: Tensor) -> Tensor:
        return V[self.index.to(V.device)]

    def full(self, X: Tensor) -> Tensor:
        """All-reduce of the rows scattered into zeros: ``[P, K]`` on every rank (small problems only)."""
        out = torch.zeros(self.size, *X.shape[1:], dtype=X.dtype, device=X.device)
        out[self.index.to(X.device)] = X
        torch.distributed.all_reduce(out)
        return out
