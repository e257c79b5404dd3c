"""Reading recorded readings for `gateway rules replay`: JSONL or CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from gateway.ingest.decode import Reading

_NOT_METRICS = {"device", "ts", "seq", "gateway"}


def read_recorded(path: Path) -> Iterator[Reading]:
    """Readings in file order. JSONL lines are ``{"device", "ts", <metric>: number, ...}``
    (what `devices simulate --record` writes, and what the uplink's readings look like);
    CSV has a header with ``device``, ``ts`` and one column per metric (empty: no value)."""
    if path.suffix.lower() == ".csv":
        yield from _csv(path)
    else:
        yield from _jsonl(path)


def _metrics(row: dict[str, Any], where: str) -> dict[str, float]:
    out = {}
    for name, value in row.items():
        if name in _NOT_METRICS or value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} = {value!r} is not a number") from None
        if math.isfinite(number):
            out[name] = number
    return out


def _head(row: dict[str, Any], where: str) -> tuple[str, float]:
    device, ts = row.get("device"), row.get("ts")
    if not isinstance(device, str) or not device:
        raise ValueError(f"{where}: needs a device")
    try:
        seconds = float(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: ts {ts!r} is not epoch seconds") from None
    if not 0 <= seconds < 1e11:
        raise ValueError(f"{where}: ts {ts!r} is not epoch seconds (milliseconds?)")
    return device, seconds


def _jsonl(path: Path) -> Iterator[Reading]:
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise ValueError(f"{where}: not JSON") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object")
            device, ts = _head(row, where)
            yield device, ts, _metrics(row, where)


def _csv(path: Path) -> Iterator[Reading]:
    with path.open(newline="", encoding="utf-8") as fh:
        for number, row in enumerate(csv.DictReader(fh), 2):
            where = f"{path}:{number}"
            device, ts = _head(row, where)
            yield device, ts, _metrics(row, where)
