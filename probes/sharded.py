"""Curvature of a model sharded with FSDP2 (``fully_shard``) or wrapped in DDP, where it lives.

Under an initialised process group each rank passes its own data shard; the operator is the Hessian of the
loss averaged over the whole dataset, ``L(θ) = Σ_ranks Σ_{i ∈ shard} ℓ_i(θ) / N``.

* **DDP** keeps full parameters on every rank, so the exact product of :mod:`dynascope.probes.operators`
  runs on ``model.module`` with its per-shard products summed over ranks (``all_reduce``); the Krylov
  vectors are split evenly across ranks (:class:`SplitVectorsOperator`: a product gathers its block whole,
  applies the operator and keeps this rank's rows).
* **FSDP2** gathers parameters outside autograd, so double backward never reaches the shards. The product
  is a central finite difference of gradients, refined by Richardson extrapolation:

      D(h) = (∇L(θ + h v) − ∇L(θ − h v)) / 2h = H v + h² c₃ + O(h⁴)
      R(h) = (4 D(h/2) − D(h)) / 3             = H v + O(h⁴)

  with ``h = s (1 + ‖θ‖) / ‖v‖`` for a relative step ``s`` (default ``ε^{1/5}`` of the parameters' dtype with
  Richardson, ``ε^{1/3}`` without: truncation against rounding). That balance assumes derivatives of one
  scale; a transformer's are not (its ‖θ‖ is mostly LayerNorm gains while its attention weights are ~0.02),
  and there the default step leaves a truncation error of 1e-4 in float64. So the first product
  **calibrates** the step (with Richardson, when ``step`` is not given): while the error estimate ``e``
  below exceeds ``ε^{2/5}`` (the truncation of ``R``, ~``e²``, then sits near ``ε^{4/5}``, the rounding
  level), ``s`` is divided by 4 — at most :data:`FD_CALIBRATION_SHRINKS` times, and back to the previous
  ``s`` once ``e`` grows (rounding has taken over). The steps tried and their estimates are in ``meta``.
  Each gradient is FSDP's own backward
  (sharded, reduce-scattered), kept as this rank's shards. :attr:`FiniteDifferenceHessian.error` is the
  largest ``‖R(h) − D(h/2)‖ / ‖R(h)‖`` over the products: the error of the unextrapolated difference, an
  upper estimate for ``R`` (whose error is O(h⁴); measured in BENCHMARKS.md). Differences of gradients see
  every kink the step crosses: on ReLU networks (where the exact product takes ReLU'' = 0) they can be far
  off — the estimate then exceeds :data:`FD_WARN_ERROR` and a warning says so. Use smooth activations
  (GELU, tanh, SiLU) with FSDP, or DDP's exact product.

**The Krylov basis is sharded** (:mod:`.space`): the operator's vectors are this rank's rows only — for
FSDP2 the local shards of the parameters, in the parameters' layout (so ``θ + h v`` is a local update and a
product gathers nothing); for DDP an even split. Inner products and norms are summed over ranks, so every
rank holds the same projected matrices and eigenvalues, and a basis of ``m`` vectors takes ``m · P / W``
numbers per rank for ``W`` ranks (measured in BENCHMARKS.md). Eigenvectors come back as local shards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..datasets.batching import as_batches
from ..models.outputs import logits_of
from .functional import ModeGuard, forward
from .losses import resolve_loss
from .operators import LinearOperator
from .space import ShardedSpace

__all__ = ["FiniteDifferenceHessian", "SplitVectorsOperator", "is_fsdp", "is_ddp", "sharded_operator"]


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was wrapped by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules())


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _reshard(model: nn.Module) -> None:
    """Every FSDP2 unit back to its shards. A forward without backward (``no_grad``, or before the first
    step) leaves the root unit's parameters gathered, and a shift of the shards would then not reach the
    forward: products read and move the shards only after this."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _all_reduce(t: Tensor) -> Tensor:
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out


#: An error estimate above this (10 %) warns: the loss is not smooth at the step's scale (e.g. ReLU kinks).
FD_WARN_ERROR = 0.1
#: At most this many divisions of the relative step by 4 when the first product calibrates it.
FD_CALIBRATION_SHRINKS = 6


