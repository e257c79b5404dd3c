"""Decoding site payloads into readings; everything else becomes a dead letter with a reason.

A message is accepted or rejected whole: an array with one bad reading goes to the
dead-letter table as it arrived, so that `gateway log replay` can send it again after a fix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from gateway.config import Ingest, PayloadFormat
from gateway.ingest.topics import TopicMatch, TopicTemplates

# device, ts (epoch seconds), metrics as they arrived (numbers and bools)
Reading = tuple[str, float, dict[str, Any]]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_RESERVED = frozenset({"seq", "device", "ts", "gateway"})
# Metric names seen and found valid; bounded like the topic cache.
_NAMES_MAX = 16_384


class Reason(StrEnum):
    """Why a message went to the dead-letter table."""

    UNKNOWN_TOPIC = "unknown_topic"
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    NON_FINITE = "non_finite"
    BAD_SHAPE = "bad_shape"
    TOO_MANY_READINGS = "too_many_readings"
    TOO_MANY_METRICS = "too_many_metrics"
    NO_METRICS = "no_metrics"
    WRONG_TYPE = "wrong_type"
    BAD_NAME = "bad_name"
    BAD_TIMESTAMP = "bad_timestamp"
    TS_OUT_OF_RANGE = "ts_out_of_range"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: Reason
    detail: str


class _Reject(Exception):  # noqa: N818 - internal control flow, never escapes this module
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


class Decoder:
    """Turns (topic, payload) into readings, or a DeadLetter saying why not."""

    def __init__(self, cfg: Ingest, topics: TopicTemplates) -> None:
        self._cfg = cfg
        self._topics = topics
        self._names: set[str] = set()

    def decode(self, topic: str, payload: bytes, now: float) -> list[Reading] | DeadLetter:
        match = self._topics.match(topic)
        if match is None:
            return DeadLetter(Reason.UNKNOWN_TOPIC, f"topic {topic!r} matches no template")
        if len(payload) > self._cfg.max_payload:
            return DeadLetter(
                Reason.TOO_LARGE, f"{len(payload)} bytes > max_payload {self._cfg.max_payload}"
            )
        try:
            return self._decode(match, payload, now)
        except _Reject as rej:
            return DeadLetter(rej.reason, rej.detail)

    def _decode(self, match: TopicMatch, payload: bytes, now: float) -> list[Reading]:
        value = _loads(payload)
        if match.format is PayloadFormat.NUMBER:
            assert match.metric is not None
            self._check_name(match.metric)
            _check_value(match.metric, value)
            return [(match.device, now, {match.metric: value})]
        if isinstance(value, dict):
            return [self._reading(match.device, value, now, -1)]
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
            for i, item in enumerate(value):
                if type(item) is not dict:
                    raise _Reject(Reason.BAD_SHAPE, f"reading {i} is {_kind(item)}, not an object")
                out.append(reading(device, item, now, i))
            return out
        raise _Reject(Reason.BAD_SHAPE, f"payload is {_kind(value)}, not an object or array")

    def _reading(self, device: str, obj: dict[str, Any], now: float, index: int) -> Reading:
        """One reading object; ``index`` is its place in an array (-1: a lone object).

        This runs once per reading, so the common case is written out flat: numeric ts,
        known metric names, int/float/bool values. Anything else takes the slow checks.
        """
        ts_raw = obj.pop("ts", None)
        if ts_raw is None:
            ts = now
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
            elif kind is not int and kind is not bool:
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
        if not (now - self._cfg.max_past <= ts <= now + self._cfg.max_future):
            raise _Reject(
                Reason.TS_OUT_OF_RANGE,
                f"{where}ts {ts!r} is more than max_past before or max_future after now",
            )
        return ts


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        # orjson refuses NaN and Infinity; tell those apart from broken JSON for the operator.
        try:
            json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _Reject(Reason.BAD_JSON, f"not JSON: {err}") from None
        raise _Reject(Reason.NON_FINITE, "payload contains NaN or Infinity") from None


def _check_value(name: str, value: object, where: str = "") -> None:
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _Reject(Reason.NON_FINITE, f"{where}metric {name!r} is not finite")
    elif kind is not int and kind is not bool:
        raise _Reject(Reason.WRONG_TYPE, f"{where}metric {name!r} is {_kind(value)}, not a number")


def _where(index: int) -> str:
    return f"reading {index}: " if index >= 0 else ""


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
