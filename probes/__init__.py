"""dynascope.probes — matrix-free probes of a network's loss landscape and function space.

Public names are loaded lazily from the submodule that defines them (``_EXPORTS``), so
``import dynascope.probes as probes`` is cheap and each probe family lives in its own module.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of dynascope.probes that defines it
_EXPORTS: dict[str, str] = {
    # curvature engine
    "LinearOperator": "operators",
    "DenseOperator": "operators",
    "CurvatureOperator": "operators",
    "ParamSpace": "operators",
    "make_operator": "operators",
    "parameter_groups": "operators",
    "select_parameters": "operators",
    "eigsh": "lanczos",
    "lanczos_tridiagonal": "lanczos",
    "Loss": "losses",
    "resolve_loss": "losses",
    "Result": "results",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynascope.probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
