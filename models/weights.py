"""Loading a checkpoint into a model whose parameter names differ from the file's: prefixes and ties.

:func:`load_weights` reads a file with :func:`~dynascope.models.checkpoints.load_checkpoint` (safe formats,
wrapper prefixes stripped) and then fits its keys to ``model``:

1. ``key_map`` ``{old_prefix: new_prefix}`` renames keys starting with ``old_prefix`` (``""`` for all keys);
2. ``add_prefix`` prepends a prefix to every key (weights saved from an inner model, loaded into a wrapper);
3. without either, common leading components are stripped, or a prefix found in the model's own names is
   added, whichever makes more keys fit (``"auto"``; recorded in ``stripped_prefixes`` as ``"+prefix"``);
4. **tied weights**: a key the file lacks whose parameter is the *same tensor* as one it has (e.g. a language
   model's ``lm_head.weight`` tied to the input embedding, dropped by ``save_pretrained``) is filled from its
   tie; ``metadata["tied_filled"]`` says which (``{missing: source}``). Strict loading then passes.

Everything else (missing, unexpected or mis-shaped keys) raises the same
:class:`~dynascope.models.checkpoints.StateDictMismatchError` as ``load_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from .checkpoints import LoadedCheckpoint, _fit_to_model, _load_into, load_checkpoint

__all__ = ["load_weights", "tied_groups", "fit_keys"]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that share one tensor (each group has two or more names)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _rename(sd: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}


def _candidate_prefixes(sd: Mapping[str, Tensor], model_keys: set[str]) -> set[str]:
    out = set()
    for mk in model_keys:
        for k in sd:
            if mk.endswith("." + k):
                out.add(mk[: len(mk) - len(k)])
    return out


def fit_keys(
    sd: dict[str, Tensor],
    model: nn.Module,
    *,
    add_prefix: str | None = None,
    key_map: Mapping[str, str] | None = None,
) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """``(state_dict, prefix notes, {missing: tie source})``: ``sd`` renamed to fit ``model``."""
    model_keys = set(model.state_dict())
    notes: list[str] = []
    for old, new in (key_map or {}).items():
        sd = _rename(sd, old, new)
        notes.append(f"{old or '<all>'}->{new}")
    if add_prefix:
        sd = {add_prefix + k: v for k, v in sd.items()}
        notes.append("+" + add_prefix)
    elif not key_map and set(sd) != model_keys:
        stripped, more = _fit_to_model(sd, model_keys)
        best, best_notes, best_overlap = stripped, more, len(set(stripped) & model_keys)
        for prefix in sorted(_candidate_prefixes(sd, model_keys)):
            cand = {prefix + k: v for k, v in sd.items()}
            overlap = len(set(cand) & model_keys)
            if overlap > best_overlap:
                best, best_notes, best_overlap = cand, ["+" + prefix], overlap
        sd, notes = best, notes + best_notes
    filled: dict[str, str] = {}
    for group in tied_groups(model):
        present = [n for n in group if n in sd]
        if not present:
            continue
        for name in group:
            if name not in sd:
                sd[name] = sd[present[0]]
                filled[name] = present[0]
    return sd, notes, filled


def load_weights(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    add_prefix: str | None = None,
    key_map: Mapping[str, str] | None = None,
    strict: bool = True,
    allow_nonfinite: bool = False,
) -> LoadedCheckpoint:
    """Load the checkpoint ``path`` into ``model`` in place, fitting key prefixes and filling tied weights
    (module docstring). Returns the record of :func:`load_checkpoint` with ``model`` set, the prefixes in
    ``stripped_prefixes`` and ``metadata["tied_filled"]``."""
    loaded = load_checkpoint(path, allow_nonfinite=allow_nonfinite)
    sd, notes, filled = fit_keys(dict(loaded.state_dict), model, add_prefix=add_prefix, key_map=key_map)
    missing, unexpected = _load_into(model, sd, Path(path), strict)
    model.dynascope_checkpoint_hash = loaded.sha256  # probes record it in their .meta
    meta = dict(loaded.metadata)
    if filled:
        meta["tied_filled"] = filled
    return dataclasses.replace(
        loaded,
        state_dict=sd,
        metadata=meta,
        model=model,
        missing_keys=missing,
        unexpected_keys=unexpected,
        stripped_prefixes=list(loaded.stripped_prefixes) + notes,
    )
