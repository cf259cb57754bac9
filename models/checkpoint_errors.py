"""The errors of checkpoint I/O: :class:`CheckpointError` (a ``ValueError``) and one subclass per reason.

Every error names the file (``.path``) and says what went wrong (``.kind``, ``.detail``).
"""

from __future__ import annotations

import os

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "EmptyCheckpointError",
    "CorruptCheckpointError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
    "NoStateDictError",
    "StateDictMismatchError",
    "NonFiniteWeightsError",
    "UnsupportedTensorError",
    "CheckpointMetadataError",
]


class CheckpointError(ValueError):
    """A checkpoint could not be saved or loaded; ``.path`` is the file, ``.kind`` the reason."""

    kind = "error"

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"checkpoint '{self.path}': {detail}")

    def __reduce__(self):  # keep picklable (multiprocessing) despite the custom signature
        return (self.__class__, (self.path, self.detail))


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    kind = "not_found"


class EmptyCheckpointError(CheckpointError):
    kind = "empty"


class CorruptCheckpointError(CheckpointError):
    """Truncated or damaged file of a recognised format, or garbage under a checkpoint suffix."""

    kind = "corrupt"


class UnknownFormatError(CheckpointError):
    kind = "unknown_format"


class UnsafeCheckpointError(CheckpointError):
    """The file needs unpickling code outside the ``weights_only`` allowlist; ``.globals`` names it."""

    kind = "unsafe"

    def __init__(self, path: str | os.PathLike[str], detail: str, globals_: list[str] | None = None) -> None:
        self.globals = list(globals_ or [])
        super().__init__(path, detail)

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail, self.globals))


class NoStateDictError(CheckpointError):
    kind = "no_state_dict"


class StateDictMismatchError(CheckpointError):
    """Keys do not fit the model.

    ``.missing``/``.unexpected``: key names; ``.mismatched``: (name, checkpoint shape, model shape).
    """

    kind = "mismatch"

    def __init__(
        self,
        path: str | os.PathLike[str],
        detail: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        super().__init__(path, detail)

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail, self.missing, self.unexpected, self.mismatched))


class NonFiniteWeightsError(CheckpointError):
    """Some floating tensors contain NaN/Inf; ``.tensors`` lists their names."""

    kind = "nonfinite"

    def __init__(self, path: str | os.PathLike[str], detail: str, tensors: list[str] | None = None) -> None:
        self.tensors = list(tensors or [])
        super().__init__(path, detail)

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail, self.tensors))


class UnsupportedTensorError(CheckpointError):
    """Sparse, meta-device, quantized or otherwise non-strided tensors: refused before they are read."""

    kind = "unsupported_tensor"


class CheckpointMetadataError(CheckpointError):
    """Metadata that cannot be right (a step or epoch that is NaN, negative, fractional or >= 2**63)."""

    kind = "metadata"


def short(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line, at most 300 characters of message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")
