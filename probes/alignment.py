"""Permutation alignment of hidden units (Git Re-Basin, Ainsworth et al. 2023).

Permuting the hidden units of a layer — the rows of its weight and bias (and of the BatchNorm that
follows it: affine parameters and running statistics), together with the matching input columns of
the next layer — leaves the network's function unchanged. Two networks trained from different seeds
are aligned by choosing, per hidden layer, the permutation ``π_ℓ`` of model B's units that best matches
model A's:

* **weight matching**: maximise ``Σ_ℓ ⟨W^A_ℓ, P_ℓ W^B_ℓ P_{ℓ−1}ᵀ⟩`` (+ biases and BN parameters) by
  coordinate descent over layers in a seeded random order, each step an exact linear assignment
  (``scipy.optimize.linear_sum_assignment``) with the other permutations held fixed; stops when a full
  sweep improves no layer's objective (relative tolerance 1e-12) or after ``max_iter`` sweeps;
* **activation matching**: per hidden layer, maximise the summed Pearson correlation between A's unit
  ``i`` and B's unit ``π(i)`` of post-activation outputs over the data (conv channels: over samples and
  spatial positions), statistics streamed in float64. Correlations of B's units do not depend on the
  permutations of B's earlier layers, so all layers are matched from one pass.

Supported: ``dynascope.models`` ``"mlp"``, ``"cnn"`` (with or without BatchNorm; global-average-pool or
flatten head) and ``"embed_mlp"``, and a plain ``nn.Sequential`` of ``nn.Linear`` layers with element-wise
activations (optionally starting with ``nn.Flatten``), whose last ``nn.Linear`` is the output layer; and
the residual models below.

* ``"resnet"``: one permutation per residual stream — the stem's channels and every block of the first
  stage share it (identity shortcuts add the stream to itself), each later stage's stream is born at its
  1×1 shortcut conv and shared by that stage's ``conv2``/``bn2`` outputs; one permutation per block for
  the inner ``conv1``/``bn1`` channels. BatchNorm affine parameters and running statistics follow
  their channels.
* ``"transformer"``: one residual-stream permutation ``"embed"`` of the ``d_model`` features (token and
  positional embeddings, every LayerNorm's weight/bias — LayerNorm statistics are permutation-invariant —,
  the input columns of ``qkv``/``mlp.0``/``head``, the output rows of ``attn.out``/``mlp.2``); per block a
  permutation of the attention heads (``qkv`` rows and ``attn.out`` columns move in head blocks of
  ``d_head``) and of the MLP hidden units; inside every head, composed with the head permutation, a
  permutation ``"….attn.qk"`` of its query/key dimensions (the same on the query and the key rows, so
  ``q·k`` is unchanged) and one ``"….attn.v"`` of its value dimensions (value rows and the matching
  ``attn.out`` columns) — :class:`Within` permutations, stored as ``[n_heads, d_head]`` arrays. Weight
  matching assigns heads and their inner dimensions jointly: the cost of pairing A's head ``i`` with B's
  head ``j`` is the best inner (qk and v) assignment of that pair, one small linear assignment each, so
  the head step stays exact. Activation matching does the same with the correlations of the value outputs
  (``attn.out`` input) and of the queries plus keys (``qkv`` output), MLP units at every position, and the
  residual stream at the head's input.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets.batching import as_batches
from .functional import ModeGuard
from .validation import check_int

__all__ = [
    "UnsupportedArchitectureError",
    "PermutationSpec",
    "Site",
    "Within",
    "Alignment",
    "permutation_spec",
    "apply_permutations",
    "random_permutations",
    "invert_permutations",
    "weight_matching",
    "weight_matching_permutations",
    "activation_matching",
    "activation_matching_permutations",
]

ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Softplus,
    nn.ELU,
    nn.Mish,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
)


class UnsupportedArchitectureError(ValueError):
    """The model's structure is not one whose hidden-unit permutations this module knows."""


