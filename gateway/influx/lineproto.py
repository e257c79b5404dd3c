"""InfluxDB line protocol, encoded by hand for speed and checked against
``influxdb_client.Point`` (the oracle) by property tests in tests/test_influx_lineproto.py.

The escaping is Point's, byte for byte: measurements escape comma, space and the control
characters \\n \\t \\r; tag keys, tag values and field keys also escape ``=``; string field
values escape ``"`` and backslash. Tags are sorted by key (what InfluxDB recommends and
Point does) and a tag with an empty key or value is left out. Floats are written as Python
prints them with a trailing ``.0`` trimmed (``21.0`` -> ``21``): still a float to InfluxDB,
since integers need an ``i`` suffix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fieldkit.units import Precision

_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t",
                                     "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t",
                             "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": "\\\\"})


def timestamp(ts: float, precision: Precision) -> int:
    """Epoch seconds -> an integer timestamp at ``precision``, rounded to the nearest unit.

    The same ``ts`` always gives the same integer, so a resent point lands on the same
    timestamp (idempotent writes). A float holds epoch seconds to about a quarter of a
    microsecond, so nanoseconds are microseconds times 1000 rather than float noise.
    """
    if precision is Precision.MS:
        return round(ts * 1000)
    if precision is Precision.S:
        return round(ts)
    micros = round(ts * 1_000_000)
    return micros if precision is Precision.US else micros * 1000


def measurement(name: str) -> str:
    return name.translate(_ESCAPE_MEASUREMENT)


def key(name: str) -> str:
    """A tag key or field key."""
    return name.translate(_ESCAPE_KEY)


def tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    # Point's rule: a trailing backslash would escape the separator that follows.
    return escaped + " " if escaped.endswith("\\") else escaped


def tag_set(tags: Mapping[str, str]) -> str:
    """``,k=v,k2=v2`` sorted by key, empty keys and values left out; ``""`` for no tags."""
    parts = []
    for name, value in sorted(tags.items()):
        k, v = key(name), tag_value(value)
        if k and v:
            parts.append(f"{k}={v}")
    return "," + ",".join(parts) if parts else ""


def float_value(value: float) -> str:
    """A finite float as a field value (callers skip non-finite ones)."""
    text = str(float(value))
    return text[:-2] if text.endswith(".0") else text


def string_value(value: str) -> str:
    return '"' + value.translate(_ESCAPE_STRING) + '"'


def field_set(fields: Mapping[str, float | str]) -> str:
    """Fields sorted by key; floats (non-finite ones left out) and strings. ``""`` if none."""
    parts = []
    for name, value in sorted(fields.items()):
        if isinstance(value, str):
            parts.append(f"{key(name)}={string_value(value)}")
        elif math.isfinite(value):
            parts.append(f"{key(name)}={float_value(value)}")
    return ",".join(parts)


def line(measurement_name: str, tags: Mapping[str, str], fields: Mapping[str, float | str],
         time: int) -> str:
    """One point; ``""`` when it has no fields (InfluxDB refuses a point without fields)."""
    encoded = field_set(fields)
    if not encoded:
        return ""
    return f"{measurement(measurement_name)}{tag_set(tags)} {encoded} {time}"
