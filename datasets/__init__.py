"""dynascope.datasets — deterministic built-in datasets and the batching helper.

``load(name, **config)`` returns a :class:`DatasetSplit` (``.train``/``.test`` ``(x, y)``
tensors, a JSON-able ``.config`` that rebuilds it, and ``.info``). Built-in names:
``modular_arithmetic``, ``digits``, ``gaussian_mixture``, ``teacher_student``, ``xor``,
``polynomial`` (see :func:`available`). Nothing is downloaded.
"""

from . import algorithmic, digits, synthetic  # noqa: F401  (registers the built-in datasets)
from .batching import Batch, BatchSource, as_batches
from .registry import DatasetSplit, available, defaults, load, register

__all__ = [
    "Batch",
    "BatchSource",
    "DatasetSplit",
    "as_batches",
    "available",
    "defaults",
    "load",
    "register",
]