def _local_slice(p: Tensor) -> tuple[slice, int]:
    """Where this rank's shard of a DTensor parameter sits along dim 0 of the full tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(offset[0], offset[0] + shape[0]) if shape else slice(0, 0), math.prod(shape)


class FiniteDifferenceHessian(LinearOperator):
    """``H v`` of an FSDP2-sharded model by Richardson-extrapolated central differences of gradients
    (module docstring). ``data``: this rank's shard as ``(x, y)`` tensors; ``batch_size`` splits it.
    Vectors are this rank's parameter shards, flattened and concatenated in parameter order (``size``
    numbers; ``vspace.size`` is the parameter count)."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        loss: str | Callable = "auto",
        batch_size: int | None = None,
        richardson: bool = True,
        step: float | None = None,
        mode: str = "eval",
    ) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("a sharded model is probed under an initialised torch.distributed process group")
        self.model = model
        _reshard(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        plain = [n for n, p in model.named_parameters() if p.requires_grad and not hasattr(p, "to_local")]
        if plain:
            raise ValueError(f"parameters {plain[:3]} are not sharded by fully_shard (shard the root module)")
        dtype = self.params[0].dtype
        index, offset = [], 0
        for p, _, where in self._locals():
            index.append(torch.arange(offset + where.start, offset + where.stop))
            offset += p.numel()
        self.sizes = [local.numel() for _, local, _ in self._locals()]
        super().__init__(sum(self.sizes), dtype, self.params[0].device)
        self.vspace = ShardedSpace(offset, torch.cat(index))
        self.batches = [(b.x, b.y) for b in as_batches(data, batch_size, device=self.device, dtype=dtype)]
        if not self.batches:
            raise ValueError("this rank's data shard holds no samples")
        self.loss = resolve_loss(loss, self.batches[0][1])
        count = float(sum(self.loss.count(b) for _, b in self.batches))
        self.num_samples = int(_all_reduce(torch.tensor(count)))
        self.world = torch.distributed.get_world_size()
        self.richardson = richardson
        eps = torch.finfo(dtype).eps
        self.step = step if step is not None else eps ** (1 / 5 if richardson else 1 / 3)
        self._calibrate = richardson and step is None
        self.calibration: list[tuple[float, float]] = []  # (relative step, error estimate) tried
        self.error = 0.0
        self._warned = False
        self.n_gradients = 0
        self.kind, self.mode, self.reduce_fn, self.columnwise = "hessian", mode, _all_reduce, True
        self.fallbacks: list[str] = []
        self._meta = {
            "product": "finite difference of gradients" + (", Richardson-extrapolated" if richardson else ""),
            "world_size": self.world, "n_samples": self.num_samples,
            "basis": "sharded: each rank holds its parameter shards' rows",
        }  # fmt: skip

    def meta(self) -> dict[str, Any]:
        """The operator's keys of a probe's ``.meta`` (as ``CurvatureOperator.meta``, plus the product's)."""
        return {
            "operator": "hessian", "loss": self.loss.name, "n_params": self.vspace.size,
            "dtype": str(self.dtype),
            "reduction": f"mean over {self.num_samples} {self.loss.unit} on {self.world} ranks",
            "device": str(self.device), "mode": self.mode, "backend": "finite differences (FSDP2)",
            "fd_error_estimate": self.error, **self._meta, "fd_relative_step": self.step,
            "fd_calibration": [{"relative_step": a, "error_estimate": e} for a, e in self.calibration],
        }  # fmt: skip

    def loss_value(self) -> float:
        """The dataset-mean loss L(θ) over every rank's shard."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), ModeGuard(self.model, self.mode):
            for x, y in self.batches:
                total += self.loss.total(logits_of(forward(self.model, x)), y).double()
        _reshard(self.model)
        return float(_all_reduce(total)) / self.num_samples

    # ------------------------------------------------------------------ parameters as one vector
    def _locals(self) -> Iterator[tuple[Tensor, Tensor, slice]]:
        """Each parameter's local shard and where it sits in that parameter's full flattened vector."""
        for p in self.params:
            rows, _ = _local_slice(p)
            local = p.to_local()
            width = math.prod(p.shape[1:])
            yield p, local, slice(rows.start * width, rows.stop * width)

    def _theta_norm(self) -> float:
        sq = sum(float(local.detach().double().pow(2).sum()) for _, local, _ in self._locals())
        return math.sqrt(float(_all_reduce(torch.tensor(sq, dtype=torch.float64))))

    def _shift(self, v: Tensor, alpha: float) -> None:
        """θ ← θ + α v on this rank's shards (``v``: this rank's rows)."""
        with torch.no_grad():
            for (_, local, _), part in zip(self._locals(), v.split(self.sizes), strict=True):
                local.add_(part.view_as(local), alpha=alpha)

    def gradient(self) -> Tensor:
        """∇L(θ) at the current parameters: this rank's rows (its shards of FSDP's reduced gradients)."""
        for p in self.params:
            p.grad = None
        with ModeGuard(self.model, self.mode):  # eval: no dropout, running statistics (as every probe)
            for x, y in self.batches:
                out = logits_of(forward(self.model, x))
                # FSDP averages gradients over ranks: scale so that the average is Σ_all ℓ / N
                (self.loss.total(out, y) * (self.world / self.num_samples)).backward()
        grads = []
        for p, local, _ in self._locals():
            grads.append((p.grad.to_local() if p.grad is not None else torch.zeros_like(local)).reshape(-1))
        self.n_gradients += 1
        return torch.cat(grads).to(self.dtype)

    def _difference(self, v: Tensor, h: float) -> Tensor:
        _reshard(self.model)
        saved = [local.detach().clone() for _, local, _ in self._locals()]
        try:
            self._shift(v, h)
            plus = self.gradient()
            self._shift(v, -2 * h)
            minus = self.gradient()
        finally:
            with torch.no_grad():
                for (_, local, _), s in zip(self._locals(), saved, strict=True):
                    local.copy_(s)
        return (plus - minus) / (2 * h)

    def _richardson(self, v: Tensor, h: float) -> tuple[Tensor, float]:
        """``(R(h), e)``: the extrapolated product and the error estimate ``‖R(h) − D(h/2)‖ / ‖R(h)‖``."""
        d_h, d_half = self._difference(v, h), self._difference(v, h / 2)
        r = (4 * d_half - d_h) / 3
        return r, self.vspace.norm(r - d_half) / (self.vspace.norm(r) or 1.0)

    def _calibrated(self, v: Tensor, scale: float) -> tuple[Tensor, float]:
        """The first product, at the step the calibration of the module docstring settles on (kept)."""
        target = torch.finfo(self.dtype).eps ** (2 / 5)
        r, e = self._richardson(v, self.step * scale)
        self.calibration.append((self.step, e))
        for _ in range(FD_CALIBRATION_SHRINKS):
            if e <= target:
                break
            r2, e2 = self._richardson(v, self.step / 4 * scale)
            self.calibration.append((self.step / 4, e2))
            if e2 >= e:  # rounding took over: keep the previous step
                break
            self.step, r, e = self.step / 4, r2, e2
        return r, e

    def _matmat(self, V: Tensor) -> Tensor:
        theta = self._theta_norm()
        cols = []
        for j in range(V.shape[1]):
            v = V[:, j]
            norm = self.vspace.norm(v)
            if norm == 0.0:
                cols.append(torch.zeros_like(v))
                continue
            if not self.richardson:
                cols.append(self._difference(v, self.step * (1.0 + theta) / norm))
                continue
            if self._calibrate:
                self._calibrate = False
                r, e = self._calibrated(v, (1.0 + theta) / norm)
            else:
                r, e = self._richardson(v, self.step * (1.0 + theta) / norm)
            self.error = max(self.error, e)
            cols.append(r)
        if self.error > FD_WARN_ERROR and not self._warned:
            self._warned = True
            warnings.warn(
                f"finite-difference Hessian products of the FSDP2 model disagree at half the step by "
                f"{self.error:.2g} (relative): the loss is not smooth at the step's scale (ReLU kinks?); "
                "use smooth activations, or DDP's exact product", UserWarning, stacklevel=3,
            )  # fmt: skip
        return torch.stack(cols, dim=1)


class SplitVectorsOperator(LinearOperator):
    """``op`` (whole vectors; products summed over ranks) on vectors split evenly across the ranks
    (:meth:`~.space.ShardedSpace.even`): a product gathers its block whole (``[P, b]`` for the product's
    duration), applies ``op`` and keeps this rank's rows, so only the Krylov basis is split. Other
    attributes (``loss``, ``meta``, ...) are ``op``'s."""

    def __init__(self, op: LinearOperator) -> None:
        vspace = ShardedSpace.even(op.size)
        super().__init__(vspace.local_size, op.dtype, op.device)
        self.vspace, self.inner = vspace, op

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during unpickling or construction)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def meta(self) -> dict[str, Any]:
        return {**self.inner.meta(), "basis": "split evenly across ranks"}

    def _matmat(self, V: Tensor) -> Tensor:
        return self.vspace.rows(self.inner.matmat(self.vspace.full(V)))


