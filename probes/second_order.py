"""The exact Hessian / GGN diagonal by second-order backpropagation (BackPACK's ``DiagHessian``/``DiagGGN``;
Dangel, Kunstner & Hennig 2020; Mizutani & Dreyfus 2008), for the parameters of a chain of known layers.

For the dataset-mean loss ``L = (1/N) Σ_n ℓ_n`` of a model whose last modules form a chain
``f = m_L ∘ … ∘ m_j`` (each module's only input is the previous one's output, up to a reshape), the
Hessian of ``ℓ_n`` with respect to a module's output ``z`` is carried backward as a signed factorisation

    ∇²_z ℓ_n = Σ_k σ_kn s_kn s_knᵀ,    σ_kn ∈ {+1, −1}.

At the loss, ``s_c`` are the columns of a square root of ``∇²_f ℓ_n`` (cross-entropy: ``diag(√p) − p √pᵀ``;
MSE in PyTorch's convention ``ℓ = (1/C) Σ_o (f_o − y_o)²``: ``√(2/C) I``; ``half_sse``: ``I``), ``σ = +1``.
Through a module with input ``a`` and Jacobian ``J = ∂z/∂a``,
``∇²_a ℓ = Jᵀ (∇²_z ℓ) J + Σ_i (∂ℓ/∂z_i) ∇²_a z_i``: every column becomes ``Jᵀ s``; the second term (the
residual) is zero for layers linear or piecewise linear in ``a`` (Linear, Conv2d, pooling, reshapes, ReLU)
and diagonal for an elementwise activation ``z = φ(a)``:
``diag(φ''(a) ⊙ ∂ℓ/∂z)``, added as one new column per feature, ``√|r_i| e_i`` with sign ``sign(r_i)``
(the GGN drops it). A Linear / Conv2d layer with ``z = W a + b`` (over positions ``t``: a Conv2d's
unfolded patches) is linear in ``(W, b)``, so its diagonal is

    diag_W[o, i] = (1/N) Σ_{n,k} σ_kn (Σ_t s_kn[t, o] a_n[t, i])²,
    diag_b[o] = (1/N) Σ_{n,k} σ_kn (Σ_t s_kn[t, o])².

Which modules the pass knows (:func:`known`): ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero padding,
numeric padding), the elementwise activations in :data:`SMOOTH` and :data:`PIECEWISE_LINEAR`, reshapes
(``Flatten``, ``Unflatten``, ``Identity``, ``Dropout`` in eval mode, an empty ``Sequential``) and average /
max pooling. The chain is found by forward hooks on leaf modules; it ends at the first unknown module, a
module called twice, or an input that is not the previous module's output. Every parameter outside it
(and any parameter the chain shares with the rest of the model) gets its diagonal from exact
Hessian-vector products instead (:func:`~dynascope.probes.diagonal.hessian_diagonal`); nothing is
approximated.

Memory: the factor of the widest step, ``K · D`` entries per sample (``K`` columns: the outputs plus
every smooth activation's features below the loss, ``D`` features), for ``chunk`` samples at a time, with
``chunk`` chosen so that ``3 · K · D · itemsize · chunk`` fits ``memory_budget``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import vjp, vmap
from torch.nn import functional as F

from .budget import too_small
from .kronecker import _inputs_2d, _output_hessian_sqrt
from .losses import BUILTIN_LOSSES
from .operators import CurvatureOperator

SMOOTH = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.Mish)
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU)
POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
LOSSES = ("cross_entropy", "mse", "half_sse")
FORMULA = "3 · K · D · itemsize per sample (widest factor: K columns × D features, in and out) × chunk"


def _reshapes(m: nn.Module) -> bool:
    """Whether ``m`` only reshapes its input (or returns it): a reshape, eval-mode dropout, an empty
    ``nn.Sequential``."""
    if type(m) is nn.Dropout:
        return not m.training
    return type(m) in RESHAPES or (type(m) is nn.Sequential and len(m) == 0)


def known(m: nn.Module) -> bool:
    """Whether the pass can carry the factorisation through ``m`` exactly (module docstring); a module with
    hooks of its own (which may change what it computes) is not known."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    if type(m) is nn.Conv2d:  # exact types: a subclass may override forward
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return _reshapes(m) or type(m) in (nn.Linear, *SMOOTH, *PIECEWISE_LINEAR, *POOLS)


