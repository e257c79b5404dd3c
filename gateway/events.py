"""CloudEvents 1.0 (structured JSON mode) for what the gateway reports: alerts, commands,
device presence. Events go through the durable log like readings and the uplink publishes
each one on ``fieldgate/<gateway_id>/events/<type>``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from gateway.records import Event

__all__ = ["SPEC_VERSION", "Event", "render"]

SPEC_VERSION = "1.0"


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
