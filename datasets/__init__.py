"""dynascope.datasets — deterministic built-in datasets and the batching helper.

``load(name, **config)`` returns a :class:`DatasetSplit` (``.train``/``.test`` ``(x, y)``
tensors, a JSON-able ``.config`` that rebuilds it, and ``.info``). Built-in names:
``modular_arithmetic``, ``digits``, ``gaussian_mixture``, ``teacher_student``, ``xor``,
``xor_cluster``, ``polynomial`` (see :func:`available`). Nothing is downloaded.
"""

from . import algorithmic, digits, synthetic  # noqa: F401  (registers the built-in datasets)
from .batching import (
    TARGET_KEYS,
    Batch,
    BatchSource,
    Inputs,
    as_batches,
    concat_inputs,
    describe_inputs,
    input_count,
    input_tensors,
    map_inputs,
    slice_inputs,
    split_item,
)
from .factory import UntrustedCodeError, call_factory, code_policy, import_object, is_factory_ref
from .registry import DatasetSplit, available, defaults, load, register
from .specs import data_fingerprint, load_spec, normalize_data_spec

__all__ = [
    "TARGET_KEYS",
    "Inputs",
    "concat_inputs",
    "describe_inputs",
    "input_count",
    "input_tensors",
    "map_inputs",
    "slice_inputs",
    "split_item",
    "Batch",
    "BatchSource",
    "DatasetSplit",
    "as_batches",
    "call_factory",
    "code_policy",
    "UntrustedCodeError",
    "data_fingerprint",
    "import_object",
    "is_factory_ref",
    "load_spec",
    "normalize_data_spec",
    "available",
    "defaults",
    "load",
    "register",
]
