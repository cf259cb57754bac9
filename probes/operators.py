"""Matrix-free symmetric linear operators over the (flattened) parameter space.

One abstraction serves every curvature probe: :class:`LinearOperator` has ``matvec`` and a
multi-vector ``matmat`` (one data pass for K vectors), counts its products, and exports to
``scipy.sparse.linalg.LinearOperator``. :class:`CurvatureOperator` implements, for the mean
loss over a whole dataset ``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)``:

* ``"hessian"``: ``H = ∇²_θ L``;
* ``"ggn"``: the generalized Gauss-Newton ``G = (1/N) Σ_i J_iᵀ (∇²_f ℓ_i) J_i``, ``J_i = ∂f(x_i)/∂θ``;
* ``"fisher"``: the empirical Fisher ``F = (1/N) Σ_i g_i g_iᵀ``, ``g_i = ∇_θ ℓ_i``.

Products are summed over batches (each batch contributes ``Σ_{i∈b}`` / N) and, when a
``reduce_fn`` is given (e.g. ``torch.distributed.all_reduce``), over data shards too.

An operator is defined by the model, the data and an :class:`OperatorSpec` (kind, loss, parameter
block, batching, mode, backend, dtype, device, shard reduction): ``OperatorSpec(...).build(model, data)``
is the one constructor every probe uses (``CurvatureOperator(model, data, spec)`` and
:func:`make_operator` are the same call). The model is seen through
:class:`~dynascope.probes.functional.FunctionalModel`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from .functional import (
    MODES,
    FunctionalModel,
    ModeGuard,
    OutputSelector,
    derivative_error,
    unused_parameters,
    warn_unused,
)
from .losses import Loss, resolve_loss
from .space import VectorSpace
from .validation import check_choice, check_int

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
OPERATOR_KINDS = ("hessian", "ggn", "fisher")
BACKENDS = ("auto", "graph", "func")


class LinearOperator:
    """A symmetric linear operator on vectors of length ``size``.

    Subclasses implement ``_matmat(V [size, K]) -> [size, K]``. ``n_matvecs`` counts
    operator-vector products (a ``matmat`` with K columns counts K); ``n_passes`` counts
    data passes (one per ``matmat``).
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = int(size)
        #: where the vectors' numbers live and how their inner products sum (:mod:`.space`); wrappers of
        #: another operator take its ``vspace``, a sharded operator sets a :class:`~.space.ShardedSpace`
        self.vspace: VectorSpace = VectorSpace(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvecs = 0
        self.n_passes = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[size, K]``."""
        if V.dim() != 2 or V.shape[0] != self.size:
            raise ValueError(f"matmat expects a [{self.size}, K] matrix; got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat(V)
        self.n_matvecs += V.shape[1]
        self.n_passes += 1
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for a vector of length ``size``."""
        if v.dim() != 1:
            raise ValueError(f"matvec expects a vector; got shape {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """The full ``[size, size]`` matrix by products with identity columns (tests/small models only)."""
        cols = []
        for lo in range(0, self.size, chunk):
            hi = min(lo + chunk, self.size)
            E = torch.zeros(self.size, hi - lo, dtype=self.dtype, device=self.device)
            E[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as SciPyOperator

        def mv(x: Any) -> Any:
            x = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            out = self.matvec(x.reshape(-1)) if x.dim() == 1 or x.shape[1] == 1 else self.matmat(x)
            return out.detach().cpu().double().numpy().reshape(x.shape)

        def mm(X: Any) -> Any:
            X = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(X).detach().cpu().double().numpy()

        return SciPyOperator(self.shape, matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)


class DenseOperator(LinearOperator):
    """A symmetric matrix held explicitly (synthetic spectra, tests, small kernels)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix; got {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


@dataclass(frozen=True)
class OperatorSpec:
    """Everything besides the model and the data that defines a :class:`CurvatureOperator`.

    Frozen, compared and hashed by value (``params`` is normalised to a tuple, ``device`` to a
    ``torch.device``), validated on construction. Fields:

    kind:
        ``"hessian"``, ``"ggn"`` or ``"fisher"``.
    loss:
        ``"auto"``, a built-in name, a callable or a :class:`~dynascope.probes.losses.Loss`.
    params:
        Restrict to a parameter block (names or module prefixes); the others are held fixed.
    batch_size:
        Split tensor data into batches of this size (``None``: the source's batching, one batch for tensors).
    mode:
        ``"eval"`` (BatchNorm running statistics, no dropout) or ``"train"``.
    backend:
        ``"auto"``, ``"graph"`` or ``"func"`` (see :class:`CurvatureOperator`).
    dtype, device:
        Evaluate in this dtype / on this device (the model is copied when they differ from its own).
    reduce_fn:
        Sums a local product over data shards (``all_reduce``); also applied to the local sample count.
    max_vectors:
        Vectors per batched product (memory ``max_vectors · P`` per pass).
    output:
        What the loss sees of the model's outputs: ``None`` (``.logits``, else the first tensor), a key,
        an attribute, an index or a callable (:func:`~dynascope.probes.functional.select_output`).
    """

    kind: str = "hessian"
    loss: str | Callable | Loss = "auto"
    params: tuple[str, ...] | None = None
    batch_size: int | None = None
    mode: str = "eval"
    backend: str = "auto"
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    reduce_fn: ReduceFn | None = None
    max_vectors: int = 32
    output: OutputSelector = None

    def __post_init__(self) -> None:
        if self.kind not in OPERATOR_KINDS:
            raise ValueError(f"unknown operator {self.kind!r}; choose one of {OPERATOR_KINDS}")
        check_choice("mode", self.mode, MODES)
        check_choice("backend", self.backend, BACKENDS)
        check_int("batch_size", self.batch_size, min=1, optional=True)
        check_int("max_vectors", self.max_vectors, min=1)
        if isinstance(self.loss, Mapping):  # a loss spec with options: resolved (hashable) here
            object.__setattr__(self, "loss", resolve_loss(self.loss))
        if not (isinstance(self.loss, (str, Loss)) or callable(self.loss)):
            raise ValueError(f"loss must be a name, a callable or a Loss; got {type(self.loss).__name__}")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype or None; got {self.dtype!r}")
        if self.reduce_fn is not None and not callable(self.reduce_fn):
            raise ValueError(f"reduce_fn must be callable or None; got {type(self.reduce_fn).__name__}")
        params = self.params
        if params is not None:
            params = (params,) if isinstance(params, str) else tuple(params)
            if not params or not all(isinstance(p, str) for p in params):
                raise ValueError(f"params must be parameter names or module prefixes; got {self.params!r}")
            object.__setattr__(self, "params", params)
        if self.device is not None and not isinstance(self.device, torch.device):
            try:
                object.__setattr__(self, "device", torch.device(self.device))
            except (TypeError, RuntimeError) as err:
                raise ValueError(
                    f"device must be a torch.device or a device string; got {self.device!r}"
                ) from err

    def replace(self, **changes: Any) -> OperatorSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def build(self, model: nn.Module, data: Any) -> CurvatureOperator:
        """The operator of this spec on ``model`` and ``data`` (the one constructor). A model sharded with
        FSDP2 or wrapped in DDP, under a process group, gets the operator of
        :func:`~dynascope.probes.sharded.sharded_operator` on this rank's ``data`` (every rank's loss)."""
        from .sharded import is_ddp, is_fsdp, sharded_operator

        if is_fsdp(model) or is_ddp(model):
            return sharded_operator(model, data, spec=self)  # type: ignore[return-value]
        return CurvatureOperator(model, data, self)

    def settings(self) -> dict[str, Any]:
        """The JSON-able fields as a probe records them (the loss by name once resolved, see ``meta``)."""
        return {
            "operator": self.kind,
            "params": list(self.params) if self.params is not None else None,
            "batch_size": self.batch_size,
            "mode": self.mode,
            "backend": self.backend,
            "dtype": str(self.dtype) if self.dtype is not None else None,
            "device": str(self.device) if self.device is not None else None,
            "sharded": self.reduce_fn is not None,
            **({"output": _output_name(self.output)} if self.output is not None else {}),
        }


def _output_name(output: OutputSelector) -> str | int:
    if isinstance(output, (str, int)):
        return output
    return getattr(output, "__name__", type(output).__name__)


class CurvatureOperator(LinearOperator):
    """Hessian, GGN or empirical Fisher of the dataset-mean loss, as a matrix-free operator.

    ``CurvatureOperator(model, data, spec)`` with ``data`` ``(x, y)`` tensors, a DataLoader, Dataset or
    BatchSource and ``spec`` an :class:`OperatorSpec`; keywords instead of (or on top of) a spec are its
    fields (``CurvatureOperator(model, data, kind="ggn", loss="mse")``). The data's batches stay on the
    device across products when they fit (:class:`~dynascope.probes.functional.ResidentBatches`).

    backend:
        ``"graph"`` caches the first-order graph of a single-batch dataset and differentiates it
        again per product (double backward); ``"func"`` recomputes forward-over-reverse
        (``torch.func.jvp`` of ``grad``) per batch, ``vmap``-ed over the K vectors; ``"auto"``
        picks ``graph`` for one batch and ``func`` otherwise. ``func`` falls back to per-vector
        double backward for ops without forward-mode or vmap support (``backend`` then reads
        ``"double_backward"`` and later products skip the failing attempt).
    """

    def __init__(self, model: nn.Module, data: Any, spec: OperatorSpec | None = None, **fields: Any) -> None:
        if spec is None:
            spec = OperatorSpec(**fields)
        elif not isinstance(spec, OperatorSpec):
            raise ValueError(f"spec must be an OperatorSpec; got {type(spec).__name__}")
        elif fields:
            spec = spec.replace(**fields)
        self.spec = spec
        self.fm = FunctionalModel(
            model, params=spec.params, mode=spec.mode, dtype=spec.dtype, device=spec.device,
            output=spec.output,
        )  # fmt: skip
        self.model = self.fm.model
        self.kind, self.mode = spec.kind, spec.mode
        self.space = self.fm.space
        self._params = self.fm.live
        super().__init__(self.space.size, self.fm.dtype, self.fm.device)
        self.source = self.fm.batches(data, spec.batch_size)
        self.reduce_fn = spec.reduce_fn
        first_batch = next(iter(self.source))
        self.loss = resolve_loss(spec.loss, first_batch.y, model=self.model, inputs=first_batch.x)
        self.fm.raw = self.loss.takes_batch
        saved = {n: t.clone() for n, t in self.model.named_buffers()} if spec.mode == "train" else {}
        with ModeGuard(self.model, self.mode):
            fx, fy = first_batch.x, first_batch.y
            probe = self.loss.total(self._call(dict(self._params), fx), fy, fx)
            #: parameters that do not reach the loss: zero rows (module functional), listed in meta
            named = list(self._params.items())
            self.unused_params = unused_parameters(probe, named) if probe.requires_grad else []
        del probe
        with torch.no_grad():
            for n, t in self.model.named_buffers():  # train mode: BatchNorm statistics as they were
                if n in saved:
                    t.copy_(saved[n])
        warn_unused(self.unused_params)
        # the normaliser: the sample count, or the counted tokens for token_cross_entropy (losses.py)
        n_local = (
            self.source.num_samples()
            if self.loss.counts_samples
            else sum(self.loss.count(b.y) for b in self.source)
        )
        n = torch.tensor(float(n_local), dtype=torch.float64, device=self.device)
        self.num_samples = int(round(float(self.reduce_fn(n) if self.reduce_fn is not None else n)))
        if self.num_samples == 0:
            raise ValueError("the dataset is empty")
        self.single = self.source.single_batch() if spec.kind == "hessian" else None
        backend = spec.backend
        if backend == "auto":
            backend = "graph" if self.single is not None else "func"
        if backend == "graph" and self.single is None:
            backend = "func"  # graph reuse needs the whole dataset in one batch
        self.backend = backend
        # vmap-ed double backward pays off on accelerators; on CPU one backward per vector is faster
        # (measured 1.8x on an 11k-parameter MLP with 2048 samples, 10 vectors)
        self._batched_double_backward = self.device.type != "cpu"
        self.max_vectors = spec.max_vectors
        self._graph: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.fallbacks: list[str] = []  # slower product paths taken, in order (see _fallback)

    @property
    def columnwise(self) -> bool:
        """Whether each column of a ``matmat`` is computed on its own (one backward per vector, no
        reduction across ranks), so a column's product does not depend on the block it came in."""
        per_vector = self.backend == "double_backward" or (
            self.backend == "graph" and not self._batched_double_backward
        )
        return per_vector and self.reduce_fn is None

    def meta(self) -> dict[str, Any]:
        """The operator's keys of a probe's ``.meta`` (the same in every probe that uses one):
        ``operator, loss, reduction, n_samples, n_params, dtype, device, mode, backend``."""
        return {
            "operator": self.kind,
            "loss": self.loss.name,
            "reduction": f"mean over {self.num_samples} {self.loss.unit}",
            "n_samples": self.num_samples,
            "n_params": self.size,
            "dtype": str(self.dtype),
            "device": str(self.device),
            "mode": self.mode,
            "backend": self.backend,
            "product_fallbacks": list(self.fallbacks),
            **({"unused_params": list(self.unused_params)} if self.unused_params else {}),
            **self.fm.kernel_meta(),
        }

    def _fallback(self, what: str, err: BaseException) -> None:
        """Record (and warn once about) a switch to a slower product path; memory errors never switch."""
        if isinstance(err, torch.OutOfMemoryError):
            raise torch.OutOfMemoryError(
                f"out of memory in a {self.kind}-vector product ({len(self.fallbacks)} fallbacks so far): "
                "lower the batch size (batch_size=), the eigensolver's block size (block_size=) or its basis "
                f"(max_basis=), or run on a device with more memory. {err}"
            ) from err
        line = f"{what}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if not self.fallbacks:
            warnings.warn(
                f"dynascope: {line} (recorded in meta['product_fallbacks'])", RuntimeWarning, stacklevel=3
            )
        self.fallbacks.append(line)

    # ---------------------------------------------------------------- helpers
    def parameters_vector(self) -> torch.Tensor:
        """The current parameter values θ (flattened block)."""
        return self.fm.parameters_vector()

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.fm(params, x)

    def _primal(self) -> dict[str, torch.Tensor]:
        return self.fm.params

    def loss_value(self) -> float:
        """The dataset-mean loss L(θ) (reduced over shards)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), ModeGuard(self.model, self.mode):
            for b in self.source:
                total += self.loss.total(self._call(self._primal(), b.x), b.y, b.x).double()
        if self.reduce_fn is not None:
            total = self.reduce_fn(total)
        return float(total) / self.num_samples

    def gradient(self) -> torch.Tensor:
        """∇L(θ), flattened (reduced over shards)."""
        g = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        with ModeGuard(self.model, self.mode):
            for b in self.source:
                g += self.space.flatten(grad(self._batch_loss_fn(b.x, b.y))(self._primal()))
        return self.reduce_fn(g) if self.reduce_fn is not None else g

    def _batch_loss_fn(self, x: Any, y: torch.Tensor) -> Callable:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss.total(self._call(p, x), y, x) / self.num_samples

        return f

    # ---------------------------------------------------------------- products
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        try:
            return self._products(V)
        except (RuntimeError, NotImplementedError) as e:
            hint = derivative_error(e, f"{self.backend} products after forward-over-reverse")
            if hint is None:
                raise
            raise hint from e

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        with ModeGuard(self.model, self.mode):
            for lo in range(0, V.shape[1], self.max_vectors):
                Vc = V[:, lo : lo + self.max_vectors]
                if self.backend == "graph":
                    self._graph_matmat(Vc, out[:, lo : lo + Vc.shape[1]])
                else:
                    for b in self.source:
                        out[:, lo : lo + Vc.shape[1]] += self._batch_matmat(b.x, b.y, Vc)
        if self.reduce_fn is not None:
            out = self.reduce_fn(out)
        return out

    def _graph_matmat(self, V: torch.Tensor, out: torch.Tensor) -> None:
        """Hessian products by differentiating a cached first-order graph (single-batch data), written
        into ``out`` (no second ``[P, K]`` block: one vector at a time is stored straight into its column)."""
        if self._graph is None:
            b = self.single
            assert b is not None
            plist = list(self._params.values())
            loss = self.loss.total(self._call(dict(self._params), b.x), b.y, b.x) / self.num_samples
            if not loss.requires_grad:  # no parameter of the block reaches the loss: its Hessian block is 0
                warnings.warn(
                    f"the loss does not depend on the parameters {list(self.space.names)}: their curvature "
                    "block is zero (unused in the forward pass?)",
                    UserWarning,
                    stacklevel=2,
                )
                self._graph = (None, plist)
            else:
                g = torch.autograd.grad(
                    loss, plist, create_graph=True, allow_unused=True, materialize_grads=True
                )
                self._graph = (self.space.flatten(list(g)), plist)
        gflat, plist = self._graph
        if gflat is None:
            out.zero_()
            return
        if V.shape[1] > 1 and self._batched_double_backward:
            try:
                hv = torch.autograd.grad(
                    gflat, plist, grad_outputs=V.T.contiguous(), retain_graph=True, is_grads_batched=True,
                    allow_unused=True, materialize_grads=True,
                )  # fmt: skip
                out.copy_(torch.cat([h.reshape(V.shape[1], -1) for h in hv], dim=1).T)
                return
            except RuntimeError as err:
                self._fallback("batched double backward → one vector at a time", err)
                self._batched_double_backward = False  # an op without a batching rule: one vector at a time
        for k in range(V.shape[1]):
            hv = torch.autograd.grad(gflat, plist, grad_outputs=V[:, k], retain_graph=True, allow_unused=True)
            lo = 0
            for h, n in zip(hv, self.space.numels):
                if h is None:
                    out[lo : lo + n, k] = 0
                else:
                    out[lo : lo + n, k] = h.reshape(-1)
                lo += n
            del hv  # before the next column's product: one column's gradients alive at a time

    def _batch_matmat(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Σ over one batch of the operator applied to the columns of V (already divided by N)."""
        if self.backend == "double_backward":
            return self._double_backward(x, y, V)
        primal = self._primal()
        Vd = {n: t.movedim(-1, 0) for n, t in self.space.split(V).items()}  # {name: [K, *shape]}
        try:
            res = self._func_products(x, y, primal, Vd)
        except (RuntimeError, NotImplementedError) as err:
            self._fallback("forward-over-reverse (func) → per-vector double backward", err)
            self.backend = "double_backward"  # an op without forward-mode/vmap rules: stop retrying func
            return self._double_backward(x, y, V)
        return torch.cat([res[n].reshape(V.shape[1], -1) for n in self.space.names], dim=1).T

    def _func_products(
        self, x: torch.Tensor, y: torch.Tensor, primal: dict[str, torch.Tensor], Vd: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        n = self.num_samples
        if self.kind == "hessian":
            g = grad(self._batch_loss_fn(x, y))
            return vmap(lambda v: jvp(g, (primal,), (v,))[1])(Vd)

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._call(p, x)

        if self.kind == "ggn":
            out, vjp_fn = vjp(f, primal)
            out = out.detach()
            Jv = vmap(lambda v: jvp(f, (primal,), (v,))[1])(Vd)  # [K, B, O]
            gl = grad(lambda o: self.loss.total(o, y, x) / n)
            HJv = vmap(lambda u: jvp(gl, (out,), (u,))[1])(Jv)
            return vmap(lambda u: vjp_fn(u)[0])(HJv)

        # empirical Fisher: (1/N) Σ_i g_i (g_i · v) = (1/N) J_ℓᵀ (J_ℓ v), J_ℓ = ∂(ℓ_1..ℓ_B)/∂θ
        def per_sample(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss.losses(f(p), y, x)

        _, vjp_l = vjp(per_sample, primal)
        d = vmap(lambda v: jvp(per_sample, (primal,), (v,))[1])(Vd)  # [K, B]
        return vmap(lambda u: vjp_l(u / n)[0])(d)

    def _double_backward(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Fallback: reverse-over-reverse products, one vector at a time."""
        plist = list(self._params.values())
        params = dict(self._params)
        n = self.num_samples
        cols = []
        for k in range(V.shape[1]):
            vk = self.space.split(V[:, k])
            vlist = [vk[name] for name in self.space.names]
            if self.kind == "hessian":
                loss = self.loss.total(self._call(params, x), y, x) / n
                g = torch.autograd.grad(
                    loss, plist, create_graph=True, allow_unused=True, materialize_grads=True
                )
                dot = sum((gi * vi).sum() for gi, vi in zip(g, vlist))
                hv = torch.autograd.grad(dot, plist, allow_unused=True)
            elif self.kind == "ggn":
                out = self._call(params, x)
                # J v via the double-vjp trick: d/du [Jᵀu]·v = J v
                u = torch.zeros_like(out, requires_grad=True)
                jtu = torch.autograd.grad(
                    out, plist, grad_outputs=u, create_graph=True, allow_unused=True, materialize_grads=True
                )
                jv = torch.autograd.grad(jtu, u, grad_outputs=vlist, retain_graph=True)[0]
                o = out.detach().requires_grad_(True)
                go = torch.autograd.grad(self.loss.total(o, y, x) / n, o, create_graph=True)[0]
                hjv = torch.autograd.grad(go, o, grad_outputs=jv)[0]
                hv = torch.autograd.grad(out, plist, grad_outputs=hjv, allow_unused=True)
            else:
                ls = self.loss.losses(self._call(params, x), y, x)
                u = torch.zeros_like(ls, requires_grad=True)
                jtu = torch.autograd.grad(
                    ls, plist, grad_outputs=u, create_graph=True, allow_unused=True, materialize_grads=True
                )
                d = torch.autograd.grad(jtu, u, grad_outputs=vlist, retain_graph=True)[0]
                hv = torch.autograd.grad(ls, plist, grad_outputs=d / n, allow_unused=True)
            cols.append(
                self.space.flatten([torch.zeros_like(p) if h is None else h for h, p in zip(hv, plist)])
            )
        return torch.stack(cols, dim=1).detach()


def make_operator(
    model: nn.Module,
    data: Any,
    spec: OperatorSpec | None = None,
    *,
    operator: str | None = None,
    **fields: Any,
) -> CurvatureOperator:
    """``CurvatureOperator(model, data, spec)``; without a spec, one from the keywords
    (``operator=`` names the kind: ``"hessian"``, ``"ggn"``, ``"fisher"``)."""
    if operator is not None:
        fields["kind"] = operator
    return CurvatureOperator(model, data, spec, **fields)


def random_vectors(
    size: int, k: int, *, seed: int, dtype: torch.dtype, device: torch.device, kind: str = "gaussian"
) -> torch.Tensor:
    """``[size, k]`` random probe vectors from a seeded CPU generator (device-independent values).

    ``kind="gaussian"`` (N(0, 1)) or ``"rademacher"`` (±1).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        V = torch.randint(0, 2, (size, k), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    elif kind == "gaussian":
        V = torch.randn(size, k, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown random vector kind {kind!r}")
    return V.to(device=device, dtype=dtype)


__all__ = [
    "OPERATOR_KINDS",
    "CurvatureOperator",
    "DenseOperator",
    "LinearOperator",
    "OperatorSpec",
    "make_operator",
    "random_vectors",
]
