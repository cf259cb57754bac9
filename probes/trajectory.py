"""The one input convention of the probes that follow a network over its checkpoints.

:func:`~dynascope.probes.track_sharpness`, :func:`~dynascope.probes.nc_trajectory` and
:func:`~dynascope.probes.ntk_trajectory` take their checkpoints as their first argument, in any of
these forms (:func:`checkpoint_models`):

* a run folder: a :class:`~dynascope.models.Run`, anything with ``steps()`` and ``load_model(step)``,
  or a path to a run folder — its checkpoints at ``steps`` (default: all of them, in step order;
  given steps are sorted, de-duplicated and must exist), loaded one at a time;
* an iterable of ``nn.Module`` (consumed lazily, so a generator holds one model at a time) or of state
  dicts, each loaded into one copy of ``model=`` — ``steps`` default ``0, 1, 2, …``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class Checkpoints:
    """Resolved checkpoints: ``steps`` (``None`` when they are numbered as they come), the ``run`` they
    were read from (or ``None``) and an iterator of models (a state dict arrives loaded into ``model``)."""

    steps: list[Any] | None
    run: Any | None
    models: Iterator[nn.Module]


def _is_run(source: Any) -> bool:
    return hasattr(source, "steps") and hasattr(source, "load_model")


def _run_steps(run: Any, steps: Sequence[int] | None) -> list[int]:
    available = list(run.steps())
    if not available:
        raise ValueError(f"run {getattr(run, 'path', run)} has no checkpoints")
    if steps is None:
        return available
    have = set(available)
    missing = [s for s in steps if s not in have]
    if missing:
        where = getattr(run, "path", run)
        raise ValueError(f"run {where} has no checkpoints at steps {missing}; it has {sorted(available)}")
    return sorted(set(steps))


def _loaded(items: Iterable[Any], model: nn.Module | None) -> Iterator[nn.Module]:
    holder: nn.Module | None = None
    for i, c in enumerate(items):
        if isinstance(c, nn.Module):
            yield c
            continue
        if holder is None:
            holder = copy.deepcopy(model) if model is not None else None
        assert holder is not None  # checked up front for sequences, here for lazy iterables
        try:
            holder.load_state_dict(c)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {i} does not fit model: {err}") from None
        yield holder


def _check_item(i: int, c: Any, model: nn.Module | None) -> None:
    if isinstance(c, nn.Module):
        return
    if isinstance(c, Mapping):
        if model is None:
            raise ValueError(f"checkpoint {i} is a state dict: pass model= (an architecture to load it into)")
        return
    raise TypeError(f"checkpoint {i} must be an nn.Module or a state dict; got {type(c).__name__}")


def _checked(items: Iterable[Any], model: nn.Module | None) -> Iterator[Any]:
    for i, c in enumerate(items):
        _check_item(i, c, model)
        yield c


def checkpoint_models(
    source: Any,
    steps: Sequence[Any] | None = None,
    *,
    model: nn.Module | None = None,
    name: str = "checkpoints",
) -> Checkpoints:
    """Resolve a trajectory probe's checkpoints (see the module docstring for the accepted forms).

    A sequence of models / state dicts is checked in full before anything is computed; a lazy iterable
    item by item. A path must be a run folder (``RunError`` otherwise). ``name``: the argument's name in
    error messages.
    """
    if isinstance(source, (str, os.PathLike)):
        from ..models.runs import Run

        source = Run.open(source)
    if _is_run(source):
        chosen = _run_steps(source, steps)
        run = source
        return Checkpoints(steps=chosen, run=run, models=(run.load_model(s) for s in chosen))
    if isinstance(source, (nn.Module, Mapping)) or not isinstance(source, Iterable):
        raise TypeError(
            f"{name} must be a Run, a path to a run folder, or an iterable of models or state dicts; "
            f"got {type(source).__name__}"
        )
    if isinstance(source, Sequence):
        for i, c in enumerate(source):
            _check_item(i, c, model)
        items: Iterable[Any] = source
    else:
        items = _checked(source, model)
    return Checkpoints(
        steps=list(steps) if steps is not None else None, run=None, models=_loaded(items, model)
    )


__all__ = ["Checkpoints", "checkpoint_models"]