@dataclass(frozen=True)
class Site:
    """Where activation matching reads a permutation's units: the output (``pre=False``) or first input
    of ``module``, units along ``dim``; ``group`` > 1 reads blocks of ``group`` consecutive features as
    one unit (attention heads: feature ``h·group + j`` is dimension ``j`` of head ``h``)."""

    module: str
    dim: int = 1
    pre: bool = False
    group: int = 1


@dataclass(frozen=True)
class Within:
    """A permutation inside every unit of the permutation ``parent``, applied after it: ``perms[name]`` is
    an int array ``[n_parent, size]`` whose row ``i`` orders the ``size`` inner dimensions of the unit now at
    position ``i`` (new ``[i, a]`` = old ``[parent[i], perms[name][i, a]]``). ``targets``: ``(state key, unit
    axis, inner axis, slices)`` on the key's view, ``slices`` the indices on axis 0 it applies to (``None``:
    all). Activation matching reads ``site``, whose features split as ``[parts, n_parent, size]``, and
    sums the correlations of the parts ``act_parts``."""

    parent: str
    size: int
    targets: tuple[tuple[str, int, int, tuple[int, ...] | None], ...]
    site: Site | None = None
    parts: int = 1
    act_parts: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class PermutationSpec:
    """Which axis of which state-dict entry each permutation acts on.

    ``sizes``: permutation name (the module producing the units) → number of units.
    ``axes``: state key → per-axis permutation name (``None``: not permuted), on the tensor reshaped to
    ``views[key]`` when present (flatten head: ``[out, channels, spatial]``).
    ``params``: the keys that are trainable parameters (used by the weight-matching objective).
    ``activations``: permutation name → module whose output carries the units along dim 1, or a
    :class:`Site` (for activation matching).
    ``within``: permutations inside the units of another (:class:`Within`; attention heads); optional in
    ``perms`` (missing: identity).
    """

    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    views: dict[str, tuple[int, ...]] = field(default_factory=dict)
    params: frozenset[str] = frozenset()
    activations: dict[str, str | Site] = field(default_factory=dict)
    within: dict[str, Within] = field(default_factory=dict)


@dataclass(frozen=True)
class Alignment:
    """Permutations found (``perms[name][i]`` = index of B's unit placed at position ``i``; a
    :class:`Within` permutation is ``[n_units, size]``), sweeps done, whether coordinate descent stopped by
    itself, and the final matching objective."""

    perms: dict[str, np.ndarray]
    method: str
    n_iter: int = 0
    converged: bool = True
    objective: float = float("nan")


# --------------------------------------------------------------------------- spec construction
def _chain_spec(
    model: nn.Module,
    prefix: str,
    layers: list[tuple[str, nn.Module]],
    head_key: str,
    head: nn.Linear,
    head_spatial: int | None,
) -> PermutationSpec:
    """Spec for a chain ``[Linear|Conv2d, (BatchNorm)?, element-wise act…]* → head``.

    ``head_spatial``: ``None`` when the head input has one entry per channel of the last hidden layer,
    else the number of spatial positions per channel (channel-major flatten)."""
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[str | None, ...]] = {}
    acts: dict[str, str] = {}
    views: dict[str, tuple[int, ...]] = {}
    prev: str | None = None  # permutation acting on the current layer's input
    current: str | None = None
    prev_out: int | None = None
    for name, module in layers:
        key = f"{prefix}{name}"
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise UnsupportedArchitectureError(f"grouped convolution {key!r} is not supported")
            n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            n_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            if prev_out is not None and n_in != prev_out:
                raise UnsupportedArchitectureError(
                    f"layer {key!r} takes {n_in} inputs after {prev_out} units"
                )
            current = key
            sizes[current] = n_out
            extra = (None, None) if isinstance(module, nn.Conv2d) else ()
            axes[f"{key}.weight"] = (current, prev, *extra)
            if module.bias is not None:
                axes[f"{key}.bias"] = (current,)
            acts[current] = key
            prev, prev_out = current, n_out
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if current is None or module.num_features != prev_out:
                raise UnsupportedArchitectureError(f"BatchNorm {key!r} does not follow a matching layer")
            for buf in ("weight", "bias", "running_mean", "running_var"):
                if f"{key}.{buf}" in state:
                    axes[f"{key}.{buf}"] = (current,)
            acts[current] = key
        elif isinstance(module, ELEMENTWISE):
            if current is not None:
                acts[current] = key
        else:
            raise UnsupportedArchitectureError(
                f"module {key!r} ({type(module).__name__}) is not a Linear/Conv2d/BatchNorm/element-wise "
                "activation; permutation alignment supports MLP and plain CNN chains only"
            )
    hkey = f"{head_key}.weight"
    if prev is None:
        axes[hkey] = (None, None)
    elif head_spatial is None:
        if head.in_features != prev_out:
            raise UnsupportedArchitectureError(f"head takes {head.in_features} inputs after {prev_out} units")
        axes[hkey] = (None, prev)
    else:
        assert prev_out is not None
        if head.in_features != prev_out * head_spatial:
            raise UnsupportedArchitectureError(
                f"flatten head takes {head.in_features} inputs, not {prev_out}×{head_spatial}"
            )
        views[hkey] = (head.out_features, prev_out, head_spatial)
        axes[hkey] = (None, prev, None)
    return PermutationSpec(sizes, axes, views, frozenset(k for k in axes if k in params), acts)