def sharded_operator(
    model: nn.Module, data: Any, *, loss: str | Callable = "auto", spec: Any = None, **kwargs: Any
) -> LinearOperator:
    """The Hessian operator of a sharded model on this rank's ``data`` (module docstring): DDP → the exact
    product on ``model.module`` summed over ranks; FSDP2 → :class:`FiniteDifferenceHessian`. ``spec``: an
    :class:`~dynascope.probes.operators.OperatorSpec` to take the loss, batch size and operator from."""
    from .operators import OperatorSpec

    spec = spec if spec is not None else OperatorSpec(kind="hessian", loss=loss)
    if spec.kind != "hessian":
        raise ValueError(f"a sharded model's {spec.kind} operator is not built yet; the Hessian is")
    if is_ddp(model):
        if spec.reduce_fn is not None:
            raise ValueError("a DDP-wrapped model sums its products over ranks itself; pass no reduce_fn")
        return SplitVectorsOperator(spec.replace(reduce_fn=_all_reduce).build(model.module, data))
    if is_fsdp(model):
        dtype = next(model.parameters()).dtype
        if spec.dtype is not None and spec.dtype != dtype:
            raise ValueError(f"an FSDP2-sharded model computes in its own dtype ({dtype}), not {spec.dtype}: "
                             "cast the model before fully_shard")  # fmt: skip
        return FiniteDifferenceHessian(
            model, data, loss=spec.loss, batch_size=spec.batch_size, mode=spec.mode, **kwargs
        )
    raise ValueError("sharded_operator: the model is neither FSDP2-sharded (fully_shard) nor DDP-wrapped")
