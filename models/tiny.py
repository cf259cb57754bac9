"""Tiny configs of every built-in architecture and matching example inputs, for tests and demos."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .registry import build

__all__ = ["TINY_CONFIGS", "example_input", "build_tiny", "output_dim"]

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": dict(name="mlp", in_dim=5, width=7, depth=2, out_dim=3),
    "mlp_tanh_nobias": dict(name="mlp", in_dim=5, width=6, depth=1, out_dim=2, activation="tanh", bias=False),
    "mlp_linear": dict(name="mlp", in_dim=5, width=6, depth=3, out_dim=2, activation="linear"),
    "cnn": dict(name="cnn", in_channels=1, image_size=6, channels=[3, 4], out_dim=3),
    "cnn_bn_flatten": dict(
        name="cnn", in_channels=2, image_size=4, channels=[3], out_dim=2, batchnorm=True, pool="flatten"
    ),
    "cnn_hidden": dict(
        name="cnn", in_channels=1, image_size=4, channels=[2], out_dim=3, pool="flatten", hidden=[5, 4]
    ),
    "transformer": dict(
        name="transformer", vocab_size=11, seq_len=3, d_model=8, n_heads=2, n_layers=2, d_mlp=12, out_dim=7
    ),
    "transformer_noln_gelu": dict(
        name="transformer",
        vocab_size=9,
        seq_len=4,
        d_model=6,
        n_heads=3,
        n_layers=1,
        d_mlp=8,
        layernorm=False,
        activation="gelu",
    ),
    "embed_mlp": dict(name="embed_mlp", vocab_size=7, d_embed=4, width=9),
    "embed_mlp_separate": dict(
        name="embed_mlp", vocab_size=7, d_embed=3, width=5, out_dim=4, shared_embedding=False
    ),
    "random_features": dict(name="random_features", in_dim=5, n_features=12, out_dim=2),
    "resnet": dict(name="resnet", in_channels=1, image_size=6, widths=[3, 5], out_dim=3),
    "resnet_nobn": dict(name="resnet", in_channels=3, image_size=4, widths=[2], out_dim=2, batchnorm=False),
}


def build_tiny(key: str, **overrides: Any) -> nn.Module:
    """Build ``TINY_CONFIGS[key]`` with optional overrides (e.g. ``seed=1``)."""
    cfg = {**TINY_CONFIGS[key], **overrides}
    return build(cfg.pop("name"), **cfg)


def output_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("out_dim") or cfg["vocab_size"]


def example_input(
    cfg: dict[str, Any], n: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A deterministic input batch of size ``n`` that the model built from ``cfg`` accepts."""
    g = torch.Generator().manual_seed(seed)
    name = cfg["name"]
    if name in ("mlp", "random_features"):
        return torch.randn(n, cfg["in_dim"], generator=g, dtype=dtype)
    if name in ("cnn", "resnet"):
        s = cfg["image_size"]
        return torch.randn(n, cfg["in_channels"], s, s, generator=g, dtype=dtype)
    if name == "transformer":
        return torch.randint(0, cfg["vocab_size"], (n, cfg["seq_len"]), generator=g)
    if name == "embed_mlp":
        return torch.randint(0, cfg["vocab_size"], (n, 2), generator=g)
    raise ValueError(f"no example input for model {name!r}")
