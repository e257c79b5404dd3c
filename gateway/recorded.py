"""Reading recorded readings for `gateway rules replay`: JSONL or CSV, straight into columns.

A JSONL line is ``{"device", "ts", <metric>: number | bool | null, ...}`` — what
`devices simulate --record` writes and what the uplink's readings look like (``seq`` and
``gateway`` are skipped). CSV has a header with ``device``, ``ts`` and one column per
metric (empty: no value).

JSONL is decoded without Python code per line, by the first of three decoders that
vouches for a chunk of lines:

- the scan (``_scan``): compact lines that all have the first line's keys in its order (what
  the emulator records) are taken apart by array operations on the bytes: quote positions
  give keys, names and number spans; numbers are read as exact integer mantissas over a
  power of ten (so each value is the correctly rounded double, as from any JSON parser);
- the bulk decoder (``_bulk``): one orjson call for the chunk (as a JSON array), columns by
  C-level ``map``/``itemgetter`` per shape (key set) of line and one numpy conversion;
- the plain per-line decoder, for anything else (a line that is not an object, a string
  where a number belongs, blank lines, a bad ts); it is also the one that words errors
  (``file:line: problem``).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from numpy.lib.stride_tricks import sliding_window_view

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
        rest = b""  # a line begun at the end of the last block
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                if rest.strip():
                    yield decode_jsonl(rest, path, first_line)
                return
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest += block
                continue
            # Whole lines, copied once (a 4 MiB copy costs as much as a numpy pass).
            data = block if cut == len(block) and not rest else \
                b"".join((rest, memoryview(block)[:cut]))
            rest = block[cut:]
            cols, lines = _decode(data, path, first_line)
            yield cols
            first_line += data.count(b"\n") if lines is None else lines


def decode_jsonl(data: bytes, path: Path | str, first_line: int = 1) -> Columns:
    """Columns of JSONL ``data`` (whole lines): the scan, the bulk decoder, else the plain
    decoder (which words errors)."""
    return _decode(data, path, first_line)[0]


def _decode(data: bytes, path: Path | str, first_line: int) -> tuple[Columns, int | None]:
    """Columns, and the number of lines when the scan read them (one reading a line)."""
    scanned = _scan(data)
    if scanned is not None:
        return scanned, scanned.readings
    fast = _bulk(data)
    if fast is not None:
        return fast, None
    return _from_rows(_jsonl_rows(data, path, first_line)), None


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
        if bool in set(map(type, map(itemgetter("ts"), group))):
            return None  # ts true/false: the plain decoder refuses it
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
        if not math.isfinite(number):
            # As ingest, which dead-letters it (non_finite): no reading has such a value.
            raise ValueError(f"{where}: {name} = {value!r} is not a finite number")
        out[name] = number
    return out


def _head(row: dict[str, Any], where: str) -> tuple[str, float]:
    device, ts = row.get("device"), row.get("ts")
    if not isinstance(device, str) or not device:
        raise ValueError(f"{where}: needs a device")
    if isinstance(ts, bool):  # float(True) is 1.0; ingest dead-letters it (bad_timestamp)
        raise ValueError(f"{where}: ts {str(ts).lower()} is a bool, not epoch seconds")
    try:
        seconds = float(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = _rfc3339(ts, where)
    if not 0 <= seconds < _LATEST_TS:
        raise ValueError(f"{where}: ts {ts!r} is not epoch seconds (milliseconds?)")
    return device, seconds


def _rfc3339(ts: object, where: str) -> float:
    """Epoch seconds of an RFC 3339 ``ts`` with a time zone, as ingest reads it."""
    try:
        parsed = datetime.fromisoformat(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: ts {ts!r} is not epoch seconds nor RFC 3339") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{where}: ts {ts!r} has no time zone (add Z or +hh:mm)")
    return parsed.timestamp()


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
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise ValueError(f"{path}:1: column {twice[0]!r} appears twice in the header")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # DictReader's key for the cells past the header's
                raise ValueError(f"{where}: more columns than the header")
            device, ts = _head(row, where)
            yield device, ts, _metrics(row, where)


def _from_rows(rows: Iterator[_Row]) -> Columns:
    return columns_of(rows)


# -- the scan: compact lines of one layout, parsed by array operations -------------------

_Q, _COMMA, _LBRACE, _RBRACE, _MINUS, _DOT, _ZERO = (ord(c) for c in '",{}-.0')
# Longest name and number the scan takes; longer ones go to the bulk decoder.
_MAX_NAME, _MAX_NUMBER = 64, 24
# Decimal digits a number may have to be exact as an integer mantissa (< 2**53): with a
# power of ten below 10**22 both sides of ``mantissa / 10**frac`` are exact doubles and
# IEEE division rounds once, so the result is the correctly rounded value any JSON parser
# gives. Longer numbers and exponents are read one by one with ``float``.
_EXACT_DIGITS = 15
_POW10F = 10.0 ** np.arange(23)  # exact doubles
_JSON_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {b"true": 1.0, b"false": 0.0, b"null": math.nan}
_BOOL_STARTS = np.array([ord("t"), ord("f")], dtype=np.uint8)


def _scan(data: bytes) -> Columns | None:  # noqa: PLR0911 - each None is "not for me"
    """Columns of compact JSONL lines (no spaces, no escapes) that all have the first
    line's keys in its order, a string device and number/bool/null values — what
    `devices simulate --record` writes — without a Python object per line. None: not
    such a chunk; the bulk decoder takes it."""
    if not data.endswith(b"\n") or any(c in data for c in (b"\\", b" ", b"\t", b"\r")):
        return None
    try:
        head = orjson.loads(data[: data.index(b"\n")])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(head, dict) or not isinstance(head.get("device"), str) or \
            "ts" not in head or any(isinstance(v, str | list | dict)
                                    for k, v in head.items() if k != "device"):
        return None
    keys = list(head)
    buf = np.frombuffer(data, dtype=np.uint8)
    # Every 8 bytes from each offset as one little-endian integer (overlapping, unaligned).
    words = np.ndarray((buf.size,), dtype="<u8", buffer=data + bytes(8), strides=(1,))
    per_line = 2 * len(keys) + 2
    # Lines from the quotes: line i's first quote is its second byte, so it ends two bytes
    # before line i + 1's first quote. Each such end must be a newline, and every other
    # byte of a line is checked below as part of a key, a value or the punctuation
    # between them, so there is no other newline and each line holds its quotes.
    quotes = np.flatnonzero(buf == _Q)
    n = quotes.size // per_line
    if n == 0 or quotes.size != n * per_line:
        return None
    q = quotes.reshape(n, per_line)
    starts = q[:, 0] - 1
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:] - 1
    ends[-1] = buf.size - 1
    if starts[0] != 0 or (buf[ends] != ord("\n")).any() or (buf[starts] != _LBRACE).any() or \
            (buf[ends - 1] != _RBRACE).any():
        return None
    # Where each key's quotes are: the device's value takes a second pair.
    pair_of = [0]
    for key in keys[:-1]:
        pair_of.append(pair_of[-1] + (2 if key == "device" else 1))
    # Each key's bytes, closing quote and colon after its opening quote (a key has no
    # quote: no escapes), so its closing quote is the next one.
    raws = [key.encode() + b'":' for key in keys]
    k_open = q[:, [2 * p for p in pair_of]]
    if not _same_keys(words, k_open + 1, raws):
        return None
    numbers: dict[str, F64] = {}
    names: npt.NDArray[np.void] | npt.NDArray[np.uint64] | None = None
    name_at = name_len = np.zeros(0, dtype=np.int64)
    for i, key in enumerate(keys):
        pair = pair_of[i]
        last = i == len(keys) - 1
        close = k_open[:, i] + (len(raws[i]) - 1)
        if key == "device":
            v_open, v_close = q[:, 2 * pair + 2], q[:, 2 * pair + 3]
            after = buf[v_close + 1]
            if (v_open != close + 2).any() or \
                    (after != (_RBRACE if last else _COMMA)).any() or \
                    (v_close + 2 != (ends if last else k_open[:, i + 1])).any():
                return None
            name_at, name_len = v_open + 1, v_close - v_open - 1
            names = _short_names(words, name_at, name_len)
            if names is None:
                names = _names(buf, name_at, name_len)
            if names is None:
                return None
            continue
        first = close + 2
        if last:
            stop = ends - 1
        else:
            stop = k_open[:, i + 1] - 1
            if (buf[stop] != _COMMA).any():
                return None
        parsed = _numbers(data, buf, first, stop - first)
        if parsed is None or (key == "ts" and (np.isnan(parsed).any() or np.isin(
                buf[first], _BOOL_STARTS).any())):
            return None  # ts null, true or false: the plain decoder words it
        numbers[key] = parsed
    assert names is not None
    ts = numbers.pop("ts")
    for key in _NOT_METRICS & set(numbers):
        numbers.pop(key)
    if not ((ts >= 0) & (ts < _LATEST_TS)).all():
        return None
    _, first_at, inverse = np.unique(names, return_index=True, return_inverse=True)
    rank = np.argsort(first_at, kind="stable")
    code = np.empty_like(rank)
    code[rank] = np.arange(rank.size)
    try:
        devices = [data[a: a + size].decode() for a, size in zip(
            name_at[first_at[rank]].tolist(), name_len[first_at[rank]].tolist(), strict=True)]
    except UnicodeDecodeError:
        return None
    values = np.stack(list(numbers.values()), axis=1) if numbers else np.zeros((n, 0))
    width = values.shape[1]
    if np.isinf(values).any():
        return None
    present = ~np.isnan(values)
    if present.all():  # no nulls: every line has every metric
        rows, metric = np.repeat(np.arange(n), width), np.tile(np.arange(width), n)
        flat = values.ravel()
    else:
        rows = np.broadcast_to(np.arange(n)[:, None], values.shape)[present]
        metric = np.broadcast_to(np.arange(width), values.shape)[present]
        flat = values[present]
    return Columns(devices, code[inverse.ravel()], ts, list(numbers), rows.astype(np.int64),
                   metric.astype(np.int64), flat)


def _same_keys(words: npt.NDArray[np.uint64], at: I64, raws: list[bytes]) -> bool:
    """Whether ``raws[k]`` is at every offset ``at[:, k]``, compared 8 bytes at a time
    (one gather per 8 bytes of the longest key)."""
    for off in range(0, max(map(len, raws)), 8):
        cols = [k for k, raw in enumerate(raws) if len(raw) > off]
        pieces = [raws[k][off: off + 8] for k in cols]
        mask = np.array([(1 << 8 * len(p)) - 1 for p in pieces], dtype=np.uint64)
        want = np.array([int.from_bytes(p, "little") for p in pieces], dtype=np.uint64)
        got = words[(at if len(cols) == at.shape[1] else at[:, cols]) + off]
        if ((got & mask) != want).any():
            return False
    return True


_SPACES, _HIGH = 0x2020202020202020, 0x8080808080808080


def _short_names(words: npt.NDArray[np.uint64], start: I64,
                 length: I64) -> npt.NDArray[np.uint64] | None:
    """Device names of 1..8 bytes as integers (equal names, equal integers); None when
    one is longer (``_names`` takes them) or holds a control character."""
    if length.size == 0 or length.min() < 1 or length.max() > 8:
        return None
    shift = (8 * length).astype(np.uint64)
    mask = np.where(length == 8, np.uint64(2**64 - 1),
                    (np.uint64(1) << np.minimum(shift, np.uint64(63))) - np.uint64(1))
    out: npt.NDArray[np.uint64] = words[start] & mask
    # A byte below 0x20 in the name (past its end: spaces): the has-less-than bit trick.
    padded = out | (np.uint64(_SPACES) & ~mask)
    if ((padded - np.uint64(_SPACES)) & ~padded & np.uint64(_HIGH)).any():
        return None
    return out


def _names(buf: npt.NDArray[np.uint8], start: I64, length: I64) -> npt.NDArray[np.void] | None:
    """Device names as fixed-width byte strings (compared bytewise); None when empty, too
    long or holding control characters."""
    if length.size == 0 or length.min() < 1 or length.max() > _MAX_NAME:
        return None
    width = -(-int(length.max()) // 8) * 8
    if start.max() + width > buf.size:
        buf = np.r_[buf, np.zeros(width, np.uint8)]
    chars = sliding_window_view(buf, width)[start]
    inside = np.arange(width) < length[:, None]
    if (inside & (chars < 0x20)).any():
        return None
    chars[~inside] = 0
    out: npt.NDArray[np.void] = chars.view(f"V{width}").ravel()
    return out


def _numbers(data: bytes, buf: npt.NDArray[np.uint8], start: I64, length: I64) -> F64 | None:
    """JSON numbers (true/false 1/0, null NaN) at ``start``/``length``; None when one is
    not a JSON number or literal."""
    n = start.size
    if n == 0:
        return np.zeros(0)
    if length.min() < 1 or length.max() > _MAX_NUMBER:
        return None
    width = int(length.max())
    at = start  # in ``data``
    if int(start.max()) + width > buf.size:
        buf = np.r_[buf, np.zeros(width, np.uint8)]
    # Left-aligned, column-major (width x numbers) so every step is a vector operation
    # across numbers, gathered a column at a time (faster than rows of a sliding view
    # and a transpose); the bytes past a number (``inside`` is False there) count as
    # neither digit nor dot.
    chars = np.empty((width, n), dtype=np.uint8)
    for c in range(width):
        np.take(buf[c:], start, out=chars[c])
    inside = np.arange(width)[:, None] < length
    value = chars - np.uint8(_ZERO)  # 0..9 for digits (unsigned: others wrap past 9)
    digit = value < 10
    digit &= inside
    dot = chars == _DOT
    dot &= inside
    digits = np.add.reduce(digit, axis=0, dtype=np.uint8)
    dots = np.add.reduce(dot, axis=0, dtype=np.uint8)
    neg = chars[0] == _MINUS
    # The first digit (after the sign) is a digit, and a 0 only when no digit follows.
    lead = np.where(neg, digit[1], digit[0]) if width > 1 else digit[0]
    zero = np.where(neg, chars[1], chars[0]) == _ZERO if width > 1 else chars[0] == _ZERO
    second = np.where(neg, digit[2], digit[1]) if width > 2 else \
        (digit[1] & ~neg if width > 1 else np.zeros(n, dtype=bool))
    place = (dot.view(np.uint8) * np.arange(1, width + 1, dtype=np.uint8)[:, None]).max(axis=0)
    frac = np.where(place > 0, length - place.astype(np.int64), 0)
    plain = (length - digits - dots == neg) & (dots <= 1) & lead & ~(zero & second)
    plain &= (place == 0) | (frac > 0)  # no dot last
    plain &= digits <= _EXACT_DIGITS
    # The mantissa: digits in order, skipping the dot and what follows the number (x10
    # and add at a digit, x1 and add 0 elsewhere), a group of up to 4 columns at a time
    # in 16 bits (at most 9999 and 10**4), then the groups in 64 bits.
    k = min(width, _EXACT_DIGITS + 2)  # a plain number's columns: digits, dot, sign
    add = value[:k] * digit[:k]
    times = digit[:k].astype(np.uint16) * np.uint16(9) + np.uint16(1)
    x = np.zeros(n, dtype=np.int64)
    for g in range(0, k, 4):
        g_val = add[g].astype(np.uint16)
        g_times = times[g].copy()
        for c in range(g + 1, min(g + 4, k)):
            np.multiply(g_val, times[c], out=g_val)
            np.add(g_val, add[c], out=g_val)
            np.multiply(g_times, times[c], out=g_times)
        np.multiply(x, g_times, out=x)
        np.add(x, g_val, out=x)
    out = x.astype(np.float64) / _POW10F[np.minimum(frac, _POW10F.size - 1)]
    out = np.where(neg, -out, out)
    for i in np.flatnonzero(~plain).tolist():
        token = data[int(at[i]): int(at[i] + length[i])]
        literal = _LITERALS.get(token)
        if literal is not None:
            out[i] = literal
        elif _JSON_NUMBER.fullmatch(token):
            out[i] = float(token)
        else:
            return None
    return out