def _resnet_spec(model: nn.Module) -> PermutationSpec:
    """Streams shared across residual additions, per-block inner permutations (module docstring)."""
    state = model.state_dict()
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[str | None, ...]] = {}
    acts: dict[str, str | Site] = {}

    def layer(conv: str, norm: str, out: str, inp: str | None) -> None:
        module = model.get_submodule(conv)
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            raise UnsupportedArchitectureError(f"{conv!r} is not an ungrouped nn.Conv2d")
        axes[f"{conv}.weight"] = (out, inp, None, None)
        if module.bias is not None:
            axes[f"{conv}.bias"] = (out,)
        for buf in ("weight", "bias", "running_mean", "running_var"):
            if f"{norm}.{buf}" in state:
                axes[f"{norm}.{buf}"] = (out,)

    stream = "stem.0"
    sizes[stream] = model.stem[0].out_channels
    layer("stem.0", "stem.1", stream, None)
    acts[stream] = "stem.2"
    for j, block in enumerate(model.body):
        b = f"body.{j}"
        inner = f"{b}.conv1"
        sizes[inner] = block.conv1.out_channels
        layer(inner, f"{b}.bn1", inner, stream)
        acts[inner] = f"{b}.act1"
        if isinstance(block.shortcut, nn.Sequential):
            new = f"{b}.shortcut.0"
            sizes[new] = block.shortcut[0].out_channels
            layer(new, f"{b}.shortcut.1", new, stream)
            stream = new
        layer(f"{b}.conv2", f"{b}.bn2", stream, inner)
        acts[stream] = b
    axes["head.weight"] = (None, stream)
    params = {n for n, _ in model.named_parameters()}
    return PermutationSpec(sizes, axes, {}, frozenset(k for k in axes if k in params), acts)


