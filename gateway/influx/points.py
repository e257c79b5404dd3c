"""The schema Fieldgate writes to InfluxDB (DESIGN.md, "Wire contracts"):

- ``telemetry`` (configurable): tags ``gateway``, ``site``, ``device`` and the device's
  labels (``device_labels``); one float field per metric; the reading's own timestamp.
- ``events``: tags ``type``, ``rule``, ``device``, ``severity``, ``gateway``, ``site``;
  fields ``summary`` (string), ``value`` (float, when the event has one), ``id`` (string,
  the CloudEvents id); the event's time.
- ``fieldgate``: the gateway's health, tags ``gateway``, ``site``, float fields.

Every point is a pure function of its log record, so a batch sent again after a crash or
a lost response writes the same points (same series, same timestamp): writes are
idempotent. Readings are encoded by a hand-written fast path (``encode_text``, a batch a
column at a time, which the sink uses; ``encode``, one reading); the property tests check
the first against the second, that against the generic ``lineproto.line``, and that
against ``influxdb_client.Point``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import repeat
from operator import itemgetter, mul
from typing import Any

import orjson

from fieldkit.units import Precision
from gateway.influx.lineproto import key, line, measurement, tag_set
from gateway.influx.lineproto import timestamp as to_timestamp

EVENTS = "events"
HEALTH = "fieldgate"
# Keys of a logged reading that are not metrics.
_NOT_METRICS = frozenset(("seq", "device", "ts"))


def field_name(metric: str) -> str:
    """The field a metric is written as. InfluxDB 1.x drops a field named ``time`` without
    a word, and 2.x/3.x reserve names that start with ``_`` (``_field``, ``_measurement``,
    ``_time``, ``_value``…): those get ``time_`` and an ``m`` in front (``m_field``)."""
    if metric == "time":
        return "time_"
    if metric.startswith("_"):
        return "m" + metric
    return metric
# Devices whose tag set is cached; past this the cache starts over (a bound on memory
# for a site whose device ids churn, at the cost of recomputing label globs).
_DEVICES_CACHED = 100_000
# Longest event summary written; the full event stays in the log and went to the cloud.
_SUMMARY_MAX = 1000
# Integers below 2**53 print the same as the float they stand for (21 -> "21").
_EXACT_INT = 2**53
# encode_many: below this many readings of one set of keys on average, a batch is encoded
# one reading at a time (the column path costs a few calls per set of keys and per column).
_MIN_PER_SHAPE = 8
_NUMBERS = frozenset((float, int))


class _Prefixes(dict[str, str]):
    """Device -> ``<measurement>,<tags> ``; a dict so a batch looks devices up by a
    C-level map; computed on a miss, cleared past ``_DEVICES_CACHED``."""

    def __init__(self, encoder: ReadingEncoder) -> None:
        super().__init__()
        self._encoder = encoder

    def __missing__(self, device: str) -> str:
        if len(self) >= _DEVICES_CACHED:
            self.clear()
        prefix = self[device] = self._encoder.prefix(device)
        return prefix


class ReadingEncoder:
    """Log readings (``{"seq", "device", "ts", <metric>: number, ...}``) -> lines."""

    def __init__(self, *, measurement_name: str, gateway: str, site: str,
                 device_labels: Mapping[str, Mapping[str, str]], precision: Precision) -> None:
        self._measurement = measurement(measurement_name)
        self._base = {"gateway": gateway, "site": site}
        self._labels = {pattern: dict(values) for pattern, values in device_labels.items()}
        self._precision = precision
        self._factor = {Precision.S: 1, Precision.MS: 1000}.get(precision)
        self._prefixes = _Prefixes(self)
        self._plans: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}

    def tags(self, device: str) -> dict[str, str]:
        """The device's tags: its labels (later globs add to earlier ones), then ours,
        which win over a label of the same name."""
        tags: dict[str, str] = {}
        for pattern, values in self._labels.items():
            if fnmatch.fnmatchcase(device, pattern):
                tags.update(values)
        tags.update(self._base)
        tags["device"] = device
        return tags

    def prefix(self, device: str) -> str:
        """``<measurement>,<tag set> `` of the device's lines."""
        return f"{self._measurement}{tag_set(self.tags(device))} "

    def _plan(self, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        """For a reading's keys: its metric names, sorted, each with ``<escaped key>=``."""
        if len(self._plans) >= _DEVICES_CACHED:
            self._plans.clear()
        plan = self._plans[names] = tuple(
            (name, key(field_name(name)) + "=")
            for name in sorted(names, key=field_name) if name not in _NOT_METRICS)
        return plan

    def encode(self, reading: Mapping[str, Any]) -> str:
        """One reading as one line; ``""`` if it has no finite metric (never from decode).

        The reference for ``encode_text`` and its path for what the columns cannot take
        (about 2 µs a reading here, where the columns take 0.6): tag sets are cached per
        device and field keys per set of metric names; numbers are written as
        ``lineproto.float_value`` writes them, without the float round trip for integers
        that a float holds exactly.
        """
        prefix = self._prefixes[reading["device"]]
        names = tuple(reading)
        fields = []
        for name, field in self._plans.get(names) or self._plan(names):
            value = reading[name]
            if type(value) is int and -_EXACT_INT < value < _EXACT_INT:
                fields.append(field + str(value))
                continue
            if type(value) is float:
                number = value
            elif isinstance(value, int | float):  # bool, a float subclass, a huge int
                number = float(value)
            else:
                continue  # JSON has no NaN or infinity: a non-number is skipped
            if math.isfinite(number):
                text = repr(number)
                fields.append(field + (text[:-2] if text[-2:] == ".0" else text))
        if not fields:
            return ""
        ts = reading["ts"]
        time = round(ts * self._factor) if self._factor else to_timestamp(ts, self._precision)
        return f"{prefix}{','.join(fields)} {time}"

    def encode_text(self, readings: Sequence[Mapping[str, Any]]
                    ) -> tuple[str, Sequence[Mapping[str, Any]]]:
        """The lines of ``readings`` as one text, each line ended by a newline (a request
        body), and the readings that made a line: all of them unless one had no finite
        metric (``encode`` gives it ``""``). The sink's drain path.

        When every reading has the same keys (a batch from a fleet of one kind of device)
        the text is put together a column at a time (``_shape_text``); else by
        ``encode_many``.
        """
        if readings:
            first = tuple(readings[0])
            if list(map(len, readings)).count(len(first)) == len(readings):
                # Same number of keys, and every reading has the first one's (else
                # KeyError): the same keys, found without a tuple per reading.
                try:
                    text = self._shape_text(readings, first)
                except KeyError:
                    text = None
                if text is not None:
                    return text, readings
        lines = self.encode_many(readings)
        if "" in lines:
            kept = [i for i, point in enumerate(lines) if point]
            lines = [lines[i] for i in kept]
            readings = [readings[i] for i in kept]
        return "".join([point + "\n" for point in lines]), readings

    def encode_many(self, readings: Sequence[Mapping[str, Any]]) -> list[str]:
        """``[encode(r) for r in readings]``, a column at a time where readings share
        their keys (``_shape_text``), one at a time where they do not."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, shape in enumerate(map(tuple, readings)):
            groups.setdefault(shape, []).append(index)
        if len(groups) * _MIN_PER_SHAPE > len(readings):
            return list(map(self.encode, readings))
        lines = [""] * len(readings)
        for shape, indexes in groups.items():
            group = [readings[i] for i in indexes]
            text = self._shape_text(group, shape)
            encoded = text.split("\n")[:-1] if text is not None else map(self.encode, group)
            for index, point in zip(indexes, encoded, strict=True):
                lines[index] = point
        return lines

    def _shape_text(self, readings: Sequence[Mapping[str, Any]],
                    shape: tuple[str, ...]) -> str | None:
        """The lines of readings that all have the keys ``shape`` (KeyError if one lacks
        one; it may have others, which the caller rules out), each ended by a newline.

        The devices' prefixes, each metric's texts and the timestamps come from C-level
        maps over the batch, and the lines are one join over them, interleaved by slice
        assignment: no Python call per reading. None when a column holds anything but
        finite floats and integers that a float holds exactly (a bool, a huge integer, a
        null): those take ``encode``, which the property tests hold this to.
        """
        plan = self._plans.get(shape) or self._plan(shape)
        if not plan or "device" not in shape or "ts" not in shape:
            return None
        count = len(readings)
        width = 2 * len(plan) + 2  # prefix, (field key, value) per metric, timestamp
        parts: list[str] = [""] * (width * count)
        parts[0::width] = map(self._prefixes.__getitem__, map(itemgetter("device"), readings))
        for column, (name, field) in enumerate(plan):
            texts = _texts(list(map(itemgetter(name), readings)))
            if texts is None:
                return None
            parts[2 * column + 1::width] = [field if column == 0 else "," + field] * count
            parts[2 * column + 2::width] = texts
        stamps = list(map(itemgetter("ts"), readings))
        if self._factor is not None:
            times: list[int] = list(map(round, map(mul, stamps, repeat(self._factor))))
        else:
            precision = self._precision
            times = [to_timestamp(ts, precision) for ts in stamps]
        try:  # " <time>\n" for each, from one orjson call (integers of up to 64 bits)
            joined = orjson.dumps(times).decode()[1:-1]
            parts[width - 1::width] = (" " + joined.replace(",", "\n, ") + "\n").split(",")
        except orjson.JSONEncodeError:
            parts[width - 1::width] = map(" {}\n".format, times)
        return "".join(parts)


def _texts(values: list[Any]) -> list[str] | None:
    """A column's field values as ``encode`` writes them; None if some need ``encode``
    (anything but finite floats and integers that a float holds exactly).

    orjson writes a list of numbers at a few ns each where ``repr`` costs over 100 ns a
    float, and its shortest round-trip digits are ``repr``'s, except in notation: it
    writes exponents as ``1e-6`` (not ``1e-06``) and numbers below 1e-4 without one. A
    column holding either takes ``repr``. The property tests check the two agree.
    """
    kinds = set(map(type, values))
    if not kinds <= _NUMBERS:
        return None
    if float in kinds and not math.isfinite(sum(values)):
        return None  # a NaN or an infinity (or an overflowing sum: the slow path decides)
    if int in kinds and not -_EXACT_INT < min(values) <= max(values) < _EXACT_INT:
        return None
    text = orjson.dumps(values).decode()
    if "e" in text or "[0.0000" in text or ",0.0000" in text or "-0.0000" in text:
        texts = list(map(repr, values))
        if float not in kinds:
            return texts
        text = ",".join(texts)
    else:
        text = text[1:-1]
    if float in kinds:
        # Trim a trailing ".0" ("21.0" -> "21"): one replace over the column.
        text = (text + ",").replace(".0,", ",")[:-1]
    return text.split(",")


def event_line(event: Mapping[str, Any], *, gateway: str, site: str,
               precision: Precision) -> str:
    """A CloudEvent from the log as a point in ``events``; ``""`` if it cannot be one."""
    raw = event.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    raw = data.get("cause")
    cause: dict[str, Any] = raw if isinstance(raw, dict) else {}
    tags = {
        "type": str(event.get("type", "")),
        "rule": str(data.get("rule") or cause.get("rule") or ""),
        "device": str(event.get("subject") or data.get("device") or ""),
        "severity": str(data.get("severity") or ""),
        "gateway": gateway,
        "site": site,
    }
    fields: dict[str, float | str] = {
        "summary": _summary(event, data)[:_SUMMARY_MAX],
        "id": str(event.get("id", "")),
    }
    value = data.get("value")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        fields["value"] = float(value)
    try:
        when = datetime.fromisoformat(str(event["time"])).timestamp()
    except (KeyError, ValueError):
        return ""
    return line(EVENTS, tags, fields, to_timestamp(when, precision))


def _summary(event: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """The rendered message, or a short text built from the event's data."""
    message = data.get("message")
    if isinstance(message, str) and message:
        text = message
    else:
        kind = str(event.get("type", "")).removeprefix("io.fieldgate.")
        details = [f"{name}={data[name]}" for name in ("action", "status", "reason", "rule")
                   if data.get(name) not in (None, "")]
        text = " ".join([kind, str(event.get("subject", "")), *details]).strip()
    # One line: a summary is an annotation's text, not a document.
    return " ".join(text.split())


def health_line(fields: Mapping[str, float], *, gateway: str, site: str, time: float,
                precision: Precision) -> str:
    """The gateway's own figures as one point in ``fieldgate``."""
    return line(HEALTH, {"gateway": gateway, "site": site}, dict(fields),
                to_timestamp(time, precision))


