"""Built-in architectures, all ending in a final ``nn.Linear`` named ``head``.

The input of ``head`` is the penultimate feature vector used by neural-collapse probes.
Every model runs in float32 and float64 (``model.double()``) on CPU and, being made of plain
ops only (hand-written attention, no fused kernels), under ``torch.func`` transforms
(``functional_call``, ``vmap``, ``jvp`` forward-mode AD).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .registry import register

__all__ = [
    "MLP",
    "CNN",
    "Transformer",
    "EmbedMLP",
    "RandomFeatures",
    "ResNet",
    "TwoLayerReLU",
    "ParametrizedMLP",
    "ScaledLinear",
    "PARAMETRIZATIONS",
    "ACTIVATIONS",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _positive(**values: int) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


def _as_image(x: Tensor, channels: int, size: int) -> Tensor:
    """Accept ``[N, C, H, W]``, ``[N, H, W]`` (C=1) or flat ``[N, C*H*W]`` inputs."""
    if x.dim() == 4:
        return x
    if x.dim() == 3 and channels == 1:
        return x.unsqueeze(1)
    if x.dim() == 2 and x.shape[1] == channels * size * size:
        return x.reshape(x.shape[0], channels, size, size)
    raise ValueError(
        f"expected images [N, {channels}, {size}, {size}] or flat [N, {channels * size * size}], "
        f"got shape {tuple(x.shape)}"
    )


@register("mlp")
class MLP(nn.Module):
    """Fully connected net: ``body`` = [Linear(in→w), act] + (depth-1)×[Linear(w→w), act]; ``head`` w→out.

    ``depth`` counts hidden layers (0 gives a linear model). Inputs are flattened from dim 1.
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        out_dim: int,
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        _positive(in_dim=in_dim, width=width, out_dim=out_dim)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=bias), _activation(activation)]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


