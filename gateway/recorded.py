"""Reading recorded readings for `gateway rules replay`: JSONL or CSV, straight into columns.

A JSONL line is ``{"device", "ts", <metric>: number | bool | null, ...}`` — what
`devices simulate --record` writes and what the uplink's readings look like (``seq`` and
``gateway`` are skipped). CSV has a header with ``device``, ``ts`` and one column per
metric (empty: no value).

JSONL is decoded without Python code per line: a chunk of lines is one orjson call (as a
JSON array), and columns come out of it by C-level ``map``/``itemgetter`` per shape (key
set) of line and one numpy conversion. Anything the bulk decoder does not vouch for (a
line that is not an object, a string where a number belongs, blank lines, a bad ts) sends
that chunk through the plain per-line decoder, which is also the one that words errors
(``file:line: problem``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from gateway.engine.replay import Columns, columns_of

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_NOT_METRICS = frozenset({"device", "ts", "seq", "gateway"})
# Bytes decoded at once: large enough that per-chunk overhead vanishes (~60k readings),
# small enough that a month of readings never needs to fit in memory (a chunk's Python
# objects cost ~20x its bytes while it is decoded).
CHUNK_BYTES = 4 * 1024 * 1024
# Distinct key sets (shapes of line) a chunk may have for the bulk decoder; a recording
# has a handful (one per device type), and each costs a pass over the chunk.
_MAX_SHAPES = 64
_LATEST_TS = 1e11  # epoch seconds until the year 5138; larger is milliseconds


def read_columns(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Columns]:
    """Columns of ``path`` in file order, a chunk at a time; ValueError ``file:line: ...``
    for a line that is not a reading."""
    if path.suffix.lower() == ".csv":
        yield _from_rows(_csv(path))
        return
    first_line = 1
    with path.open("rb") as fh:
        rest = b""
        while True:
            block = fh.read(chunk_bytes)
            data = rest + block
            if not block:
                if data.strip():
                    yield decode_jsonl(data, path, first_line)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            yield decode_jsonl(data, path, first_line)
            first_line += data.count(b"\n")


def decode_jsonl(data: bytes, path: Path | str, first_line: int = 1) -> Columns:
    """Columns of JSONL ``data`` (whole lines); the fast scan, else the plain decoder."""
    fast = _bulk(data)
    if fast is not None:
        return fast
    return _from_rows(_jsonl_rows(data, path, first_line))


# -- the bulk decoder ---------------------------------------------------------------------


def _bulk(data: bytes) -> Columns | None:  # noqa: PLR0911 - each None is "not for me"
    """One orjson call for the whole chunk, then columns by C-level ``map``/``itemgetter``
    per shape (key set) of line: no Python code runs per reading. None: let the plain
    decoder handle (and word) whatever this does not vouch for."""
    body = data.strip()
    if not body or b"\n\n" in body.replace(b"\r", b""):
        return None  # empty or blank lines: the plain decoder skips them
    try:
        rows = orjson.loads(b"[" + body.replace(b"\n", b",") + b"]")
    except orjson.JSONDecodeError:
        return None
    if set(map(type, rows)) != {dict}:
        return None
    keys_of = list(map(tuple, rows))
    shapes = {keys: k for k, keys in enumerate(dict.fromkeys(keys_of))}
    if len(shapes) > _MAX_SHAPES:
        return None
    shape_of = np.fromiter(map(shapes.__getitem__, keys_of), dtype=np.int64,
                           count=len(rows))
    n = len(rows)
    devices: dict[str, int] = {}
    metrics: dict[str, int] = {}
    device = np.empty(n, dtype=np.int64)
    ts = np.empty(n)
    parts: list[tuple[I64, I64, F64]] = []
    for keys, k in shapes.items():
        if "device" not in keys or "ts" not in keys:
            return None
        idx = np.flatnonzero(shape_of == k)
        group = rows if idx.size == n else list(itemgetter(*idx.tolist())(rows)) \
            if idx.size > 1 else [rows[int(idx[0])]]
        names = list(map(itemgetter("device"), group))
        if set(map(type, names)) != {str}:
            return None
        for name in dict.fromkeys(names):
            if not name:
                return None
            devices.setdefault(name, len(devices))
        device[idx] = np.fromiter(map(devices.__getitem__, names), dtype=np.int64,
                                  count=idx.size)
        wanted = [key for key in keys if key not in _NOT_METRICS]
        try:
            table = np.array(list(map(itemgetter("ts", *wanted), group)), dtype=np.float64)
        except (TypeError, ValueError):
            return None  # a string, list or object where a number belongs
        table = table.reshape(idx.size, 1 + len(wanted))
        ts[idx] = table[:, 0]
        codes = np.array([metrics.setdefault(key, len(metrics)) for key in wanted],
                         dtype=np.int64)
        values = table[:, 1:]
        present = ~np.isnan(values)  # null: no value
        rows_of = np.broadcast_to(idx[:, None], values.shape)
        parts.append((rows_of[present], np.broadcast_to(codes, values.shape)[present],
                      values[present]))
    if not ((ts >= 0) & (ts < _LATEST_TS)).all():
        return None
    row = np.concatenate([p[0] for p in parts])
    order = np.argsort(row, kind="stable")
    value = np.concatenate([p[2] for p in parts])[order]
    if not np.isfinite(value).all():
        return None
    return Columns(list(devices), device, ts, list(metrics), row[order],
                   np.concatenate([p[1] for p in parts])[order], value)


# -- the plain decoder (and the one that words errors) -----------------------------------

_Row = tuple[str, float, dict[str, float]]


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
    if not 0 <= seconds < _LATEST_TS:
        raise ValueError(f"{where}: ts {ts!r} is not epoch seconds (milliseconds?)")
    return device, seconds


def _jsonl_rows(data: bytes, path: Path | str, first_line: int) -> Iterator[_Row]:
    for number, line in enumerate(data.split(b"\n"), first_line):
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


def _csv(path: Path) -> Iterator[_Row]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for number, row in enumerate(csv.DictReader(fh), 2):
            where = f"{path}:{number}"
            device, ts = _head(row, where)
            yield device, ts, _metrics(row, where)


def _from_rows(rows: Iterator[_Row]) -> Columns:
    return columns_of(rows)
