"""Human units in config files: byte sizes (``256KiB``), durations (``200ms``, ``7d``) and
timestamp precisions (``ms``)."""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Precision(StrEnum):
    """Timestamp precision (of points written to a time-series database)."""

    S = "s"
    MS = "ms"
    US = "us"
    NS = "ns"


def parse_size(value: object) -> int:
    """``"256KiB"`` -> 262144; plain integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 256KiB or 1GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. 512B, 256KiB, 1GiB")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[(unit or "b").lower()])


def format_size(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"


def parse_duration(value: object) -> float:
    """``"200ms"`` -> 0.2; plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s, 5m, 1h, 7d")
    if isinstance(value, int | float):
        if not math.isfinite(value):  # YAML's .inf and .nan
            raise ValueError(f"{value!r} is not a duration; write e.g. 500ms, 30s, 5m, 1h, 7d")
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration; write e.g. 500ms, 30s, 5m, 1h, 7d")
    number, unit = match.groups()
    return float(number) * _DURATION_FACTORS[unit or "s"]


def format_duration(value: float) -> str:
    for unit in ("d", "h", "m", "s"):
        factor = _DURATION_FACTORS[unit]
        if value >= factor and float(value / factor).is_integer():
            return f"{int(value / factor)}{unit}"
    return f"{round(value * 1000)}ms"


ByteSize = Annotated[
    int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)
]
Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