@register("cnn")
class CNN(nn.Module):
    """Conv net: ``body`` = per channel count [Conv3x3(pad 1), (BatchNorm), act]; pool; ``fc``; ``head``.

    ``pool="avg"``: global average pool (features = channels[-1]);
    ``pool="flatten"``: flatten (features = channels[-1]·image_size²).
    ``hidden``: widths of fully connected [Linear, act] layers between the pooled features and the
    ``head`` (LeNet-style; empty by default, then ``fc`` is an empty ``nn.Sequential``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: list[int],
        out_dim: int,
        batchnorm: bool = False,
        activation: str = "relu",
        pool: str = "avg",
        hidden: list[int] | tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        _positive(in_channels=in_channels, image_size=image_size, out_dim=out_dim)
        _positive(**{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        if not channels:
            raise ValueError("channels must be a non-empty list of ints")
        _positive(**{f"channels[{i}]": c for i, c in enumerate(channels)})
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.in_channels, self.image_size = in_channels, image_size
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(_activation(activation))
            c_in = c
        self.body = nn.Sequential(*layers)
        if pool == "avg":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            feat = c_in
        else:
            self.pool = nn.Flatten()
            feat = c_in * image_size * image_size
        fc: list[nn.Module] = []
        for h in hidden:
            fc += [nn.Linear(feat, h), _activation(activation)]
            feat = h
        self.fc = nn.Sequential(*fc)
        self.head = nn.Linear(feat, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_image(x, self.in_channels, self.image_size)
        return self.head(self.fc(self.pool(self.body(x))))


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention from plain ops: softmax(QKᵀ/√d_head + causal mask) V, then W_O."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)  # True above diagonal = masked
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        scores = scores.masked_fill(self.mask[:t, :t], float("-inf"))
        att = torch.softmax(scores, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)
        return self.out(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)); LayerNorms optional (Identity)."""

    def __init__(
        self, d_model: int, n_heads: int, d_mlp: int, seq_len: int, activation: str, layernorm: bool
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.attn = CausalSelfAttention(d_model, n_heads, seq_len)
        self.ln2 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_mlp), _activation(activation), nn.Linear(d_mlp, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@register("transformer")
class Transformer(nn.Module):
    """Decoder-only (causal) transformer on token ids ``[N, T]`` predicting from the last position.

    Token + learned positional embeddings (init N(0, 1/d_model)), ``n_layers`` pre-norm blocks,
    final LayerNorm, ``head`` d_model→out_dim (default ``vocab_size``). The grokking config is
    ``vocab_size=114, seq_len=3, d_model=128, n_heads=4, n_layers=1, d_mlp=512, out_dim=113``.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_mlp: int,
        out_dim: int | None = None,
        activation: str = "relu",
        layernorm: bool = True,
    ) -> None:
        super().__init__()
        out_dim = vocab_size if out_dim is None else out_dim
        _positive(
            vocab_size=vocab_size,
            seq_len=seq_len,
            d_model=d_model,
            n_heads=n_heads,
            d_mlp=d_mlp,
            out_dim=out_dim,
        )
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
            raise ValueError(f"n_layers must be a non-negative int, got {n_layers!r}")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.randn(seq_len, d_model) / math.sqrt(d_model))
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d_model))
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_mlp, seq_len, activation, layernorm) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.head = nn.Linear(d_model, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] > self.seq_len:
            raise ValueError(f"expected token ids [N, T<={self.seq_len}], got shape {tuple(x.shape)}")
        if x.is_floating_point():
            raise TypeError(f"expected integer token ids, got dtype {x.dtype}")
        h = self.embed(x) + self.pos_embed[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h[:, -1]))


@register("embed_mlp")
class EmbedMLP(nn.Module):
    """Grokking MLP on token pairs ``[N, 2]``: concat(E[a], E[b]) → ``body`` (Linear 2d→w, act) → ``head``.

    ``shared_embedding=True`` uses one table ``embed`` for both tokens, otherwise ``embed_a``/``embed_b``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_embed: int,
        width: int,
        out_dim: int | None = None,
        shared_embedding: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        out_dim = vocab_size if out_dim is None else out_dim
        _positive(vocab_size=vocab_size, d_embed=d_embed, width=width, out_dim=out_dim)
        self.shared_embedding = shared_embedding
        if shared_embedding:
            self.embed = nn.Embedding(vocab_size, d_embed)
        else:
            self.embed_a = nn.Embedding(vocab_size, d_embed)
            self.embed_b = nn.Embedding(vocab_size, d_embed)
        self.body = nn.Sequential(nn.Linear(2 * d_embed, width), _activation(activation))
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != 2 or x.is_floating_point():
            raise ValueError(f"expected integer token pairs [N, 2], got {tuple(x.shape)} {x.dtype}")
        if self.shared_embedding:
            e = self.embed(x).flatten(1)
        else:
            e = torch.cat([self.embed_a(x[:, 0]), self.embed_b(x[:, 1])], dim=1)
        return self.head(self.body(e))


@register("random_features")
class RandomFeatures(nn.Module):
    """Random-features model f(x) = head(act(W x / √in_dim)), W ~ N(0, 1) fixed.

    W (``feature_weight``, [n_features, in_dim]) is a persistent buffer, not a parameter, so only the
    readout ``head`` (n_features→out_dim) is trained and counted by ``param_count``.
    """

    def __init__(
        self,
        in_dim: int,
        n_features: int,
        out_dim: int,
        activation: str = "relu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        _positive(in_dim=in_dim, n_features=n_features, out_dim=out_dim)
        self.register_buffer("feature_weight", torch.randn(n_features, in_dim) / math.sqrt(in_dim))
        self.act = _activation(activation)
        self.head = nn.Linear(n_features, out_dim, bias=bias)

    def features(self, x: Tensor) -> Tensor:
        return self.act(x.flatten(1) @ self.feature_weight.T)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: act(BN(conv(act(BN(conv(x))))) + shortcut(x)); 1x1 conv shortcut on resize."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool, activation: str) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batchnorm else nn.Identity()

        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = norm(c_out)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not batchnorm)
        self.bn2 = norm(c_out)
        self.act2 = _activation(activation)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batchnorm), norm(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


@register("resnet")
class ResNet(nn.Module):
    """Small ResNet: stem conv3x3→BN→act, one stage per entry of ``widths`` (``blocks_per_stage``
    basic blocks, stride 2 at the start of every stage after the first), global average pool, ``head``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        widths: list[int],
        out_dim: int,
        blocks_per_stage: int = 1,
        batchnorm: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _positive(
            in_channels=in_channels, image_size=image_size, out_dim=out_dim, blocks_per_stage=blocks_per_stage
        )
        if not widths:
            raise ValueError("widths must be a non-empty list of ints")
        _positive(**{f"widths[{i}]": w for i, w in enumerate(widths)})
        self.in_channels, self.image_size = in_channels, image_size
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batchnorm),
            nn.BatchNorm2d(widths[0]) if batchnorm else nn.Identity(),
            _activation(activation),
        )
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c, w, stride, batchnorm, activation))
                c = w
        self.body = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_image(x, self.in_channels, self.image_size)
        return self.head(self.pool(self.body(self.stem(x))))


@register("two_layer_relu")
class TwoLayerReLU(nn.Module):
    """Two-layer ReLU net of benign-overfitting theory, ``f(x) = Σ_j a_j ReLU(⟨w_j, x⟩)`` with a fixed
    second layer ``a_j = +1/m`` (first half of the units), ``−1/m`` (second half), no biases, trained
    first layer ``w_j ~ N(0, init_scale² I)``. Output: the two logits ``(−f/2, f/2)``, so cross-entropy
    on labels {0, 1} is the logistic loss ``log(1 + exp(−ỹ f))`` with ``ỹ = ±1``. ``head`` is the fixed
    readout (``requires_grad=False``)."""

    def __init__(self, in_dim: int, width: int, init_scale: float = 1e-4) -> None:
        super().__init__()
        _positive(in_dim=in_dim, width=width)
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        self.body = nn.Sequential(nn.Linear(in_dim, width, bias=False), nn.ReLU())
        nn.init.normal_(self.body[0].weight, std=float(init_scale))
        a = torch.cat([torch.ones(width // 2), -torch.ones(width - width // 2)]) / width
        self.head = nn.Linear(width, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.stack([-a / 2, a / 2]))
        self.head.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


class ScaledLinear(nn.Linear):
    """``y = multiplier · x Wᵀ`` (no bias), ``W`` initialised ``N(0, init_std²)``: the layer of an
    abc-parametrisation, whose stored (trained) weight is ``W`` and whose effective weight is
    ``multiplier · W``."""

    def __init__(self, in_features: int, out_features: int, *, multiplier: float, init_std: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.multiplier = float(multiplier)
        nn.init.normal_(self.weight, std=float(init_std))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight) * self.multiplier

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.multiplier:.4g}"


PARAMETRIZATIONS = ("sp", "ntk", "mup")


@register("parametrized_mlp")
class ParametrizedMLP(nn.Module):
    """Bias-free MLP ``d → n → … → n → k`` (``depth`` hidden layers of width ``n``) in standard (SP), NTK
    or maximal-update (μP) parametrisation, all relative to a base width ``n₀`` (``base_width``).

    Layer ``l`` with fan-in ``m_l`` computes ``z = c_l · W_l h`` with stored weights ``W_l ~ N(0, σ_l²)``:

    * ``"sp"``  (PyTorch-like): ``c_l = 1``, ``σ_l² = 1/m_l`` for every layer;
    * ``"ntk"``: ``c_l = 1/√m_l``, ``σ_l² = 1`` for every layer;
    * ``"mup"``: as NTK for the hidden layers, readout ``c_{L+1} = √n₀ / n`` (= ``1/√n · √(n₀/n)``,
      the mean-field output scale; Yang & Hu 2021, Bordelon & Pehlevan 2022).

    SGD on the stored weights takes the global step ``η · lr_scale`` (:attr:`lr_scale`): ``1`` (SP),
    ``n₀`` (NTK), ``n`` (μP, i.e. ``n₀ · n/n₀``). With ``d = n = n₀`` the three are the same function and
    the same GD trajectory for a given ``η``; under μP every layer's pre-activations move by Θ(1) per step
    as ``n → ∞`` (feature learning), under NTK by Θ(1/√n) (lazy), and under SP the readout update
    makes the output move by Θ(n), so the stable ``η`` falls with width.
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        out_dim: int,
        parametrization: str = "mup",
        base_width: int = 64,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _positive(in_dim=in_dim, width=width, depth=depth, out_dim=out_dim, base_width=base_width)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        self.parametrization, self.base_width, self.width = parametrization, base_width, width

        def layer(fan_in: int, fan_out: int, readout: bool = False) -> ScaledLinear:
            if parametrization == "sp":
                return ScaledLinear(fan_in, fan_out, multiplier=1.0, init_std=fan_in**-0.5)
            mult = math.sqrt(base_width) / fan_in if readout and parametrization == "mup" else fan_in**-0.5
            return ScaledLinear(fan_in, fan_out, multiplier=mult, init_std=1.0)

        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [layer(d, width), _activation(activation)]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = layer(width, out_dim, readout=True)

    @property
    def lr_scale(self) -> float:
        """SGD step on the stored weights per unit of the parametrisation-free rate ``η``."""
        return {"sp": 1.0, "ntk": float(self.base_width), "mup": float(self.width)}[self.parametrization]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))
