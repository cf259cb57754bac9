"""Dataset registry: ``load(name, **config) -> DatasetSplit``.

A dataset *builder* is a function with keyword-only parameters, each with a default, that
returns ``(train, test, info)`` where ``train``/``test`` are ``(x, y)`` tensor pairs.
:func:`register` records it under a name; :func:`load` resolves the parameters (defaults
overridden by the caller), validates them, calls the builder and returns a frozen
:class:`DatasetSplit` whose ``config`` (``{"name": ..., **resolved parameters}``) is JSON-able
and rebuilds identical tensors: ``load(**split.config)``.

Builders must be deterministic functions of their parameters (``seed`` included) and use
only local random generators (``torch.Generator`` / ``numpy.random.Generator``), never the
global RNG state.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .batching import BatchSource

Pair = tuple[torch.Tensor, torch.Tensor]
Builder = Callable[..., tuple[Pair, Pair, dict[str, Any]]]

_REGISTRY: dict[str, Builder] = {}


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """A built dataset.

    Attributes
    ----------
    train, test:
        ``(x, y)`` tensors. Floating tensors are float32, class labels int64.
    config:
        ``{"name": ..., **every resolved parameter incl. seed}``; JSON-able;
        ``load(**config)`` rebuilds identical tensors.
    info:
        JSON-able facts: ``task`` ("classification" / "regression"), ``input_shape`` (per
        sample), ``n_classes`` (classification) or ``out_dim`` (regression), ``n_train``,
        ``n_test`` and dataset-specific entries (e.g. ``noisy_indices``).
    """

    train: Pair
    test: Pair
    config: dict[str, Any]
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.config["name"])

    def batches(self, split: str = "train", batch_size: int | None = None, **kwargs: Any) -> BatchSource:
        """A :class:`~dynascope.datasets.batching.BatchSource` over the ``train`` or ``test`` split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return BatchSource(getattr(self, split), batch_size, **kwargs)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")
        shapes = f"train={tuple(self.train[0].shape)}, test={tuple(self.test[0].shape)}"
        return f"DatasetSplit({self.name}: {shapes}; {params})"


def register(name: str, builder: Builder | None = None, *, overwrite: bool = False) -> Any:
    """Register ``builder`` under ``name``; usable as ``@register("name")``.

    Every parameter of the builder must be keyword-only with a JSON-able default.
    Re-registering an existing name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def decorate(fn: Builder) -> Builder:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
            raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise ValueError(
                    f"dataset builder {fn.__name__!r}: parameter {p.name!r} "
                    "must be keyword-only with a default"
                )
            if p.name == "name":
                raise ValueError(f"dataset builder {fn.__name__!r}: 'name' is reserved")
        _REGISTRY[name] = fn
        return fn

    return decorate(builder) if builder is not None else decorate


def available() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(_REGISTRY)


def defaults(name: str) -> dict[str, Any]:
    """Default parameters of dataset ``name``."""
    fn = _lookup(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()}


def _lookup(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def _jsonable(value: Any) -> Any:
    """Tuples -> lists (recursively) so that the config survives a JSON round-trip unchanged."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def load(name: str, **config: Any) -> DatasetSplit:
    """Build dataset ``name`` with ``config`` overriding its defaults (see :func:`available`).

    Raises ``ValueError`` for an unknown name, an unknown parameter (listing the valid ones)
    or an invalid value.
    """
    fn = _lookup(name)
    resolved = defaults(name)
    unknown = sorted(set(config) - set(resolved))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; "
            f"valid parameters: {', '.join(sorted(resolved))}"
        )
    resolved.update({k: _jsonable(v) for k, v in config.items()})
    for key, value in resolved.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"dataset {name!r}: parameter {key}={value!r} is not a finite JSON-able value ({err})"
            ) from None
    train, test, info = fn(**resolved)
    info = {
        "n_train": int(train[0].shape[0]),
        "n_test": int(test[0].shape[0]),
        "input_shape": list(train[0].shape[1:]),
        **info,
    }
    return DatasetSplit(train=train, test=test, config={"name": name, **resolved}, info=info)


# ---------------------------------------------------------------- parameter validation helpers
def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; bools and non-integral values are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval ``[low, high]`` (ends optionally open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (ValueError listing them otherwise)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_seed(value: Any) -> int:
    return check_int("seed", value, low=0, high=2**63 - 1)


def torch_generator(seed: int) -> torch.Generator:
    """A local CPU generator (the global RNG is never touched)."""
    return torch.Generator().manual_seed(seed)


def exact_subset(n: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``round(fraction * n)`` distinct samples of ``range(n)``."""
    k = int(round(fraction * n))
    return torch.randperm(n, generator=gen)[:k].sort().values
