"""Import a user's factory by reference: ``"pkg.module:function"`` or ``"path/to/file.py:function"``.

The one rule every spec kind (model, data, loss) uses. A factory is imported only from the Python
environment (an importable module) or from a file path on this machine; never from an uploaded file.
Failures raise ``ValueError`` naming the spec and what is missing; the factory's own exceptions are
re-raised by :func:`call_factory` as ``ValueError`` naming the spec and the original error.

Trust: :func:`import_object` is the one place where a spec's code is imported, and it obeys the
innermost :func:`code_policy`. Outside any policy the reference was given by the user in this process (a
notebook call, a CLI flag, an app form) and is imported. Inside one (opened for the specs of a run folder
or a checkpoint file: :meth:`dynascope.models.Run.code_scope`) only the references the policy allows are
imported; any other raises :class:`UntrustedCodeError` before anything is imported or run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "absolute_ref",
    "is_factory_ref",
    "split_ref",
    "import_object",
    "call_factory",
    "ref_fingerprint",
    "UntrustedCodeError",
    "CodePolicy",
    "code_policy",
]


class UntrustedCodeError(ValueError):
    """A spec from a folder or file names code (a factory, a loss function) that was not trusted."""

    def __init__(self, ref: str, what: str, policy: CodePolicy) -> None:
        self.ref, self.what, self.origin, self.how = ref, what, policy.origin, policy.how
        super().__init__(
            f"{policy.origin} names the {what} {ref!r}, code that dynascope does not run unless you trust "
            f"it; {policy.how}"
        )

    def __reduce__(self):
        return (_untrusted_error, (self.ref, self.what, self.origin, self.how))


def _untrusted_error(ref: str, what: str, origin: str, how: str) -> UntrustedCodeError:
    return UntrustedCodeError(ref, what, CodePolicy(origin, frozenset(), how))


@dataclass(frozen=True)
class CodePolicy:
    """Which references may be imported while specs from ``origin`` are used; ``how`` says how to trust."""

    origin: str
    allowed: frozenset[str]
    how: str


_POLICY: ContextVar[CodePolicy | None] = ContextVar("dynascope_code_policy", default=None)


def _canonical_ref(ref: str) -> str:
    try:
        return absolute_ref(ref)
    except (ValueError, OSError):
        return ref


@contextmanager
def code_policy(origin: str, allowed: Iterable[str] = (), how: str = "") -> Iterator[CodePolicy]:
    """Within the block, :func:`import_object` imports only ``allowed`` references (the innermost policy
    decides); ``origin`` names where the specs came from and ``how`` tells the user how to trust them."""
    policy = CodePolicy(origin, frozenset(_canonical_ref(r) for r in allowed), how)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def check_trusted(ref: str, what: str = "factory") -> None:
    """``UntrustedCodeError`` when the current :func:`code_policy` does not allow ``ref``."""
    policy = _POLICY.get()
    if policy is not None and _canonical_ref(ref) not in policy.allowed:
        raise UntrustedCodeError(ref, what, policy)


def is_factory_ref(value: Any) -> bool:
    """Whether ``value`` looks like ``"module:attr"`` / ``"file.py:attr"`` (one colon, both sides set)."""
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    mod, attr = value.split(":")
    return bool(mod.strip()) and bool(attr.strip()) and "{" not in value


def split_ref(ref: str, what: str = "factory") -> tuple[str, str]:
    """``(module_or_file, attribute)`` of ``ref``; ``ValueError`` when it is not of that form."""
    if not is_factory_ref(ref):
        raise ValueError(f"{what} {ref!r} must be 'pkg.module:function' or 'path/to/file.py:function'")
    mod, attr = ref.split(":")
    return mod.strip(), attr.strip()


def _is_file_ref(mod: str) -> bool:
    return mod.endswith(".py") or "/" in mod or "\\" in mod


def _load_file(path: Path, what: str, ref: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{what} {ref!r}: file '{path}' does not exist")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    name = f"dynascope_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{what} {ref!r}: '{path}' cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise ValueError(f"{what} {ref!r}: importing '{path}' failed ({type(e).__name__}: {e})") from None
    return module


def _import_module(mod: str) -> Any:
    """``importlib.import_module``; a module the user named in this process (no :func:`code_policy` is
    active) that is not on ``sys.path`` is looked for in the working directory too, as ``python -m`` does
    (the ``dynascope`` command does not put it there). A folder's trusted references never are: their
    trust record hashes files, not whatever the working directory holds."""
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        top = mod.split(".")[0]
        if _POLICY.get() is not None or cwd in sys.path or e.name != top or not (
            Path(cwd, f"{top}.py").is_file() or Path(cwd, top, "__init__.py").is_file()
        ):
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(mod)
        finally:
            sys.path.remove(cwd)


def import_object(ref: str, what: str = "factory") -> Any:
    """The object named by ``ref`` (``"pkg.module:attr"``, dotted attributes allowed, or
    ``"path/file.py:attr"``). ``ValueError`` naming ``ref`` when the module, file or attribute is missing."""
    mod, attr = split_ref(ref, what)
    check_trusted(ref, what)
    if _is_file_ref(mod):
        module = _load_file(Path(mod).expanduser(), what, ref)
    else:
        try:
            module = _import_module(mod)
        except ModuleNotFoundError as e:
            raise ValueError(
                f"{what} {ref!r}: module {mod!r} is not importable ({e}); install it in this "
                "environment or give a file path 'path/to/file.py:function'"
            ) from None
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{what} {ref!r}: importing {mod!r} failed ({type(e).__name__}: {e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise ValueError(f"{what} {ref!r}: {mod!r} has no attribute {attr!r}; it has {names}")
        obj = getattr(obj, part)
    return obj


def call_factory(ref: str, kwargs: Mapping[str, Any] | None = None, what: str = "factory") -> Any:
    """``import_object(ref)(**kwargs)``; the factory's exceptions become a ``ValueError`` naming ``ref``."""
    fn = import_object(ref, what)
    if not callable(fn):
        raise ValueError(f"{what} {ref!r} is a {type(fn).__name__}, not a callable")
    try:
        return fn(**dict(kwargs or {}))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{what} {ref!r} raised {type(e).__name__}: {e}") from e


