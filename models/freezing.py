"""Freezing by name: which parameters train, from ``"trainable"`` / ``"frozen"`` name patterns.

A model spec may carry ``"trainable": [patterns]`` (only those train) or ``"frozen": [patterns]`` (those do
not; both: trainable minus frozen). A pattern names a parameter when it is equal to its name, a module
prefix of it (``"body.0"`` names ``body.0.weight``) or a glob (``"encoder.*"``, ``"*.bias"``).
:func:`apply_freezing` sets ``requires_grad`` accordingly; every probe differentiates only the parameters
with ``requires_grad=True`` and lists the others in ``.meta["frozen_params"]``, so a notebook and the
runner that build the model from the same spec measure the same function of the same parameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["FREEZE_KEYS", "name_matches", "apply_freezing", "freeze_patterns", "frozen_parameters"]

FREEZE_KEYS = ("trainable", "frozen")


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` names ``name``: equal, a module prefix (``"body.0"`` ⊃ ``body.0.weight``) or a glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def freeze_patterns(spec: Mapping[str, Any]) -> dict[str, list[str]]:
    """The ``trainable`` / ``frozen`` lists of a spec (checked: lists of strings), only those present."""
    out = {}
    for key in FREEZE_KEYS:
        if key in spec:
            pats = spec[key]
            pats = [pats] if isinstance(pats, str) else pats
            if not isinstance(pats, (list, tuple)) or not pats or not all(isinstance(p, str) for p in pats):
                raise ValueError(f"model spec: {key!r} must be a non-empty list of parameter-name patterns; "
                                 f"got {spec[key]!r}")  # fmt: skip
            out[key] = list(pats)
    return out


def apply_freezing(
    model: nn.Module, *, trainable: Sequence[str] | None = None, frozen: Sequence[str] | None = None
) -> list[str]:
    """Set ``requires_grad`` from name patterns (module docstring); returns the frozen names.

    ``ValueError`` when a pattern names no parameter, or when nothing is left to train."""
    names = [n for n, _ in model.named_parameters()]
    for what, pats in (("trainable", trainable), ("frozen", frozen)):
        for pat in pats or []:
            if not any(name_matches(n, pat) for n in names):
                raise ValueError(f"{what} pattern {pat!r} names no parameter of the model; names are {names}")
    out = []
    for n, p in model.named_parameters():
        train = trainable is None or any(name_matches(n, pat) for pat in trainable)
        train = train and not any(name_matches(n, pat) for pat in frozen or [])
        p.requires_grad_(train)
        if not train:
            out.append(n)
    if names and len(out) == len(names):
        raise ValueError(f"trainable={trainable!r}, frozen={frozen!r} leave no parameter to train")
    return out


def frozen_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=False`` (excluded from every probe's θ)."""
    return [n for n, p in model.named_parameters() if not p.requires_grad]
