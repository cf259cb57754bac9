"""Grokking on modular addition: memorisation first, generalisation thousands of steps later.

Default (Power et al. 2022 / the MLP of Gromov 2023 and Liu et al. 2022): pairs ``(a, b)`` with
``c = (a + b) mod 97``, 30 % of the 97² pairs for training; ``embed_mlp`` = two embedding tables
(97→128, one for ``a``, one for ``b``) concatenated → Linear(256→512) → ReLU → Linear(512→97);
full-batch AdamW, lr 3e-3, weight decay 1.0, betas (0.9, 0.98), cross-entropy. Weight decay is what
makes the network leave the memorising solution for the lower-norm generalising one.

``TRANSFORMER_CONFIG`` is the one-layer transformer of Nanda et al. 2023 (p = 113, d_model 128,
4 heads, d_mlp 512, no LayerNorm, AdamW lr 1e-3, wd 1.0, 10-step linear warm-up, ~20k full-batch
steps); it is meant for a GPU (``device="cuda"``).
"""

from __future__ import annotations

import os
from typing import Any

from ..models import Run
from .base import Recipe, recipe_function, register_recipe
from .train import train_recipe

__all__ = ["grokking", "GROKKING_CONFIG", "GROKKING_SMALL", "TRANSFORMER_CONFIG"]

GROKKING_CONFIG: dict[str, Any] = {
    "p": 97,
    "operation": "add",
    "train_fraction": 0.3,
    "arch": "embed_mlp",
    "d_embed": 128,
    "width": 512,
    "shared_embedding": False,
    "lr": 3e-3,
    "weight_decay": 1.0,
    "betas": [0.9, 0.98],
    "warmup_steps": 0,
    "steps": 5000,
    "log_every": 10,
    "checkpoint_steps": "log",
    "n_checkpoints": 40,
    "save_optimizer": True,
    "device": "cpu",
}

#: CI / demo variant: a narrower net and half of the pairs for training grok ~6x sooner and cheaper.
#: AdamW's state is saved at every checkpoint (as in the full config; ~0.2 MB each), so the Edge of
#: stability page can draw λ_max(P⁻¹H) over training.
GROKKING_SMALL: dict[str, Any] = {
    "train_fraction": 0.5,
    "d_embed": 32,
    "width": 128,
    "steps": 1400,
    "n_checkpoints": 16,
}

TRANSFORMER_CONFIG: dict[str, Any] = {
    **GROKKING_CONFIG,
    "p": 113,
    "arch": "transformer",
    "d_model": 128,
    "n_heads": 4,
    "d_mlp": 512,
    "lr": 1e-3,
    "warmup_steps": 10,
    "steps": 20000,
    "log_every": 50,
    "n_checkpoints": 60,
    "device": "cuda",
}


def _model_config(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    p = int(cfg["p"])
    if cfg["arch"] == "embed_mlp":
        return {
            "name": "embed_mlp",
            "vocab_size": p,
            "d_embed": int(cfg["d_embed"]),
            "width": int(cfg["width"]),
            "out_dim": p,
            "shared_embedding": bool(cfg["shared_embedding"]),
            "seed": seed,
        }
    if cfg["arch"] == "transformer":
        return {
            "name": "transformer",
            "vocab_size": p + 1,
            "seq_len": 3,
            "d_model": int(cfg["d_model"]),
            "n_heads": int(cfg["n_heads"]),
            "n_layers": 1,
            "d_mlp": int(cfg["d_mlp"]),
            "out_dim": p,
            "layernorm": False,
            "seed": seed,
        }
    raise ValueError(f"grokking: arch must be 'embed_mlp' or 'transformer', got {cfg['arch']!r}")


@recipe_function("grokking", GROKKING_CONFIG, accepted={**GROKKING_CONFIG, **TRANSFORMER_CONFIG})
def grokking(
    out: str | os.PathLike[str], cfg: dict[str, Any], seed: int, progress: Any, overwrite: bool, resume: bool
) -> Run:
    """Train the grokking recipe into run folder ``out`` (config keys: ``GROKKING_CONFIG``)."""
    fmt = "pairs" if cfg["arch"] == "embed_mlp" else "tokens"
    schedule = None
    if cfg.get("warmup_steps"):
        w = int(cfg["warmup_steps"])
        schedule = {"type": "list", "values": [cfg["lr"] * (i + 1) / w for i in range(w)] + [cfg["lr"]]}
    run_cfg = {
        "path": out,
        "model": _model_config(cfg, seed),
        "dataset": {
            "name": "modular_arithmetic",
            "p": int(cfg["p"]),
            "operation": cfg["operation"],
            "train_fraction": float(cfg["train_fraction"]),
            "format": fmt,
            "seed": seed,
        },
        "optimizer": {
            "name": "adamw",
            "lr": float(cfg["lr"]),
            "weight_decay": float(cfg["weight_decay"]),
            "betas": list(cfg["betas"]),
        },
        "lr_schedule": schedule,
        "loss": "cross_entropy",
        "seed": seed,
        "extra": {"recipe": "grokking", "phenomenon": "grokking", "config": cfg, "batch_size": None},
        "notes": "Grokking: full-batch AdamW with strong weight decay on modular arithmetic.",
    }
    return train_recipe(run_cfg, cfg, progress=progress, resume=resume, overwrite=overwrite)


register_recipe(
    Recipe(
        name="grokking",
        phenomenon="grokking",
        description="(a+b) mod 97, 30% train, embedding MLP 97→128 (x2) → 512 → 97, full-batch AdamW "
        "lr 3e-3, wd 1.0: train acc 1 within ~500 steps, test acc ~0 until it jumps to ~1 much later.",
        fn=grokking,
        config=GROKKING_CONFIG,
        small=GROKKING_SMALL,
    )
)
register_recipe(
    Recipe(
        name="grokking_transformer",
        phenomenon="grokking",
        description="(a+b) mod 113 with the 1-layer transformer of Nanda et al. (d_model 128, 4 heads, "
        "d_mlp 512), AdamW lr 1e-3, wd 1.0; meant for a GPU.",
        fn=grokking,
        config=TRANSFORMER_CONFIG,
        small={"steps": 200, "d_model": 32, "d_mlp": 64, "n_checkpoints": 5, "device": "cpu"},
        gpu_only=True,
    )
)