def absolute_ref(ref: str) -> str:
    """``ref`` with a file path made absolute (so a stored spec works from any working directory)."""
    mod, attr = split_ref(ref)
    if _is_file_ref(mod):
        return f"{Path(mod).expanduser().resolve()}:{attr}"
    return ref


def normalize_factory_spec(out: dict[str, Any], spec: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Check and complete a ``{"factory": ref, "kwargs": {...}}`` spec in place (``what``: "model"/"data"):
    the ref names a function, the kwargs are a JSON-able dict, and a file ref becomes absolute."""
    if not is_factory_ref(out["factory"]):
        raise ValueError(
            f"{what} spec {dict(spec)}: 'factory' must be 'pkg.module:function' or 'path/file.py:function'"
        )
    kwargs = out.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{what} spec {dict(spec)}: 'kwargs' must be a dict")
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} spec {dict(spec)}: kwargs are not JSON-able ({e})") from None
    out["kwargs"] = dict(kwargs)
    out["factory"] = absolute_ref(out["factory"])
    return out


def ref_fingerprint(ref: str) -> dict[str, Any]:
    """What identifies the factory's code for a cache key: the reference, and for a file reference the
    sha256 of the file (so an edited file changes the key). Module references are identified by name."""
    mod, _ = split_ref(ref)
    if _is_file_ref(mod):
        p = Path(mod).expanduser()
        return {
            "ref": ref,
            "file_sha256": hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None,
        }
    return {"ref": ref}


FactoryFn = Callable[..., Any]
