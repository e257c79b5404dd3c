"""CloudEvents 1.0 (structured JSON mode) for what the gateway reports: alerts, commands,
device presence. Events go through the durable log like readings and the uplink publishes
each one on ``fieldgate/<gateway_id>/events/<type>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

SPEC_VERSION = "1.0"


@dataclass(frozen=True, slots=True)
class Event:
    """A fat event before it is logged: the log gives it its sequence number and id."""

    type: str                     # e.g. io.fieldgate.alert.fired
    subject: str                  # the device
    time: float                   # epoch seconds of what happened
    data: dict[str, Any] = field(default_factory=dict)


def render(event: Event, gateway_id: str, seq: int) -> bytes:
    """The CloudEvents JSON for ``event`` as record ``seq`` of this gateway.

    ``id`` is ``<gateway_id>-<seq>`` zero-padded, so ids sort in log order and are unique
    across a fleet of gateways; ``seq`` is also an extension attribute for consumers that
    de-duplicate readings and events alike.
    """
    return orjson.dumps({
        "specversion": SPEC_VERSION,
        "id": f"{gateway_id}-{seq:012d}",
        "source": f"fieldgate://{gateway_id}",
        "type": event.type,
        "subject": event.subject,
        "time": datetime.fromtimestamp(event.time, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "seq": seq,
        "data": event.data,
    })
