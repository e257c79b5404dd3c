"""What the engine emits: frozen event records, one per state transition or command.

The daemon turns them into CloudEvents (``cloud_type``) and device commands; nothing here
knows about MQTT or the log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    FIRED = "fired"
    RESOLVED = "resolved"
    FLAPPING = "flapping"  # transitions are suppressed from now on until it settles
    COMMAND = "command"
    OFFLINE = "offline"
    ONLINE = "online"


_CLOUD_TYPES = {
    Kind.FIRED: "io.fieldgate.alert.fired",
    Kind.RESOLVED: "io.fieldgate.alert.resolved",
    Kind.FLAPPING: "io.fieldgate.alert.flapping",
    Kind.COMMAND: "io.fieldgate.command.issued",
    Kind.OFFLINE: "io.fieldgate.device.offline",
    Kind.ONLINE: "io.fieldgate.device.online",
}


def clean(value: float | None) -> float | None:
    """JSON has no NaN or infinity: an undefined value is None."""
    return None if value is None or not math.isfinite(value) else value


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """An alert changed state for one device."""

    kind: Kind
    time: float
    group: str
    rule: str
    device: str
    severity: str
    labels: Mapping[str, str]
    value: float | None  # the first comparison's left side, None when undefined
    expr: str
    clear: str | None
    threshold: str  # e.g. "> 30"
    window: Mapping[str, float | None]  # every window function of the rule -> its value
    message: str
    active_since: float | None = None

    @property
    def cloud_type(self) -> str:
        return _CLOUD_TYPES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["labels"], out["window"] = dict(self.labels), dict(self.window)
        out["kind"] = str(self.kind)
        return out


@dataclass(frozen=True, slots=True)
class CommandEvent:
    """A rule action: a command to send to ``device`` (the daemon signs and publishes it)."""

    time: float
    group: str
    rule: str
    device: str
    action: str
    params: Mapping[str, Any]
    trigger: Kind  # FIRED or RESOLVED
    source_device: str
    kind: Kind = field(default=Kind.COMMAND)

    @property
    def cloud_type(self) -> str:
        return _CLOUD_TYPES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"] = dict(self.params)
        out["kind"], out["trigger"] = str(self.kind), str(self.trigger)
        return out


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A device went silent for the configured time, or spoke again."""

    kind: Kind  # OFFLINE or ONLINE
    time: float
    device: str
    last_seen: float

    @property
    def cloud_type(self) -> str:
        return _CLOUD_TYPES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = str(self.kind)
        return out


Event = AlertEvent | CommandEvent | DeviceEvent
