"""Structured NTK contributions of ``nn.Linear`` layers (no per-sample weight Jacobians).

A Linear layer ``y_t = W a_t + b`` applied at ``T`` positions (``T = 1`` for an MLP layer, the sequence
length in a transformer) has per-sample, per-output Jacobian ``∂f_o/∂W = Σ_t δ_{o,t} a_tᵀ`` with
``δ_{o,t} = ∂f_o/∂y_t ∈ R^{d_out}`` and ``a_t ∈ R^{d_in}`` the layer's input, and ``∂f_o/∂b = Σ_t δ_{o,t}``.
Its NTK contribution between samples ``i, j`` and outputs ``o, p`` is therefore

    Θ_W((i,o),(j,p)) = Σ_{t,s} (a_{i,t}·a_{j,s}) (δ_{i,o,t}·δ_{j,p,s}),
    Θ_b((i,o),(j,p)) = (Σ_t δ_{i,o,t})·(Σ_s δ_{j,p,s}),

which needs only ``a`` (recorded by a forward hook) and ``δ`` (the Jacobian of the outputs with respect to
a zero perturbation ``ε`` added to the layer's output), never the ``d_out × d_in`` weight Jacobian
(Novak et al. 2022, "Fast finite width neural tangent kernel", structured derivatives).

Per pair of samples this costs ``2·T²·(d_in + O^a·d_out)`` flops against ``2·O^a·d_in·d_out`` for
contracting explicit Jacobians (``a = 1`` traced, ``2`` full), and stores ``T·(d_in + O·d_out)`` numbers
per sample instead of ``O·d_in·d_out``. A layer is used in structured form when that is cheaper, its
weight is among the kernel's parameters, the weight is not shared with another module, and the module
runs exactly once per forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LinearSite:
    """One ``nn.Linear`` module used in structured form (names as in ``model.named_parameters()``)."""

    module: str
    weight: str
    bias: str | None  # the bias parameter when it is part of the kernel, else None
    positions: int  # T: number of input vectors per sample the layer sees
    d_in: int
    d_out: int
    out_shape: tuple[int, ...]  # the layer's output shape for a batch of one sample

    def pair_flops(self, n_outputs: int, traced: bool) -> float:
        """Flops per sample pair of the structured contraction (formula in the module docstring)."""
        oa = n_outputs if traced else n_outputs**2
        return 2.0 * self.positions**2 * (self.d_in + oa * self.d_out)

    def plain_pair_flops(self, n_outputs: int, traced: bool) -> float:
        oa = n_outputs if traced else n_outputs**2
        return 2.0 * oa * (self.d_in * self.d_out + (self.d_out if self.bias else 0))

    def numbers_per_sample(self, n_outputs: int) -> int:
        """Stored numbers per sample: ``δ [O, T, d_out]`` and ``a [T, d_in]``."""
        return self.positions * (n_outputs * self.d_out + self.d_in)


def find_linear_sites(
    model: nn.Module, selected: set[str], x1: torch.Tensor, run: Any, n_outputs: int, traced: bool
) -> list[LinearSite]:
    """The ``nn.Linear`` modules worth using in structured form (see the module docstring).

    ``run(x)`` evaluates the model on a batch (here: one sample); ``selected``: the kernel's parameter names.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    candidates = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and _pname(name, "weight") in selected
        and uses[id(m.weight)] == 1
        and (m.bias is None or uses[id(m.bias)] == 1)
    }
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {n: [] for n in candidates}

    def recorder(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
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
        site = LinearSite(
            name, _pname(name, "weight"), bias, math.prod(in_shape) // m.in_features, m.in_features,
            m.out_features, out_shape,
        )  # fmt: skip
        if site.pair_flops(n_outputs, traced) < site.plain_pair_flops(n_outputs, traced):
            sites.append(site)
    return sites


def _pname(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


class Taps:
    """Forward hooks that add ``ε[site]`` to each site's output and record its input (while active)."""

    def __init__(self, model: nn.Module, sites: list[LinearSite]) -> None:
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


__all__ = ["LinearSite", "Taps", "Factors", "contract_site", "find_linear_sites"]
