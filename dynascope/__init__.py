"""dynascope: a training-dynamics analysis workbench for PyTorch.

``import dynascope`` is cheap: the notebook API (``dynascope.open_run``) and the subpackages load
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name -> submodule of dynascope that defines it (imported lazily)
_EXPORTS: dict[str, str] = {
    "open_run": "notebook",
    "RunView": "notebook",
    "Tracker": "tracker",
    "LightningTracker": "track_lightning",
    "HFTracker": "track_hf",
    "UntrustedCodeError": "models",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynascope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "__version__", "open_run", "RunView", "Tracker", "LightningTracker", "HFTracker", "UntrustedCodeError"
]
