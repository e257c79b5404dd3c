"""The schema Fieldgate writes to InfluxDB (DESIGN.md, "Wire contracts"):

- ``telemetry`` (configurable): tags ``gateway``, ``site``, ``device`` and the device's
  labels (``device_labels``); one float field per metric; the reading's own timestamp.
- ``events``: tags ``type``, ``rule``, ``device``, ``severity``, ``gateway``, ``site``;
  fields ``summary`` (string), ``value`` (float, when the event has one), ``id`` (string,
  the CloudEvents id); the event's time.
- ``fieldgate``: the gateway's health, tags ``gateway``, ``site``, float fields.

Every point is a pure function of its log record, so a batch sent again after a crash or
a lost response writes the same points (same series, same timestamp): writes are
idempotent. Readings are encoded by a hand-written fast path; the property tests check it
against the generic ``lineproto.line`` and that against ``influxdb_client.Point``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gateway.influx.lineproto import Precision, key, line, measurement, tag_set
from gateway.influx.lineproto import timestamp as to_timestamp

EVENTS = "events"
HEALTH = "fieldgate"
# Keys of a logged reading that are not metrics.
_NOT_METRICS = frozenset(("seq", "device", "ts"))
# Devices whose tag set is cached; past this the cache starts over (a bound on memory
# for a site whose device ids churn, at the cost of recomputing label globs).
_DEVICES_CACHED = 100_000
# Longest event summary written; the full event stays in the log and went to the cloud.
_SUMMARY_MAX = 1000
# Integers below 2**53 print the same as the float they stand for (21 -> "21").
_EXACT_INT = 2**53


class ReadingEncoder:
    """Log readings (``{"seq", "device", "ts", <metric>: number, ...}``) -> lines."""

    def __init__(self, *, measurement_name: str, gateway: str, site: str,
                 device_labels: Mapping[str, Mapping[str, str]], precision: Precision) -> None:
        self._measurement = measurement(measurement_name)
        self._base = {"gateway": gateway, "site": site}
        self._labels = {pattern: dict(values) for pattern, values in device_labels.items()}
        self._precision = precision
        self._factor = {Precision.S: 1, Precision.MS: 1000}.get(precision)
        self._prefixes: dict[str, str] = {}
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

    def _prefix(self, device: str) -> str:
        if len(self._prefixes) >= _DEVICES_CACHED:
            self._prefixes.clear()
        prefix = self._prefixes[device] = f"{self._measurement}{tag_set(self.tags(device))} "
        return prefix

    def _plan(self, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        """For a reading's keys: its metric names, sorted, each with ``<escaped key>=``."""
        if len(self._plans) >= _DEVICES_CACHED:
            self._plans.clear()
        plan = self._plans[names] = tuple((name, key(name) + "=") for name in sorted(names)
                                          if name not in _NOT_METRICS)
        return plan

    def encode(self, reading: Mapping[str, Any]) -> str:
        """One reading as one line; ``""`` if it has no finite metric (never from decode).

        The hot path of the sink (about 2 µs a reading here): tag sets are cached per
        device and field keys per set of metric names; numbers are written as
        ``lineproto.float_value`` writes them, without the float round trip for integers
        that a float holds exactly.
        """
        prefix = self._prefixes.get(reading["device"]) or self._prefix(reading["device"])
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


