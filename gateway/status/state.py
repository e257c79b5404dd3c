"""What the status view knows, built up poll by poll from the gateway's metrics and log.

`StatusState.update` takes one poll (a /metrics scrape or its error, and what the log
gained) and `snapshot()` hands the view a frozen picture: a row per device (current
values, a per-second history of the last minute, actuator states), link states, sink
depths and a feed of events.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gateway.status.sources import LoggedEvent, MetricsView, TailBatch

# The sparkline spans this many seconds, one bucket a second.
WINDOW = 60
# Devices remembered; past it the one heard from longest ago is forgotten (a site of
# thousands shows its most recent ones; each costs a minute of buckets per metric).
MAX_DEVICES = 1000
# Feed lines remembered (the view shows as many of the newest as fit).
FEED_LINES = 200
# Commands remembered by id, to pair an acknowledgement with what was asked.
MAX_COMMANDS = 1000


class Tone(StrEnum):
    """How a feed line or a state is drawn."""

    BAD = "bad"
    GOOD = "good"
    WARN = "warn"
    INFO = "info"
    PLAIN = "plain"


@dataclass(frozen=True, slots=True)
class FeedItem:
    time: float
    kind: str       # short word: FIRED, RESOLVED, command, ack, link, ...
    text: str
    tone: Tone


@dataclass(frozen=True, slots=True)
class Actuator:
    action: str     # e.g. fan
    state: str      # e.g. on (the command's params)
    status: str     # sent, acknowledged, rejected, no answer
    time: float


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: str
    values: dict[str, float]
    history: dict[str, tuple[float | None, ...]]   # per metric: WINDOW means, oldest first
    last_seen: float
    actuators: tuple[Actuator, ...]
    firing: tuple[str, ...]                         # rules firing on this device


@dataclass(frozen=True, slots=True)
class Snapshot:
    time: float
    gateway_id: str
    metrics: MetricsView | None
    metrics_error: str | None
    readings_per_s: float | None
    devices: tuple[DeviceRow, ...]
    metric_names: tuple[str, ...]
    cursors_oldest: dict[str, float | None]
    feed: tuple[FeedItem, ...]
    notes: tuple[tuple[str, str], ...] = ()       # extra (label, value) lines, e.g. the demo's


class _Device:
    __slots__ = ("actuators", "buckets", "firing", "last_seen", "values")

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.buckets: dict[str, dict[int, tuple[float, int]]] = {}
        self.last_seen = 0.0
        self.actuators: dict[str, Actuator] = {}
        self.firing: dict[str, float] = {}


def _param_text(action: str, params: Any) -> str:
    if isinstance(params, dict):
        if set(params) == {"state"}:
            return str(params["state"])
        if params:
            return ",".join(f"{k}={v}" for k, v in params.items())
    return action


def _number(value: Any) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.1f}".removesuffix(".0")
    return "-"


class StatusState:
    def __init__(self) -> None:
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._feed: deque[FeedItem] = deque(maxlen=FEED_LINES)
        self._commands: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self._links: dict[str, bool] | None = None
        self._metrics: MetricsView | None = None
        self._metrics_error: str | None = None
        self._rate: float | None = None
        self._last_scrape: tuple[float, float] | None = None   # (time, readings_total)
        self._gateway_id = ""
        self._cursor_oldest: dict[str, float | None] = {}
        self._now = 0.0

    def note(self, time: float, kind: str, text: str, tone: Tone = Tone.INFO) -> None:
        """A line in the feed from outside the gateway (e.g. the demo cutting the cloud)."""
        self._feed.append(FeedItem(time, kind, text, tone))

    def update(self, now: float, metrics: MetricsView | None, metrics_error: str | None,
               tail: TailBatch | None) -> None:
        self._now = now
        self._take_metrics(now, metrics, metrics_error)
        if tail is not None:
            self._gateway_id = tail.gateway_id or self._gateway_id
            self._cursor_oldest = {k: c.oldest_undelivered for k, c in tail.cursors.items()}
            for reading in tail.readings:
                self._take_reading(reading.created, reading.device, reading.metrics)
            for event in tail.events:
                self._take_event(event)
        self._forget_old(now)

    def _take_metrics(self, now: float, metrics: MetricsView | None,
                      error: str | None) -> None:
        if metrics is None:
            if error and self._metrics_error is None:
                self.note(now, "metrics", error, Tone.BAD)
            self._metrics_error = error
            self._rate = None
            self._last_scrape = None
            return
        if self._metrics_error is not None:
            self.note(now, "metrics", "the gateway's metrics answer again", Tone.GOOD)
        self._metrics_error = None
        if self._links is not None:
            for link, up in sorted(metrics.links.items()):
                if self._links.get(link) != up:
                    self.note(now, "link", f"{link} link {'up' if up else 'DOWN'}",
                              Tone.GOOD if up else Tone.BAD)
        self._links = dict(metrics.links)
        if self._last_scrape is not None and now > self._last_scrape[0]:
            then, total = self._last_scrape
            self._rate = max(0.0, (metrics.readings_total - total) / (now - then))
        self._last_scrape = (now, metrics.readings_total)
        self._metrics = metrics

    def _device(self, name: str) -> _Device:
        dev = self._devices.get(name)
        if dev is None:
            dev = self._devices[name] = _Device()
            while len(self._devices) > MAX_DEVICES:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(name)
        return dev

    def _take_reading(self, created: float, device: str, metrics: dict[str, float]) -> None:
        dev = self._device(device)
        dev.last_seen = max(dev.last_seen, created)
        second = int(created)
        for name, value in metrics.items():
            dev.values[name] = value
            buckets = dev.buckets.setdefault(name, {})
            total, count = buckets.get(second, (0.0, 0))
            buckets[second] = (total + value, count + 1)

    def _take_event(self, event: LoggedEvent) -> None:
        body = event.body
        kind = str(body.get("type", "")).removeprefix("io.fieldgate.")
        device = str(body.get("subject", ""))
        data = body.get("data") or {}
        if not isinstance(data, dict):
            data = {}
        at = event.created
        rule = str(data.get("rule", ""))
        if kind == "alert.fired":
            self._device(device).firing[rule] = at
            value = data.get("value")
            what = f": {_number(value)} {data.get('threshold', '')}".rstrip() \
                if value is not None else ""
            severity = f" ({data['severity']})" if data.get("severity") else ""
            self.note(at, "FIRED", f"{rule} on {device}{what}{severity}", Tone.BAD)
        elif kind == "alert.resolved":
            self._device(device).firing.pop(rule, None)
            value = data.get("value")
            what = f": {_number(value)}" if value is not None else ""
            self.note(at, "RESOLVED", f"{rule} on {device}{what}", Tone.GOOD)
        elif kind == "alert.flapping":
            self.note(at, "FLAPPING", f"{rule} on {device}", Tone.WARN)
        elif kind == "command.issued":
            action = str(data.get("action", ""))
            state = _param_text(action, data.get("params"))
            self._commands[str(data.get("id", ""))] = (device, action, state)
            while len(self._commands) > MAX_COMMANDS:
                self._commands.popitem(last=False)
            self._device(device).actuators[action] = Actuator(action, state, "sent", at)
            signed = " (signed)" if data.get("signed") else ""
            self.note(at, "command", f"{action} {state} sent to {device}{signed}", Tone.INFO)
        elif kind in ("command.acknowledged", "command.rejected", "command.timed_out"):
            action = str(data.get("action", ""))
            known = self._commands.get(str(data.get("id", "")))
            state = known[2] if known else "?"
            status, tone, word = {
                "command.acknowledged": ("acknowledged", Tone.GOOD, "ack"),
                "command.rejected": ("rejected", Tone.BAD, "rejected"),
                "command.timed_out": ("no answer", Tone.WARN, "timeout"),
            }[kind]
            self._device(device).actuators[action] = Actuator(action, state, status, at)
            why = f" ({data['reason']})" if data.get("reason") else ""
            self.note(at, word, f"{device} {status} {action} {state}{why}", tone)
        elif kind == "command.ack_rejected":
            self.note(at, "ack?", f"answer from {device} not believed: "
                      f"{data.get('reason', '')}", Tone.WARN)
        elif kind in ("device.offline", "device.online"):
            up = kind == "device.online"
            self.note(at, "device", f"{device} {'online' if up else 'OFFLINE'}",
                      Tone.GOOD if up else Tone.WARN)
        else:
            self.note(at, "event", f"{kind} {device}", Tone.PLAIN)

    def _forget_old(self, now: float) -> None:
        oldest = int(now) - WINDOW
        for dev in self._devices.values():
            for buckets in dev.buckets.values():
                for second in [s for s in buckets if s <= oldest]:
                    del buckets[second]

    def snapshot(self, notes: tuple[tuple[str, str], ...] = ()) -> Snapshot:
        now = int(self._now)
        seconds = range(now - WINDOW + 1, now + 1)
        rows = []
        names: dict[str, None] = {}  # in the order first seen: as devices send them
        for name, dev in sorted(self._devices.items()):
            history = {}
            for metric, buckets in dev.buckets.items():
                history[metric] = tuple(
                    (buckets[s][0] / buckets[s][1]) if s in buckets else None for s in seconds)
            names.update(dict.fromkeys(dev.values))
            rows.append(DeviceRow(name, dict(dev.values), history, dev.last_seen,
                                  tuple(dev.actuators[a] for a in sorted(dev.actuators)),
                                  tuple(sorted(dev.firing))))
        return Snapshot(
            time=self._now, gateway_id=self._gateway_id, metrics=self._metrics
            if self._metrics_error is None else None, metrics_error=self._metrics_error,
            readings_per_s=self._rate, devices=tuple(rows), metric_names=tuple(names),
            cursors_oldest=dict(self._cursor_oldest), feed=tuple(self._feed), notes=notes)
