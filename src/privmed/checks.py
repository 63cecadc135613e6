"""The two checks every settings object makes of a number: a whole number, and a positive
finite one (a bool is neither: ``True`` is not a batch size). No imports beyond the
standard library: the federation's shared vocabulary uses them too."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def is_whole(value: Any, minimum: int | None = None) -> bool:
    """``value`` is an int (numpy's included, bool excluded), at least ``minimum``."""
    return (isinstance(value, Integral) and not isinstance(value, bool)
            and (minimum is None or value >= minimum))


def is_positive(value: Any) -> bool:
    """``value`` is a finite real number above 0 (bool excluded)."""
    return (isinstance(value, Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
