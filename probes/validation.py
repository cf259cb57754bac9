"""Argument checks shared by every probe: one place that says what a bad integer, number or choice is.

Each check returns the value (an ``int`` / ``float`` / the choice) or raises a ``ValueError`` that names
the argument, what was expected and what was given, e.g. ``k must be a positive integer; got 0``.
Python and NumPy integers count as integers, any real (``numbers.Real``) as a number; ``bool`` is never
accepted as a number (``True`` is an ``int`` in Python, but ``k=True`` is a mistake).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def _bounds(lo: float | None, hi: float | None, *, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def check_int(
    name: str, value: Any, *, min: int | None = None, max: int | None = None, optional: bool = False
) -> Any:
    """``value`` as an ``int`` in ``[min, max]`` (``None`` passes when ``optional``)."""
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and (min is None or value >= min) and (max is None or value <= max):
        return int(value)
    if max is None and min in (0, 1):
        what = "a positive integer" if min == 1 else "a non-negative integer"
    else:
        what = f"an integer{_bounds(min, max)}"
    what += " or None" if optional else ""
    raise ValueError(f"{name} must be {what}; got {value!r}")


def check_float(
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    optional: bool = False,
) -> Any:
    """``value`` as a finite ``float`` in ``[min, max]`` (``(min, max]`` with ``min_open``; ``None`` passes
    when ``optional``). ``check_float("lr", lr, min=0, min_open=True)``: a positive number."""
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        above = min is None or (v > min if min_open else v >= min)
        if above and (max is None or v <= max):
            return v
    if min == 0 and max is None:
        what = "a positive number" if min_open else "a non-negative number"
    else:
        what = f"a finite number{_bounds(min, max, lo_open=min_open)}"
    raise ValueError(f"{name} must be {what}{' or None' if optional else ''}; got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[T]) -> T:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    for c in options:
        if value is c or (type(value) is type(c) and value == c):
            return c
    raise ValueError(f"{name} must be one of {options}; got {value!r}")


__all__ = ["check_choice", "check_float", "check_int"]