@dataclass
class _Call:
    name: str
    module: nn.Module
    a: torch.Tensor  # input (cloned for in-place modules)
    src: torch.Tensor  # the input tensor itself (for the chain check)
    src_version: int = 0  # its version counter when the module was called
    z: torch.Tensor | None = None  # output
    z_version: int = 0  # the output's version counter when the module returned
    ok: bool = True  # one positional tensor input, no keywords


@dataclass
class Plan:
    """The chain of one forward pass: ``calls`` from the first module the pass runs through to the output,
    ``fast`` the parameter names it covers (the rest of ``names`` go to products)."""

    calls: list[_Call]
    fast: list[str]
    params: dict[str, tuple[str, nn.Module, str]] = field(default_factory=dict)  # name → (mod, module, key)


def _record(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], Any]:
    """Run ``model(x)`` with hooks on every leaf module: the calls in order and the output."""
    calls: list[_Call] = []

    def pre(name: str) -> Callable[..., None]:
        def fn(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            src = args[0] if args else None
            ok = len(args) == 1 and not kwargs and isinstance(src, torch.Tensor)
            if not ok:
                src = torch.empty(0)
            a = src.clone() if ok and getattr(m, "inplace", False) else src
            calls.append(_Call(name, m, a, src, src._version, ok=ok))

        return fn

    def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor):
            calls[-1].z, calls[-1].z_version = out, out._version

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(pre(n), with_kwargs=True) for n, m in leaves]
    handles += [m.register_forward_hook(post) for _, m in leaves]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _follows(c: _Call, prev: _Call) -> bool:
    """``c``'s input is ``prev``'s output or a reshape of it (same storage, start and size, both contiguous,
    same batch), not modified in place in between (the version counter, shared by views, did not move)."""
    a, z = c.src, prev.z
    if z is None or c.src_version != prev.z_version:
        return False
    if a is z:
        return True
    return (
        a.data_ptr() == z.data_ptr() and a.numel() == z.numel() and a.is_contiguous() and z.is_contiguous()
        and a.shape[0] == z.shape[0] and a.dtype == z.dtype
    )  # fmt: skip


def _chain(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], torch.Tensor | None]:
    """The calls of the chain ending at the model's output (module docstring) and the output."""
    calls, out = _record(model, x)
    if not isinstance(out, torch.Tensor):
        return [], None
    if not calls or calls[-1].z is not out:
        return [], out
    counts: dict[int, int] = {}
    for c in calls:
        counts[id(c.module)] = counts.get(id(c.module), 0) + 1
    start = len(calls)
    for i in range(len(calls) - 1, -1, -1):
        c = calls[i]
        if not (c.ok and known(c.module) and counts[id(c.module)] == 1):
            break
        start = i
        if i == 0 or not _follows(c, calls[i - 1]):
            break
    return calls[start:], out


