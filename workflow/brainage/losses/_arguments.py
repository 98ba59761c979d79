"""Argument checks shared by the losses and Algorithm 1's schedule. Plain Python: config
validation runs the schedule's checks at every Snakemake start, without PyTorch."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_positive_float(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise ValueError unless it is finite and > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise ValueError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value``, or raise ValueError unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)
