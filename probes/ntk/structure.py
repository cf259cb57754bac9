"""Structured NTK contributions of ``nn.Linear`` and ``nn.Conv2d`` layers (no weight backward passes).

A Linear layer ``y_t = W a_t + b`` applied at ``T`` positions (``T = 1`` for an MLP layer, the sequence
length in a transformer) has per-sample, per-output Jacobian ``∂f_o/∂W = Σ_t δ_{o,t} a_tᵀ`` with
``δ_{o,t} = ∂f_o/∂y_t ∈ R^{d_out}`` and ``a_t ∈ R^{d_in}`` the layer's input, and ``∂f_o/∂b = Σ_t δ_{o,t}``.
A convolution is the same with ``t`` running over the ``T = H_out·W_out`` output positions, ``a_t`` the
input patch at ``t`` (``d_in = C_in·k_h·k_w``, from ``unfold``) and ``d_out = C_out``. ``a`` is recorded by a
forward hook; ``δ`` is the Jacobian of the outputs with respect to a zero perturbation ``ε`` added to the
layer's output, so the backward pass never forms weight gradients (Novak et al. 2022, "Fast finite width
neural tangent kernel", structured derivatives). Each site is then used in one of two forms:

* **factored**: the NTK contribution between samples ``i, j`` and outputs ``o, p`` is

      Θ_W((i,o),(j,p)) = Σ_{t,s} (a_{i,t}·a_{j,s}) (δ_{i,o,t}·δ_{j,p,s}),
      Θ_b((i,o),(j,p)) = (Σ_t δ_{i,o,t})·(Σ_s δ_{j,p,s}),

  costing ``2·T²·(d_in + O^a·d_out)`` flops per pair (``a = 1`` traced, ``2`` full) and storing
  ``T·(d_in + O·d_out)`` numbers per sample;
* **materialised**: ``J_W = δᵀ a`` per sample and output by one batched matrix product, then contracted
  like any parameter Jacobian (``2·O^a·d_in·d_out`` flops per pair, ``O·d_in·d_out`` numbers per sample).

The cheaper form per pair is taken. A module is a site when its weight is among the kernel's parameters,
its parameters are not shared with another module, it runs exactly once per forward pass, and (conv) it
has ``groups=1``, zero padding given as integers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Site:
    """One Linear / Conv2d module in structured form (names as in ``model.named_parameters()``)."""

    module: str
    weight: str
    bias: str | None  # the bias parameter when it is part of the kernel, else None
    positions: int  # T: input vectors (Linear) or output positions (conv) per sample
    d_in: int
    d_out: int
    out_shape: tuple[int, ...]  # the layer's output shape for a batch of one sample
    factored: bool  # contract by factors (else materialise the weight Jacobian)
    conv: dict[str, Any] | None = None  # Conv2d: in_shape, kernel_size, dilation, padding, stride

    def factored_pair_flops(self, n_outputs: int, traced: bool) -> float:
        """Flops per sample pair of the factored contraction (formula in the module docstring)."""
        oa = n_outputs if traced else n_outputs**2
        return 2.0 * self.positions**2 * (self.d_in + oa * self.d_out)

    def plain_pair_flops(self, n_outputs: int, traced: bool) -> float:
        oa = n_outputs if traced else n_outputs**2
        return 2.0 * oa * (self.d_in * self.d_out + (self.d_out if self.bias else 0))

    def pair_flops(self, n_outputs: int, traced: bool) -> float:
        if self.factored:
            return self.factored_pair_flops(n_outputs, traced)
        return self.plain_pair_flops(n_outputs, traced)

    def numbers_per_sample(self, n_outputs: int) -> int:
        """Stored numbers per sample: ``δ [O, T, d_out]`` and ``a [T, d_in]``, or the weight Jacobian."""
        if self.factored:
            return self.positions * (n_outputs * self.d_out + self.d_in)
        return n_outputs * (self.d_in * self.d_out + (self.d_out if self.bias else 0))

    def deltas(self, grad: torch.Tensor, b: int) -> torch.Tensor:
        """``δ [b, O, T, d_out]`` from the output Jacobian ``[b, O, *out_shape]`` (conv: channels first)."""
        if self.conv is None:
            return grad.reshape(b, -1, self.positions, self.d_out)
        return grad.reshape(b, -1, self.d_out, self.positions).transpose(2, 3)

    def acts(self, inp: torch.Tensor, b: int) -> torch.Tensor:
        """The layer inputs ``a [b, T, d_in]`` of ``b`` samples (conv: unfolded patches)."""
        if self.conv is None:
            return inp.reshape(b, self.positions, self.d_in)
        c = self.conv
        patches = F.unfold(
            inp.reshape(b, *c["in_shape"]), c["kernel_size"], c["dilation"], c["padding"], c["stride"]
        )
        return patches.transpose(1, 2)  # [b, T, C_in·k_h·k_w], matching weight.reshape(C_out, -1)


def find_sites(
    model: nn.Module, selected: set[str], x1: torch.Tensor, run: Any, n_outputs: int, traced: bool
) -> list[Site]:
    """The Linear / Conv2d modules that can be used in structured form (module docstring), each with
    the cheaper of the factored and materialised forms.

    ``run(x)`` evaluates the model on a batch (here: one sample); ``selected``: the kernel's parameter names.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    candidates = {
        name: m
        for name, m in model.named_modules()
        if _supported(m)
        and _pname(name, "weight") in selected
        and uses[id(m.weight)] == 1
        and (m.bias is None or uses[id(m.bias)] == 1)
    }
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {n: [] for n in candidates}

    def recorder(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                calls[name].append((tuple(args[0].shape), tuple(out.shape)))
            else:
                calls[name].append(((), ()))

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            run(x1[:1])
    finally:
        for h in handles:
            h.remove()
    sites = []
    for name, m in candidates.items():
        if len(calls[name]) != 1 or not calls[name][0][0]:
            continue  # called twice (shared module), never, or with odd arguments: plain Jacobians
        in_shape, out_shape = calls[name][0]
        bias = _pname(name, "bias") if m.bias is not None and _pname(name, "bias") in selected else None
        if isinstance(m, nn.Linear):
            shape = dict(
                positions=math.prod(in_shape) // m.in_features, d_in=m.in_features, d_out=m.out_features
            )
            conv = None
        else:
            if len(in_shape) != 4:
                continue
            shape = dict(
                positions=out_shape[2] * out_shape[3], d_in=m.weight[0].numel(), d_out=m.out_channels
            )
            conv = dict(
                in_shape=in_shape[1:], kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding,
                stride=m.stride,
            )  # fmt: skip
        site = Site(
            name, _pname(name, "weight"), bias, **shape, out_shape=out_shape, factored=False, conv=conv
        )
        factored = site.factored_pair_flops(n_outputs, traced) < site.plain_pair_flops(n_outputs, traced)
        sites.append(dataclasses.replace(site, factored=factored))
    return sites


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _pname(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


class Taps:
    """Forward hooks that add ``ε[site]`` to each site's output and record its input (while active)."""

    def __init__(self, model: nn.Module, sites: list[Site]) -> None:
        self.model, self.sites = model, sites
        self.eps: dict[str, torch.Tensor] | None = None
        self.inputs: dict[str, torch.Tensor] = {}

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if self.eps is None:
                return None
            self.inputs[name] = args[0]
            return out + self.eps[name]

        return hook

    @contextmanager
    def installed(self) -> Iterator[Taps]:
        modules = dict(self.model.named_modules())
        handles = [modules[s.module].register_forward_hook(self._hook(s.module)) for s in self.sites]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def call(self, fn: Any, eps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``fn()`` with the perturbations ``eps`` applied; returns its output and the sites' inputs."""
        self.eps, self.inputs = eps, {}
        try:
            out = fn()
        finally:
            self.eps = None
        inputs, self.inputs = self.inputs, {}
        return out, inputs


@dataclass
class Factors:
    """Structured factors of one site for a chunk of ``c`` samples."""

    delta: torch.Tensor  # [c, O, T, d_out]
    acts: torch.Tensor  # [c, T, d_in]
    bias: bool


CONTRACT_NUMBERS = 1 << 24  # numbers of the [(i,t), (j,s)] intermediates per contraction sub-block


def contract_site(f1: Factors, f2: Factors, traced: bool) -> torch.Tensor:
    """This site's kernel block: ``[c1, c2]`` (traced) or ``[c1·O, c2·O]`` (full), sample-major.

    With ``w_ij(t,s) = a_it·a_js (+1 with a bias)``: traced ``Σ_{t,s} w_ij(t,s) Σ_o δ_iot·δ_jos``, full
    ``Σ_{t,s} w_ij(t,s) δ_iot·δ_jps``; rows go in sub-blocks so the ``T²`` intermediates stay bounded.
    """
    c1, O, T, _ = f1.delta.shape
    c2 = f2.delta.shape[0]
    per_row = c2 * T * T * (1 if traced else O * O)
    step = max(1, min(c1, CONTRACT_NUMBERS // max(per_row, 1)))
    blocks = [
        _contract_rows(Factors(f1.delta[lo : lo + step], f1.acts[lo : lo + step], f1.bias), f2, traced)
        for lo in range(0, c1, step)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)


def _contract_rows(f1: Factors, f2: Factors, traced: bool) -> torch.Tensor:
    c1, O, T, d = f1.delta.shape
    c2 = f2.delta.shape[0]
    w = f1.acts.reshape(c1 * T, -1) @ f2.acts.reshape(c2 * T, -1).T  # [(i,t), (j,s)]: a_it·a_js
    if f1.bias:
        w = w + 1.0
    if traced:
        x1 = f1.delta.transpose(1, 2).reshape(c1 * T, O * d)
        x2 = f2.delta.transpose(1, 2).reshape(c2 * T, O * d)
        K = w * (x1 @ x2.T)  # Σ_o δ_iot·δ_jos
        return K if T == 1 else K.reshape(c1, T, c2, T).sum((1, 3))
    gd = f1.delta.reshape(c1 * O * T, d) @ f2.delta.reshape(c2 * O * T, d).T  # [(i,o,t), (j,p,s)]
    if T == 1:
        return (gd.reshape(c1, O, c2, O) * w[:, None, :, None]).reshape(c1 * O, c2 * O)
    K = torch.einsum("iotjps,itjs->iojp", gd.reshape(c1, O, T, c2, O, T), w.reshape(c1, T, c2, T))
    return K.reshape(c1 * O, c2 * O)


__all__ = ["Site", "Taps", "Factors", "contract_site", "find_sites"]