def _transformer_spec(model: nn.Module) -> PermutationSpec:
    """Residual stream, per-block heads and MLP units (module docstring)."""
    state = model.state_dict()
    d = model.embed.embedding_dim
    sizes: dict[str, int] = {"embed": d}
    axes: dict[str, tuple[str | None, ...]] = {"embed.weight": (None, "embed"), "pos_embed": (None, "embed")}
    views: dict[str, tuple[int, ...]] = {}
    acts: dict[str, str | Site] = {"embed": Site("head", dim=-1, pre=True)}
    within: dict[str, Within] = {}

    def norm(key: str) -> None:
        for buf in ("weight", "bias"):
            if f"{key}.{buf}" in state:
                axes[f"{key}.{buf}"] = ("embed",)

    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}"
        h, dh = block.attn.n_heads, block.attn.d_head
        heads, hidden = f"{b}.attn.heads", f"{b}.mlp.0"
        sizes[heads] = h
        sizes[hidden] = block.mlp[0].out_features
        norm(f"{b}.ln1")
        norm(f"{b}.ln2")
        views[f"{b}.attn.qkv.weight"] = (3, h, dh, d)
        axes[f"{b}.attn.qkv.weight"] = (None, heads, None, "embed")
        views[f"{b}.attn.qkv.bias"] = (3, h, dh)
        axes[f"{b}.attn.qkv.bias"] = (None, heads, None)
        views[f"{b}.attn.out.weight"] = (d, h, dh)
        axes[f"{b}.attn.out.weight"] = ("embed", heads, None)
        axes[f"{b}.attn.out.bias"] = ("embed",)
        axes[f"{b}.mlp.0.weight"] = (hidden, "embed")
        axes[f"{b}.mlp.0.bias"] = (hidden,)
        axes[f"{b}.mlp.2.weight"] = ("embed", hidden)
        axes[f"{b}.mlp.2.bias"] = ("embed",)
        acts[heads] = Site(f"{b}.attn.out", dim=-1, pre=True, group=dh)
        acts[hidden] = Site(f"{b}.mlp.1", dim=-1)
        qkv = (f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias")
        within[f"{b}.attn.qk"] = Within(
            heads,
            dh,
            tuple((k, 1, 2, (0, 1)) for k in qkv),
            Site(f"{b}.attn.qkv", dim=-1),
            parts=3,
            act_parts=(0, 1),
        )
        within[f"{b}.attn.v"] = Within(
            heads,
            dh,
            (*((k, 1, 2, (2,)) for k in qkv), (f"{b}.attn.out.weight", 1, 2, None)),
            Site(f"{b}.attn.out", dim=-1, pre=True),
        )
    norm("ln_f")
    axes["head.weight"] = (None, "embed")
    params = {n for n, _ in model.named_parameters()}
    return PermutationSpec(sizes, axes, views, frozenset(k for k in axes if k in params), acts, within)


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The hidden-unit permutation structure of a supported model (see the module docstring); weights under
    a parametrization follow :func:`_parametrized`."""
    return _parametrized(model, _structure_spec(model))


def _parametrized(model: nn.Module, spec: PermutationSpec) -> PermutationSpec:
    """A weight under a parametrization (``spectral_norm``, ``weight_norm``, ...) is stored as
    ``<m>.parametrizations.weight.original`` (``original0`` / ``original1`` for weight norm's ``g`` / ``v``)
    with spectral norm's power-iteration vectors ``_u`` (output units) and ``_v`` (inputs) beside it: each
    gets the weight's permutations, so a permuted model computes the same function."""
    from torch.nn.utils import parametrize

    axes, params = dict(spec.axes), set(spec.params)
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if not parametrize.is_parametrized(module, "weight") or key not in axes:
            continue
        if key in spec.views:
            raise UnsupportedArchitectureError(f"a parametrized weight under a reshaped view ({key})")
        weight_axes = axes.pop(key)
        params.discard(key)
        plist = module.parametrizations.weight
        prefix = f"{name}.parametrizations.weight." if name else "parametrizations.weight."
        for original, t in plist.named_parameters(recurse=False):
            same = tuple(t.shape) == tuple(module.weight.shape)
            axes[prefix + original] = weight_axes if same else (weight_axes[0],) + (None,) * (t.dim() - 1)
            params.add(prefix + original)
        for i, p in enumerate(plist):
            if hasattr(p, "_u") and hasattr(p, "_v"):
                if module.weight.dim() != 2:
                    dims = module.weight.dim()
                    raise UnsupportedArchitectureError(f"spectral norm on a {dims}-d weight ({key})")
                axes[f"{prefix}{i}._u"], axes[f"{prefix}{i}._v"] = (weight_axes[0],), (weight_axes[1],)
    return dataclasses.replace(spec, axes=axes, params=frozenset(params))


def _structure_spec(model: nn.Module) -> PermutationSpec:
    from ..models.architectures import CNN, MLP, EmbedMLP, ResNet, Transformer

    if isinstance(model, ResNet):
        return _resnet_spec(model)
    if isinstance(model, Transformer):
        return _transformer_spec(model)

    if isinstance(model, (MLP, EmbedMLP)):
        return _chain_spec(model, "body.", list(model.body.named_children()), "head", model.head, None)
    if isinstance(model, CNN):
        if len(model.fc):
            raise UnsupportedArchitectureError("CNNs with hidden fully connected layers (hidden=[...])")
        pool = model.pool
        if isinstance(pool, nn.Flatten):
            convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
            c_last = convs[-1].out_channels
            if model.head.in_features % c_last:
                raise UnsupportedArchitectureError("flatten head size is not a multiple of the channel count")
            spatial: int | None = model.head.in_features // c_last
        else:
            spatial = None
        return _chain_spec(model, "body.", list(model.body.named_children()), "head", model.head, spatial)
    if type(model) is nn.Sequential:
        children = list(model.named_children())
        if children and isinstance(children[0][1], nn.Flatten):
            children = children[1:]
        linear_idx = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
        if not linear_idx or any(not isinstance(m, (nn.Linear, *ELEMENTWISE)) for _, m in children):
            raise UnsupportedArchitectureError(
                "an nn.Sequential is supported when it holds nn.Linear layers and element-wise activations"
            )
        last = linear_idx[-1]
        if any(not isinstance(m, (nn.Identity, nn.Dropout)) for _, m in children[last + 1 :]):
            raise UnsupportedArchitectureError("nothing but Identity/Dropout may follow the output nn.Linear")
        head_name, head = children[last]
        return _chain_spec(model, "", children[:last], head_name, head, None)
    raise UnsupportedArchitectureError(
        f"permutation alignment does not support {type(model).__name__}; supported: dynascope 'mlp', 'cnn', "
        "'embed_mlp', 'resnet', 'transformer' and nn.Sequential of Linear + element-wise activations"
    )


# --------------------------------------------------------------------------- applying permutations
def _permute(
    t: torch.Tensor, key: str, spec: PermutationSpec, perms: Mapping[str, Any], skip_axis: int | None = None
) -> torch.Tensor:
    """``t`` (state entry ``key``) with every permutation applied but the one on ``skip_axis`` (and the
    :class:`Within` permutations inside its units)."""
    view = spec.views.get(key, tuple(t.shape))
    v = t.reshape(view)
    skipped = None
    for axis, p in enumerate(spec.axes[key]):
        if p is None or axis == skip_axis:
            skipped = p if axis == skip_axis else skipped
            continue
        idx = torch.as_tensor(np.asarray(perms[p]), dtype=torch.long, device=t.device)
        v = v.index_select(axis, idx)
    for name, w in spec.within.items():
        if w.parent == skipped or name not in perms:
            continue
        for k, unit_axis, inner_axis, slices in w.targets:
            if k == key:
                v = _permute_within(v, np.asarray(perms[name]), unit_axis, inner_axis, slices)
    return v.reshape(t.shape)


def _permute_within(
    v: torch.Tensor, perm: np.ndarray, unit_axis: int, inner_axis: int, slices: tuple[int, ...] | None
) -> torch.Tensor:
    """new[…, i, …, a, …] = v[…, i, …, perm[i, a], …] (on the ``slices`` of axis 0 only, when given)."""
    shape = [1] * v.dim()
    shape[unit_axis], shape[inner_axis] = perm.shape
    idx = torch.as_tensor(perm, dtype=torch.long, device=v.device)
    if unit_axis > inner_axis:
        idx = idx.T
    out = v.gather(inner_axis, idx.reshape(shape).expand(v.shape))
    if slices is None:
        return out
    sel = torch.as_tensor(slices, dtype=torch.long, device=v.device)
    return v.index_copy(0, sel, out.index_select(0, sel))


def _check_perms(spec: PermutationSpec, perms: Mapping[str, Any]) -> None:
    for name, n in spec.sizes.items():
        if name not in perms:
            raise ValueError(f"missing permutation for layer {name!r}")
        p = np.asarray(perms[name])
        if p.shape != (n,) or not np.array_equal(np.sort(p), np.arange(n)):
            raise ValueError(f"perms[{name!r}] is not a permutation of {n} units")
    for name, w in spec.within.items():
        if name not in perms:
            continue
        p, shape = np.asarray(perms[name]), (spec.sizes[w.parent], w.size)
        if p.shape != shape or not (np.sort(p, axis=1) == np.arange(w.size)).all():
            raise ValueError(f"perms[{name!r}] is not an array {list(shape)} of per-unit permutations")


def apply_permutations(
    model: nn.Module, perms: Mapping[str, Any], spec: PermutationSpec | None = None
) -> nn.Module:
    """A deep copy of ``model`` with hidden units permuted: unit ``i`` of layer ``ℓ`` in the copy is unit
    ``perms[ℓ][i]`` of ``model`` (integer buffers are copied unchanged). The function is unchanged."""
    spec = spec or permutation_spec(model)
    _check_perms(spec, perms)
    out = copy.deepcopy(model)
    state = out.state_dict()
    new = {k: (_permute(v, k, spec, perms) if k in spec.axes else v) for k, v in state.items()}
    out.load_state_dict(new)
    return out


def random_permutations(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniformly random permutations of every hidden layer of ``model`` (seeded)."""
    rng = np.random.default_rng(seed)
    spec = permutation_spec(model)
    perms = {name: rng.permutation(n) for name, n in spec.sizes.items()}
    for name, w in spec.within.items():
        perms[name] = np.stack([rng.permutation(w.size) for _ in range(spec.sizes[w.parent])])
    return perms


def invert_permutations(perms: Mapping[str, Any], spec: PermutationSpec) -> dict[str, np.ndarray]:
    """The permutations that undo ``perms``: ``apply_permutations(apply_permutations(m, perms),
    invert_permutations(perms, spec))`` has ``m``'s weights."""
    out = {name: np.argsort(np.asarray(perms[name])) for name in spec.sizes}
    for name, w in spec.within.items():
        if name in perms:
            p = np.asarray(perms[name])
            out[name] = np.argsort(p[out[w.parent]], axis=1)
    return out


def _check_pair(model_a: nn.Module, model_b: nn.Module) -> PermutationSpec:
    spec = permutation_spec(model_a)
    spec_b = permutation_spec(model_b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if spec.sizes != spec_b.sizes or sa.keys() != sb.keys():
        raise ValueError("model_a and model_b have different architectures; they cannot be aligned")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise ValueError(
                f"model_a and model_b disagree on {k!r}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}"
            )
    return spec


# --------------------------------------------------------------------------- weight matching
def _inner_assignments(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For gains ``g[i, j, a, b]`` of pairing dimension ``a`` of head ``i`` (model A) with dimension ``b`` of
    head ``j`` (model B): the best inner assignment ``best[i, j]`` (``a → best[i, j, a]``) and its total gain
    ``gain[i, j]``, so that heads and their dimensions are matched together exactly."""
    from scipy.optimize import linear_sum_assignment

    n = g.shape[0]
    best = np.empty((n, n, g.shape[2]), dtype=np.int64)
    gain = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            r, col = linear_sum_assignment(g[i, j], maximize=True)
            best[i, j] = col
            gain[i, j] = g[i, j][r, col].sum()
    return best, gain


def weight_matching_permutations(
    model_a: nn.Module, model_b: nn.Module, *, max_iter: int = 100, seed: int = 0
) -> Alignment:
    """Permutations of ``model_b``'s hidden units maximising ``Σ_params ⟨θ_A, π(θ_B)⟩`` (module docstring)."""
    from scipy.optimize import linear_sum_assignment

    check_int("max_iter", max_iter, min=1)
    spec = _check_pair(model_a, model_b)
    sa = {k: v.detach().to("cpu", torch.float64) for k, v in model_a.state_dict().items() if k in spec.params}
    sb = {k: v.detach().to("cpu", torch.float64) for k, v in model_b.state_dict().items() if k in spec.params}
    perm_keys: dict[str, list[tuple[str, int]]] = {p: [] for p in spec.sizes}
    for k in spec.params:
        for axis, p in enumerate(spec.axes[k]):
            if p is not None:
                perm_keys[p].append((k, axis))
    perms: dict[str, np.ndarray] = {p: np.arange(n) for p, n in spec.sizes.items()}
    for name, w in spec.within.items():
        perms[name] = np.tile(np.arange(w.size), (spec.sizes[w.parent], 1))
    rng = np.random.default_rng(seed)
    names = sorted(spec.sizes)
    converged, n_iter = not names, 0
    while not converged and n_iter < max_iter:
        n_iter += 1
        improved = False
        for p in rng.permutation(names):
            n = spec.sizes[p]
            inner = {name: w for name, w in spec.within.items() if w.parent == p}
            cost = torch.zeros(n, n, dtype=torch.float64)
            gains = {
                name: torch.zeros(n, n, w.size, w.size, dtype=torch.float64) for name, w in inner.items()
            }
            for k, axis in perm_keys[p]:
                wa = sa[k].reshape(spec.views.get(k, sa[k].shape))
                wb = _permute(sb[k], k, spec, perms, skip_axis=axis).reshape(wa.shape)
                rest = torch.ones(wa.shape[0], dtype=torch.bool)
                for name, w in inner.items():
                    for key, unit_axis, inner_axis, slices in w.targets:
                        if key != k:
                            continue
                        sel = torch.arange(wa.shape[0]) if slices is None else torch.tensor(slices)
                        rest[sel] = False
                        ta, tb = (
                            torch.movedim(t.index_select(0, sel), (unit_axis, inner_axis), (0, 1)).reshape(
                                n, w.size, -1
                            )
                            for t in (wa, wb)
                        )
                        gains[name] += torch.einsum("iar,jbr->ijab", ta, tb)
                if rest.any():
                    ta, tb = (torch.movedim(t[rest], axis, 0).reshape(n, -1) for t in (wa, wb))
                    cost += ta @ tb.T
            c = cost.numpy().copy()
            old = c[np.arange(n), perms[p]].sum()
            best: dict[str, np.ndarray] = {}
            for name, g in gains.items():
                gn = g.numpy()
                old += gn[
                    np.arange(n)[:, None], perms[p][:, None], np.arange(inner[name].size), perms[name]
                ].sum()
                best[name], gain = _inner_assignments(gn)
                c += gain
            rows, cols = linear_sum_assignment(c, maximize=True)
            new = c[rows, cols].sum()
            if new > old + 1e-12 * max(abs(old), 1.0):
                improved = True
                perms[p] = cols
                for name, b in best.items():
                    perms[name] = b[np.arange(n), cols]
        converged = not improved
    objective = sum(float((sa[k] * _permute(sb[k], k, spec, perms)).sum()) for k in spec.params)
    return Alignment(perms, "weights", n_iter, converged, objective)


def weight_matching(
    model_a: nn.Module, model_b: nn.Module, *, max_iter: int = 100, seed: int = 0
) -> nn.Module:
    """A deep copy of ``model_b`` with its hidden units permuted to align with ``model_a`` by weight
    matching (Git Re-Basin coordinate descent, module docstring); the function is unchanged."""
    alignment = weight_matching_permutations(model_a, model_b, max_iter=max_iter, seed=seed)
    return apply_permutations(model_b, alignment.perms)


# --------------------------------------------------------------------------- activation matching
class _Moments:
    """Streaming float64 sums for the cross-correlation of two activation sets [rows, n]."""

    def __init__(self, n: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.sa, self.sb, self.saa, self.sbb, self.sab = 0, z(n), z(n), z(n), z(n), z(n, n)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.to(torch.float64), b.to(torch.float64)
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> torch.Tensor:
        m = self.count
        ma, mb = self.sa / m, self.sb / m
        cov = self.sab / m - ma[:, None] * mb[None, :]
        va = (self.saa / m - ma * ma).clamp_min(0)
        vb = (self.sbb / m - mb * mb).clamp_min(0)
        denom = (va[:, None] * vb[None, :]).sqrt()
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def _unit_rows(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Activations with units along ``dim`` (e.g. [B, n] or [B, n, *spatial]) as rows [B·rest, n]."""
    if t.dim() == 2 and dim in (1, -1):
        return t
    return torch.movedim(t, dim, -1).reshape(-1, t.shape[dim])


def _site(value: str | Site) -> Site:
    return value if isinstance(value, Site) else Site(value)


def activation_matching_permutations(
    model_a: nn.Module, model_b: nn.Module, data: Any, *, batch_size: int | None = 1024
) -> Alignment:
    """Per hidden layer, the permutation of ``model_b``'s units maximising the summed Pearson correlation
    of post-activation outputs with ``model_a``'s (eval mode, float64 streaming statistics)."""
    from scipy.optimize import linear_sum_assignment

    spec = _check_pair(model_a, model_b)
    if not spec.sizes:
        return Alignment({}, "activations")
    pa = next(iter(model_a.parameters()))
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    store: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
    handles = []

    def hook(which: str, name: str):
        def fn(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            store[which][name] = output.detach()

        return fn

    def pre_hook(which: str, name: str):
        def fn(module: nn.Module, inputs: Any) -> None:
            store[which][name] = inputs[0].detach()

        return fn

    sites = {p: _site(spec.activations[p]) for p in spec.sizes}
    moments = {p: _Moments(n * sites[p].group, pa.device) for p, n in spec.sizes.items()}
    for name, w in spec.within.items():
        if w.site is not None:
            sites[name] = w.site
            moments[name] = _Moments(w.parts * spec.sizes[w.parent] * w.size, pa.device)
    try:
        for p, site in sites.items():
            for which, mods in (("a", mods_a), ("b", mods_b)):
                if site.pre:
                    handles.append(mods[site.module].register_forward_pre_hook(pre_hook(which, p)))
                else:
                    handles.append(mods[site.module].register_forward_hook(hook(which, p)))
        with ModeGuard(model_a, "eval"), ModeGuard(model_b, "eval"), torch.no_grad():
            for batch in as_batches(data, batch_size, device=pa.device):
                model_a(batch.x)
                model_b(batch.x)
                for p, site in sites.items():
                    moments[p].update(
                        _unit_rows(store["a"][p], site.dim), _unit_rows(store["b"][p], site.dim)
                    )
    finally:
        for h in handles:
            h.remove()
    perms, objective = {}, 0.0
    for p, n in spec.sizes.items():
        inner = {k: w for k, w in spec.within.items() if w.parent == p and w.site is not None}
        if inner:  # heads with inner dimensions: cost[i, j] = Σ_w best inner assignment of the pair
            cost = np.zeros((n, n))
            best: dict[str, np.ndarray] = {}
            for name, w in inner.items():
                c = moments[name].correlation().reshape(w.parts, n, w.size, w.parts, n, w.size)
                g = sum(c[q, :, :, q] for q in w.act_parts).permute(0, 2, 1, 3).cpu().numpy()  # [i, j, a, b]
                best[name], gain = _inner_assignments(g)
                cost += gain
            rows, cols = linear_sum_assignment(cost, maximize=True)
            perms[p] = cols
            for name, b in best.items():
                perms[name] = b[np.arange(n), cols]
            objective += float(cost[rows, cols].sum())
            continue
        g = sites[p].group
        # grouped units: cost[h, h'] = Σ_j corr[h·g + j, h'·g + j]
        corr = moments[p].correlation().reshape(n, g, n, g).diagonal(dim1=1, dim2=3).sum(-1).cpu().numpy()
        rows, cols = linear_sum_assignment(corr, maximize=True)
        perms[p] = cols
        objective += float(corr[rows, cols].sum())
    return Alignment(perms, "activations", 1, True, objective)


def activation_matching(
    model_a: nn.Module, model_b: nn.Module, data: Any, *, batch_size: int | None = 1024
) -> nn.Module:
    """A deep copy of ``model_b`` with hidden units permuted to maximise the correlation of its
    activations with ``model_a``'s on ``data`` (module docstring); the function is unchanged."""
    alignment = activation_matching_permutations(model_a, model_b, data, batch_size=batch_size)
    return apply_permutations(model_b, alignment.perms)
