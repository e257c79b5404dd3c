"""Decoding site payloads into readings; everything else becomes a dead letter with a reason.

A message is accepted or rejected whole: an array with one bad reading goes to the
dead-letter table as it arrived, so that `gateway log replay` can send it again after a fix.

Decisions (README.md, "What goes in and out"):

- Booleans are numbers from here on: ``true`` is 1 and ``false`` is 0, as JSON in an object
  and as a bare value on a number topic, so the log, the rules, the uplink and InfluxDB all
  see one type per metric.
- A UTF-8 byte order mark before valid JSON is dropped; the payload is accepted.
- A key twice in one object is a ``duplicate_key`` dead letter: which value the device
  meant cannot be known, and JSON parsers disagree on which one wins.
- Device ids (from the topic) are at most ``ingest.max_device_id`` characters of ASCII
  letters, digits and ``_ . - : @ ~``, and not ``.`` or ``..`` alone (``bad_device``
  otherwise): they become topic levels of commands, InfluxDB tags and broker user names.
  ``valid_device_id`` is the one rule; ``gateway site add-device`` applies it too.
- While the system clock is not synchronised (``gateway.clock``), device timestamps are
  kept as sent and every reading is marked ``clock_unsynced: 1``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

import orjson

from gateway.clock import NOT_AFTER, NOT_BEFORE, ClockState
from gateway.config import Ingest, PayloadFormat
from gateway.ingest.topics import TopicMatch, TopicTemplates
from gateway.records import DeadLetter, Reading, Reason

__all__ = ["CLOCK_FLAG", "DeadLetter", "Decoder", "Reading", "Reason", "duplicate_key",
           "valid_device_id"]

# Added to every reading decoded while the system clock was not synchronised.
CLOCK_FLAG = "clock_unsynced"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
# ASCII only: Unicode letters and digits would let a fullwidth "d1" pass for "d1".
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.:@~-]+")
_RESERVED = frozenset({"seq", "device", "ts", "gateway", CLOCK_FLAG})
# Metric names and device ids seen and found valid; bounded like the topic cache.
_NAMES_MAX = 16_384
_BOM = b"\xef\xbb\xbf"
# Every key in a JSON text ends with a quote followed by a colon; strings can add more
# matches (they only cost an exact check), so fewer matches than keys never happens.
_KEY_END = re.compile(rb'"[ \t\n\r]*:')
# The clock's state is asked at most this often (seconds); it rechecks the kernel itself.
_CLOCK_RECHECK = 1.0


# Readings without ts that arrive together get receive times on distinct milliseconds
# (1/_RX_MS s), the InfluxDB sink's default precision (a coarser influx.precision can still
# merge them).
_RX_MS = 1000
# Devices whose last receive time is remembered; past this the memory starts again.
_RX_DEVICES = 100_000


class _Reject(Exception):  # noqa: N818 - internal control flow, never escapes this module
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


class Decoder:
    """Turns (topic, payload) into readings, or a DeadLetter saying why not."""

    def __init__(self, cfg: Ingest, topics: TopicTemplates, *,
                 clock: ClockState | None = None) -> None:
        """``clock`` says whether ``now`` can be trusted; default: per ingest.clock_check."""
        self._cfg = cfg
        self._topics = topics
        self._clock = clock if clock is not None else ClockState(cfg.clock_check)
        self._names: set[str] = set()
        self._devices: set[str] = set()
        self._unsynced = False
        self._clock_from = float("-inf")
        # The receive time last given to each device's readings without ts: the clock is
        # read once per wake-up, and a backlog arrives in one, so each such reading gets at
        # least a millisecond after the device's previous one (in order, none overwriting
        # another in InfluxDB or counted as a duplicate by the rules); kept in whole ms.
        self._rx_last: dict[str, int] = {}

    def decode(self, topic: str, payload: bytes, now: float) -> list[Reading] | DeadLetter:
        match = self._topics.match(topic)
        if match is None:
            return DeadLetter(Reason.UNKNOWN_TOPIC, f"topic {topic[:200]!r} matches no template")
        if match.device not in self._devices:
            problem = self._check_device(match.device)
            if problem:
                return DeadLetter(Reason.BAD_DEVICE, problem)
        if len(payload) > self._cfg.max_payload:
            return DeadLetter(
                Reason.TOO_LARGE, f"{len(payload)} bytes > max_payload {self._cfg.max_payload}"
            )
        if not self._clock_from <= now < self._clock_from + _CLOCK_RECHECK:
            self._clock_from = now
            self._unsynced = not self._clock.check(now)
        try:
            out = self._decode(match, payload, now)
        except _Reject as rej:
            return DeadLetter(rej.reason, rej.detail)
        if self._unsynced:
            for reading in out:
                reading[2][CLOCK_FLAG] = 1
        return out

    def _check_device(self, device: str) -> str:
        """Empty when ``device`` is a usable id (and remembered), else what is wrong."""
        problem = valid_device_id(device, self._cfg.max_device_id)
        if problem is not None:
            return problem
        if len(self._devices) >= _NAMES_MAX:
            self._devices.clear()
        self._devices.add(device)
        return ""

    def _decode(self, match: TopicMatch, payload: bytes, now: float) -> list[Reading]:
        value = _loads(payload)
        if match.format is PayloadFormat.NUMBER:
            assert match.metric is not None
            self._check_name(match.metric)
            _check_value(match.metric, value)
            if type(value) is bool:
                value = int(value)
            return [(match.device, self._received(match.device, now), {match.metric: value})]
        if isinstance(value, dict):
            keys = len(value)
            out = [self._reading(match.device, value, now, -1)]
            _check_unique_keys(payload, keys)
            return out
        if isinstance(value, list):
            if not value:
                raise _Reject(Reason.BAD_SHAPE, "empty array")
            if len(value) > self._cfg.max_readings:
                raise _Reject(
                    Reason.TOO_MANY_READINGS,
                    f"{len(value)} readings > max_readings {self._cfg.max_readings}",
                )
            out = []
            reading = self._reading
            device = match.device
            keys = 0
            for i, item in enumerate(value):
                if type(item) is not dict:
                    raise _Reject(Reason.BAD_SHAPE, f"reading {i} is {_kind(item)}, not an object")
                keys += len(item)
                out.append(reading(device, item, now, i))
            _check_unique_keys(payload, keys)
            return out
        raise _Reject(Reason.BAD_SHAPE, f"payload is {_kind(value)}, not an object or array")

    def _received(self, device: str, now: float) -> float:
        """The receive time for a reading without ts: ``now``, or just after the device's
        previous one when that is not earlier."""
        # On whole milliseconds (the precision points are written at, rounded): the sum
        # last + 1 ms drifts in float and at x.5 ms two such times rounded alike, one
        # reading overwriting the other in InfluxDB.
        last = self._rx_last.get(device)
        now_ms = round(now * _RX_MS)
        if last is None or now_ms > last:
            ts, ms = now, now_ms
        else:
            ms = last + 1
            ts = ms / _RX_MS
        if len(self._rx_last) >= _RX_DEVICES and last is None:
            self._rx_last.clear()
        self._rx_last[device] = ms
        return ts

    def _reading(self, device: str, obj: dict[str, Any], now: float, index: int) -> Reading:
        """One reading object; ``index`` is its place in an array (-1: a lone object).

        This runs once per reading, so the common case is written out flat: numeric ts,
        known metric names, int/float/bool values. Anything else takes the slow checks.
        """
        ts_raw = obj.pop("ts", None)
        if ts_raw is None:
            ts = self._received(device, now)
        elif type(ts_raw) is float or type(ts_raw) is int:
            ts = float(ts_raw)
            if not (now - self._cfg.max_past <= ts <= now + self._cfg.max_future):
                ts = self._timestamp(ts_raw, now, _where(index))
        else:
            ts = self._timestamp(ts_raw, now, _where(index))
        if not obj:
            raise _Reject(Reason.NO_METRICS, f"{_where(index)}no metrics besides ts")
        if len(obj) > self._cfg.max_metrics:
            raise _Reject(
                Reason.TOO_MANY_METRICS,
                f"{_where(index)}{len(obj)} metrics > max_metrics {self._cfg.max_metrics}",
            )
        names = self._names
        for name, value in obj.items():
            if name not in names:
                self._check_name(name, _where(index))
            kind = type(value)
            if kind is float:
                if not math.isfinite(value):
                    _check_value(name, value, _where(index))
            elif kind is bool:
                obj[name] = 1 if value else 0  # replaces a value: safe while iterating
            elif kind is not int:
                _check_value(name, value, _where(index))
        return (device, ts, obj)

    def _check_name(self, name: str, where: str = "") -> None:
        if name in _RESERVED or not _NAME_RE.match(name):
            raise _Reject(
                Reason.BAD_NAME,
                f"{where}metric name {name[:80]!r} is reserved or not of the form "
                "[A-Za-z_][A-Za-z0-9_.-]* (at most 64 characters)",
            )
        if len(self._names) >= _NAMES_MAX:
            self._names.clear()
        self._names.add(name)

    def _timestamp(self, raw: object, now: float, where: str) -> float:
        if isinstance(raw, bool):
            raise _Reject(Reason.BAD_TIMESTAMP, f"{where}ts is a bool")
        if isinstance(raw, int | float):
            ts = float(raw)
        elif isinstance(raw, str):
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                raise _Reject(Reason.BAD_TIMESTAMP, f"{where}ts {raw[:40]!r} is not RFC 3339") \
                    from None
            if parsed.tzinfo is None:
                raise _Reject(Reason.BAD_TIMESTAMP, f"{where}ts {raw[:40]!r} has no time zone")
            ts = parsed.timestamp()
        else:
            raise _Reject(Reason.BAD_TIMESTAMP, f"{where}ts is {_kind(raw)}")
        if now - self._cfg.max_past <= ts <= now + self._cfg.max_future:
            return ts
        if self._unsynced and NOT_BEFORE - self._cfg.max_past <= ts <= NOT_AFTER:
            # Our clock is the one in doubt: keep the device's time (the reading is flagged).
            return ts
        raise _Reject(
            Reason.TS_OUT_OF_RANGE,
            f"{where}ts {ts!r} is more than max_past before or max_future after now",
        )


def valid_device_id(device: str, max_len: int) -> str | None:
    """What is wrong with ``device`` as a device id (one line), or None when it is usable.

    The one rule for device ids, in ingest, `gateway site add-device`, rules and
    commands: 1 to ``max_len`` (``ingest.max_device_id``) characters of ASCII letters,
    digits and ``_ . - : @ ~``, and not ``.`` or ``..`` alone.
    """
    if len(device) > max_len:
        return (f"device id {device[:40]!r}... has {len(device)} characters, more than "
                f"ingest.max_device_id {max_len}")
    if not device:
        return "device id is empty"
    if not _DEVICE_RE.fullmatch(device):
        return (f"device id {device!r} has characters other than ASCII letters, digits and "
                "_ . - : @ ~")
    if device in (".", ".."):
        return f"device id {device!r} is a path name; use letters or digits too"
    return None


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        error = err
    if payload.startswith(_BOM):
        payload = payload[len(_BOM):]
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as err:
            error = err
    # orjson refuses NaN and Infinity; tell those apart from broken JSON for the operator.
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Reject(Reason.BAD_JSON, f"not UTF-8 ({err.reason} at byte {err.start})") \
            from None
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return 0.0

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):  # 1e999
            constants.append(literal)
        return value

    try:
        json.loads(text, parse_constant=constant, parse_float=number)
    except (ValueError, RecursionError):
        raise _Reject(Reason.BAD_JSON, f"not JSON: {error}") from None
    if constants:
        raise _Reject(Reason.NON_FINITE, f"payload contains {constants[0]}")
    raise _Reject(Reason.BAD_JSON, f"not JSON: {error}")


def _check_unique_keys(payload: bytes, keys: int) -> None:
    """``keys``: the keys the parsed objects hold; fewer than the text has means a key
    came twice (the parser kept the last). Counting colons settles the common payload; a
    regex scan the next most; the exact check runs only when both say there may be a
    duplicate."""
    if payload.count(b":") == keys:
        # Each key in the text is followed by a colon of its own: no more colons than
        # distinct keys leaves no room for a key twice. (A string holding a colon, say an
        # RFC 3339 ts, makes more; then the scan below decides.)
        return
    if len(_KEY_END.findall(payload)) <= keys:
        return
    duplicate = duplicate_key(payload)
    if duplicate is not None:
        raise _Reject(Reason.DUPLICATE_KEY,
                      f"key {duplicate[:80]!r} appears twice in one object")


def duplicate_key(payload: bytes) -> str | None:
    """The first key that appears twice in one object of the JSON text ``payload``, or
    None (also when it is not JSON). Parsers disagree on which value wins, so a payload
    with one is refused wherever one is read: readings here, command answers in
    gateway.commands."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> None:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                duplicates.append(key)
            seen.add(key)

    try:
        json.loads(payload.removeprefix(_BOM).decode("utf-8"), object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    return duplicates[0] if duplicates else None


def _check_value(name: str, value: object, where: str = "") -> None:
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _Reject(Reason.NON_FINITE, f"{where}metric {name!r} is not finite")
    elif kind is not int and kind is not bool:  # a bool becomes 1 or 0 after this check
        raise _Reject(Reason.WRONG_TYPE, f"{where}metric {name!r} is {_kind(value)}, not a number")


def _where(index: int) -> str:
    return f"reading {index}: " if index >= 0 else ""


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
