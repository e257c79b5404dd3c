"""Reading recorded readings for `gateway rules replay`: JSONL or CSV, straight into columns.

A JSONL line is ``{"device", "ts", <metric>: number | bool | null, ...}`` — what
`devices simulate --record` writes and what the uplink's readings look like (``seq`` and
``gateway`` are skipped). CSV has a header with ``device``, ``ts`` and one column per
metric (empty: no value).

JSONL is decoded without a Python loop over lines: the bytes of a chunk are scanned with
numpy (quotes, separators, key and value spans), keys and device ids become codes with
``np.unique``, numbers are parsed in one ``astype``. Anything that scan does not vouch for
(escapes, nesting, strings as values, a line that is not an object, a bad number) sends
that chunk through the plain per-line decoder, which is also the one that words errors
(``file:line: problem``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from gateway.engine.replay import Columns, columns_of

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_NOT_METRICS = frozenset({"device", "ts", "seq", "gateway"})
# Bytes decoded at once: large enough that numpy's per-call overhead vanishes, small
# enough that a month of readings never needs to fit in memory (a chunk costs ~15x this).
CHUNK_BYTES = 32 * 1024 * 1024
# Longest key or device id the vectorised scan handles; longer ones take the plain path.
_MAX_TOKEN = 64
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
    fast = _scan(data)
    if fast is not None:
        return fast
    return _from_rows(_jsonl_rows(data, path, first_line))


# -- the vectorised scan --------------------------------------------------------------


def _as_strings(buf: npt.NDArray[np.uint8], start: I64, stop: I64) -> npt.NDArray[Any] | None:
    """Byte strings ``buf[start:stop]`` as one fixed-width ``S`` array (None: too long)."""
    length = stop - start
    width = int(length.max()) if length.size else 1
    if width > _MAX_TOKEN:
        return None
    width = max(width, 1)
    cols = np.arange(width)
    idx = start[:, None] + cols
    mat = np.where(cols < length[:, None], buf[np.minimum(idx, buf.size - 1)], 0)
    return np.ascontiguousarray(mat.astype(np.uint8)).view(f"S{width}").ravel()


def _scan(data: bytes) -> Columns | None:  # noqa: PLR0911 - each return is "not for me"
    if b"\\" in data or b"[" in data:
        return None  # escapes or arrays: the plain decoder
    raw = np.frombuffer(data, dtype=np.uint8)
    quote = raw == ord('"')
    inside = (np.cumsum(quote) % 2 == 1) & ~quote  # string content
    # Drop whitespace outside strings, keep newlines as line ends.
    space = (raw == 32) | (raw == 9) | (raw == 13)
    keep = inside | quote | ~space
    if (inside & (raw == 10)).any():
        return None
    buf = raw[keep]
    inside = inside[keep]
    # gaps[i]: whitespace was removed somewhere before kept byte i (cumulative), so "1 2"
    # inside a value is caught below instead of read as 12.
    kept_at = np.flatnonzero(keep)
    gaps = np.cumsum(np.r_[False, np.diff(kept_at) > 1])
    outside = ~inside
    q = np.flatnonzero(buf == ord('"'))
    if q.size % 2:
        return None
    newline = np.flatnonzero(buf == 10)
    opens = np.flatnonzero((buf == ord("{")) & outside)
    closes = np.flatnonzero((buf == ord("}")) & outside)
    # Each non-empty line must be exactly "{...}": one brace pair, at its ends.
    line_start = np.r_[0, newline + 1]
    line_end = np.r_[newline, buf.size]  # exclusive
    nonempty = line_end > line_start
    line_start, line_end = line_start[nonempty], line_end[nonempty]
    n = line_start.size
    if n == 0 or opens.size != n or closes.size != n:
        return None
    if not (np.array_equal(opens, line_start) and np.array_equal(closes, line_end - 1)):
        return None
    colons = np.flatnonzero((buf == ord(":")) & outside)
    commas = np.flatnonzero((buf == ord(",")) & outside)
    line_of_colon = np.searchsorted(line_start, colons, side="right") - 1
    line_of_comma = np.searchsorted(line_start, commas, side="right") - 1
    per_line = np.bincount(line_of_colon, minlength=n)
    if not np.array_equal(np.bincount(line_of_comma, minlength=n) + 1, per_line):
        return None
    # A key is the string right before its colon, and right after "{" or ",".
    key_close = colons - 1
    qi = np.searchsorted(q, key_close)
    if (qi >= q.size).any() or (qi % 2 != 1).any() or not np.array_equal(q[qi], key_close):
        return None
    key_open = q[qi - 1]
    lead = buf[key_open - 1]
    if not ((lead == ord("{")) | (lead == ord(","))).all():
        return None
    # A value runs from after its colon to the next "," or "}" of its line.
    seps = np.sort(np.r_[commas, closes])
    v_start = colons + 1
    v_stop = seps[np.searchsorted(seps, v_start)]
    if (v_stop <= v_start).any() or (gaps[v_stop - 1] != gaps[v_start]).any():
        return None
    keys = _as_strings(buf, key_open + 1, key_close)
    if keys is None:
        return None
    names, key_code = np.unique(keys, return_inverse=True)
    key_names = [k.decode("utf-8") for k in names.tolist()]
    line = line_of_colon
    first = buf[v_start]
    quoted = first == ord('"')
    # Inside a value, quotes may only open and close a string value.
    quotes_in = np.searchsorted(q, v_stop) - np.searchsorted(q, v_start)
    if not np.array_equal(quotes_in, np.where(quoted, 2, 0)):
        return None
    if (quoted & (buf[v_stop - 1] != ord('"'))).any():
        return None

    def code(name: str) -> int:
        return key_names.index(name) if name in key_names else -1

    dev_code, ts_code = code("device"), code("ts")
    if dev_code < 0 or ts_code < 0:
        return None
    is_dev, is_ts = key_code == dev_code, key_code == ts_code
    if not (np.array_equal(np.bincount(line[is_dev], minlength=n), np.ones(n, np.int64))
            and np.array_equal(np.bincount(line[is_ts], minlength=n), np.ones(n, np.int64))):
        return None
    if not quoted[is_dev].all() or quoted[is_ts].any():
        return None
    dev_text = _as_strings(buf, v_start[is_dev] + 1, v_stop[is_dev] - 1)
    if dev_text is None or (v_stop[is_dev] - v_start[is_dev] <= 2).any():
        return None
    dev_names, dev_of_pair = np.unique(dev_text, return_inverse=True)
    device = np.empty(n, dtype=np.int64)
    device[line[is_dev]] = dev_of_pair
    ts = np.empty(n)
    parsed = _numbers(buf, v_start[is_ts], v_stop[is_ts])
    if parsed is None:
        return None
    ts[line[is_ts]] = parsed
    if not ((ts >= 0) & (ts < _LATEST_TS)).all():
        return None
    skipped = np.isin(key_code, [code(k) for k in _NOT_METRICS if code(k) >= 0])
    metric_pairs = ~skipped
    if quoted[metric_pairs].any():
        return None
    m_start, m_stop = v_start[metric_pairs], v_stop[metric_pairs]
    text = _as_strings(buf, m_start, m_stop)
    if text is None:
        return None
    is_null = text == b"null"
    is_true, is_false = text == b"true", text == b"false"
    number = ~(is_null | is_true | is_false)
    value = np.empty(text.size)
    value[is_true], value[is_false], value[is_null] = 1.0, 0.0, np.nan
    nums = _numbers(buf, m_start[number], m_stop[number])
    if nums is None or not np.isfinite(nums).all():
        return None
    value[number] = nums
    # Metric codes: key codes renumbered over the metric keys only.
    metric_keys = sorted(set(key_code[metric_pairs].tolist()))
    renumber = np.full(len(key_names), -1, dtype=np.int64)
    renumber[metric_keys] = np.arange(len(metric_keys))
    present = ~is_null
    return Columns(
        devices=[d.decode("utf-8") for d in dev_names.tolist()], device=device, ts=ts,
        metrics=[key_names[k] for k in metric_keys], row=line[metric_pairs][present],
        metric=renumber[key_code[metric_pairs]][present], value=value[present])


def _numbers(buf: npt.NDArray[np.uint8], start: I64, stop: I64) -> F64 | None:
    if start.size == 0:
        return np.zeros(0)
    text = _as_strings(buf, start, stop)
    if text is None:
        return None
    # JSON numbers only: digits, sign, point, exponent (numpy would also take "nan", "inf").
    chars = np.frombuffer(text.tobytes(), dtype=np.uint8)
    allowed = np.zeros(256, dtype=bool)
    allowed[list(b"0123456789+-.eE")] = True
    allowed[0] = True
    if not allowed[chars].all():
        return None
    try:
        out: F64 = text.astype(np.float64)
    except ValueError:
        return None
    return out


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