def plan_chain(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[Plan, torch.Tensor | None]:
    """The chain (:func:`_chain`) and the parameters of ``names`` it covers: those held by no other module
    and (with autograd on) not used to compute the chain's input."""
    chain, out = _chain(model, x)
    owners: dict[int, int] = {}  # parameter id → how many (module, key) pairs hold it
    for _, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    by_id = {id(p): n for n, p in model.named_parameters()}
    wanted = set(names)
    params: dict[str, tuple[str, nn.Module, str]] = {}
    for c in chain:
        for key, p in c.module.named_parameters(recurse=False):
            n = by_id.get(id(p))
            if n in wanted and owners[id(p)] == 1:
                params[n] = (c.name, c.module, key)
    if chain and chain[0].src.requires_grad and params:  # a chain parameter also used upstream (tied by code)
        used = torch.autograd.grad(
            chain[0].src.sum(), [mod.get_parameter(k) for _, mod, k in params.values()],
            allow_unused=True, retain_graph=True,
        )  # fmt: skip
        params = {n: v for (n, v), g in zip(params.items(), used) if g is None}
    return Plan(chain, [n for n in names if n in params], params), out


def _derivatives(m: nn.Module, a: torch.Tensor, second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``φ'(a)`` and (``second``) ``φ''(a)`` of an elementwise activation, by autograd of ``Σ φ(a)``."""
    with torch.enable_grad():
        x = a.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(m(x + 0).sum(), x, create_graph=second)  # + 0: in-place modules
        if not second:
            return d1.detach(), None
        (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True, materialize_grads=True)
    return d1.detach(), d2


def _signed_square_sum(G: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """``Σ_{k,n} σ_kn G_kn²`` over the first two dims of ``G``."""
    if sigma is None:
        return G.square().sum(dim=(0, 1))
    return torch.einsum("kn...,kn->...", G.square(), sigma)


def _layer_diagonal(
    m: nn.Module, a: torch.Tensor, S: torch.Tensor, sigma: torch.Tensor | None, k_chunk: int
) -> dict[str, torch.Tensor]:
    """Σ over samples and columns of the signed squared weight / bias gradients (module docstring)."""
    out: dict[str, torch.Tensor] = {}
    K, n = S.shape[:2]
    if isinstance(m, nn.Conv2d):
        cols = _inputs_2d(m, a)  # [n, T, J]
        St = S.flatten(3)  # [K, n, O, T]
        if m.weight.requires_grad:
            w = torch.zeros(St.shape[2], cols.shape[2], dtype=S.dtype, device=S.device)
            for lo in range(0, K, k_chunk):
                G = torch.einsum("knot,ntj->knoj", St[lo : lo + k_chunk], cols)
                w += _signed_square_sum(G, sigma[lo : lo + k_chunk] if sigma is not None else None)
            out["weight"] = w.reshape(m.weight.shape)
        bias_cols = St.sum(dim=3)
    else:
        a3 = a.reshape(n, -1, a.shape[-1])  # [n, T, in]
        S4 = S.reshape(K, n, -1, S.shape[-1])  # [K, n, T, out]
        if a3.shape[1] == 1:  # one position: Σ_k σ s² per sample, then one matmul
            s2 = S4[:, :, 0].square()
            dz = s2.sum(0) if sigma is None else torch.einsum("kno,kn->no", s2, sigma)
            if m.weight.requires_grad:
                out["weight"] = dz.T @ a3[:, 0].square()
            if m.bias is not None and m.bias.requires_grad:
                out["bias"] = dz.sum(0)
            return out
        if m.weight.requires_grad:
            w = torch.zeros(S4.shape[-1], a3.shape[-1], dtype=S.dtype, device=S.device)
            for lo in range(0, K, k_chunk):
                G = torch.einsum("knto,nti->knoi", S4[lo : lo + k_chunk], a3)
                w += _signed_square_sum(G, sigma[lo : lo + k_chunk] if sigma is not None else None)
            out["weight"] = w
        bias_cols = S4.sum(dim=2)
    if m.bias is not None and m.bias.requires_grad:
        out["bias"] = _signed_square_sum(bias_cols, sigma)
    return out


def _pullback(m: nn.Module, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``Jᵀ t`` for every ``t`` in ``T`` ``[K, n, *out]`` through a module linear or piecewise linear in its
    input (its Jacobian at ``a``): ``[K, n, *in]``."""
    K, n = T.shape[:2]
    if isinstance(m, nn.Linear):
        return T @ m.weight
    if isinstance(m, nn.Conv2d):
        g = torch.nn.grad.conv2d_input(
            (K * n, *a.shape[1:]), m.weight, T.reshape(K * n, *T.shape[2:]),
            m.stride, m.padding, m.dilation, m.groups,
        )  # fmt: skip
        return g.reshape(K, n, *a.shape[1:])
    if _reshapes(m):
        return T.reshape(K, *a.shape)
    _, back = vjp(m, a)
    return vmap(lambda t: back(t)[0])(T)


def _loss_factor(out: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``S`` ``[C, n, C]`` (columns of a square root of each sample's output Hessian) and ``∂ℓ_n/∂f``."""
    if loss in ("mse", "half_sse"):  # ℓ = (1/C) Σ (f − y)²: ∇²ℓ = (2/C) I; ½ Σ (f − y)²: I
        scale = 2.0 / out.shape[1] if loss == "mse" else 1.0
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return scale**0.5 * eye[:, None, :].expand(-1, out.shape[0], -1), scale * (out - y)
    keep = (y != -100).to(out.dtype)[:, None]  # F.cross_entropy's ignore_index: ℓ = 0
    p = out.softmax(dim=1)
    g = (p - F.one_hot(y.clamp(min=0), out.shape[1]).to(out.dtype)) * keep
    S = _output_hessian_sqrt(out, "cross_entropy") * keep[:, :, None]
    return S.permute(2, 0, 1), g


def _widths(calls: list[_Call], out_dim: int, hessian: bool, stop: int) -> list[tuple[int, int]]:
    """``(K, D)`` per step from the output back to ``stop``: the factor's columns and features."""
    K, sizes = out_dim, []
    for i in range(len(calls) - 1, stop - 1, -1):
        c = calls[i]
        d = c.a[0].numel()
        sizes.append((K, max(d, c.z[0].numel())))
        if hessian and isinstance(c.module, SMOOTH):
            K += d
        if isinstance(c.module, nn.Conv2d):  # the weight gradients of at least one column at a time
            sizes.append((1, c.module.weight.numel()))
    return sizes


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Buffers (BatchNorm statistics in train mode) as they were before the block's forward passes."""
    saved = {n: t.clone() for n, t in model.named_buffers()} if model.training else {}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in model.named_buffers():
                if n in saved:
                    t.copy_(saved[n])


class SecondOrderDiagonal:
    """The diagonal of ``op`` (a :class:`~dynascope.probes.operators.CurvatureOperator`, kind ``"hessian"`` or
    ``"ggn"``, the built-in loss ``"cross_entropy"``, ``"mse"`` or ``"half_sse"``) over the parameters of its
    chain (module docstring).

    ``SecondOrderDiagonal.plan(op)`` is ``None`` where the pass does not apply at all; otherwise
    ``.fast`` lists the covered parameter names and :meth:`run` returns their diagonals."""

    def __init__(self, op: CurvatureOperator, plan: Plan) -> None:
        self.op, self.chain = op, plan
        self.fast = plan.fast
        self.chunk: int | None = None  # samples per chunk (the smallest over batches)
        self.vector_bytes = 0  # the formula's bytes at that chunk

    @classmethod
    def plan(cls, op: Any) -> SecondOrderDiagonal | None:
        if not isinstance(op, CurvatureOperator) or op.reduce_fn is not None:
            return None
        if op.kind not in ("hessian", "ggn"):
            return None
        builtin = op.loss.name in LOSSES and op.loss.per_sample is BUILTIN_LOSSES[op.loss.name]
        if not builtin or op.fm.raw or op.spec.output is not None:
            return None  # a callable named like a built-in loss is not one
        b = next(iter(op.source))
        if not isinstance(b.x, torch.Tensor):
            return None
        with op.fm.guard(), _buffers_kept(op.model):  # autograd on: checks chain parameters used upstream
            plan, out = plan_chain(op.model, b.x, list(op.space.names))
        if out is None or out.dim() != 2 or not plan.fast:
            return None
        return cls(op, plan)

    def run(self, budget: int) -> dict[str, torch.Tensor]:
        """``{name: diagonal}`` (float64, CPU, the parameter's shape) of every covered parameter."""
        op = self.op
        hessian = op.kind == "hessian"
        acc: dict[str, torch.Tensor] = {}
        names = [c.name for c in self.chain.calls]
        with op.fm.guard(), _buffers_kept(op.model):
            for b in op.source:
                with torch.no_grad():
                    calls, out = _chain(op.model, b.x)
                if [c.name for c in calls][-len(names) :] != names or out is None:
                    raise RuntimeError(
                        "hessian_diagonal: the model's layer chain differs between batches; "
                        "use exact_backprop=False"
                    )
                plan = Plan(calls[-len(names) :], self.fast, self.chain.params)
                with torch.no_grad():
                    self._batch(plan, out.detach(), b.y, hessian, budget, acc)
        return {n: (acc[n] / op.num_samples).double().cpu() for n in self.fast}

    def _batch(self, plan: Plan, out: torch.Tensor, y: torch.Tensor, hessian: bool, budget: int,
               acc: dict[str, torch.Tensor]) -> None:  # fmt: skip
        calls = plan.calls
        owners = {id(mod): mod_name for mod_name, mod, _ in plan.params.values()}
        stop = min(i for i, c in enumerate(calls) if id(c.module) in owners)  # nothing to do below it
        itemsize = out.element_size()
        widths = _widths(calls, out.shape[1], hessian, stop)
        per_sample = 3 * itemsize * max(k * d for k, d in widths)
        chunk = min(out.shape[0], budget // per_sample)
        if chunk < 1:
            what = "one sample's factors"
            raise too_small("hessian_diagonal (exact, backpropagated)", budget, per_sample, what)
        self.chunk = chunk if self.chunk is None else min(self.chunk, chunk)
        self.vector_bytes = max(self.vector_bytes, per_sample * chunk)
        key = {(id(mod), k): n for n, (_, mod, k) in plan.params.items()}
        for lo in range(0, out.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            S, g = _loss_factor(out[sl], y[sl], self.op.loss.name)
            sigma: torch.Tensor | None = None
            for i in range(len(calls) - 1, stop - 1, -1):
                c = calls[i]
                m, a = c.module, c.a[sl]
                if id(m) in owners:
                    k_chunk = max(1, S.shape[0] * S[0, 0].numel() // m.weight.numel())
                    for k, d in _layer_diagonal(m, a, S, sigma, k_chunk).items():
                        n = key.get((id(m), k))
                        if n is not None:
                            acc[n] = d if n not in acc else acc[n] + d
                if i == stop:
                    break
                if isinstance(m, (*SMOOTH, *PIECEWISE_LINEAR)):
                    d1, d2 = _derivatives(m, a, hessian and isinstance(m, SMOOTH))
                    S, g_out = S * d1, g
                    g = g * d1
                    if d2 is not None:
                        r = (d2 * g_out).reshape(a.shape[0], -1)  # the residual diag(φ'' ⊙ ∂ℓ/∂z)
                        R = torch.diag_embed(r.abs().sqrt()).permute(1, 0, 2).reshape(-1, *a.shape)
                        sig_r = r.sign().T
                        if sigma is None:
                            sigma = torch.ones(S.shape[:2], dtype=S.dtype, device=S.device)
                        S, sigma = torch.cat([S, R]), torch.cat([sigma, sig_r])
                else:
                    S = _pullback(m, a, S)
                    g = _pullback(m, a, g[None])[0]
                prev = calls[i - 1].z
                S = S.reshape(S.shape[0], -1, *prev.shape[1:])
                g = g.reshape(-1, *prev.shape[1:])
