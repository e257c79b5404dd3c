"""The gateway uplink's wire format, as a cloud consumer sees it (README "uplink", DESIGN.md).

This package never imports ``gateway``: the format is the contract between the two, written
out here a second time on purpose, so that a change on either side that breaks it shows in
the tests of the other (``tests/test_fleetgen.py`` parses what ``devices simulate-gateways``
sends exactly as a cloud worker must).

- ``fieldgate/{id}/telemetry``: ``{"gateway": id, "readings": [{"seq", "device", "ts",
  <metrics>}, ...]}``, QoS 1, content type ``application/json``, user properties
  ``seq_first``/``seq_last`` (strings) and ``content-encoding: gzip`` when compressed;
- ``fieldgate/{id}/events/{type}``: one CloudEvent 1.0 (structured JSON), content type
  ``application/cloudevents+json``, ``seq_first`` = ``seq_last`` = its seq;
- ``fieldgate/{id}/status``: retained, ``{"state": "online"|"offline", "gateway", "version",
  "ts", "readings", "dead_letters", "undelivered"}`` (plus ``reason`` when offline);
- ``fieldgate/{id}/resend``: a gap-repair request ``{"request_id", "from", "to"}``, answered on
  its Response Topic (default ``fieldgate/{id}/resend/reply``) with ``{"request_id", "from",
  "to", "resent", "missing": [[a, b], ...]}`` or ``{"request_id", "error"}``.
"""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from typing import Any

import orjson

TELEMETRY_TYPE = "application/json"
EVENT_TYPE = "application/cloudevents+json"
# Most seqs one resend request may ask for (ISSUE12.md); a larger range is refused.
RESEND_MAX = 1_000_000
# gzip level the gateway's uplink uses (gateway/sinks/uplink.py).
GZIP_LEVEL = 5

Properties = list[tuple[str, str]]


def telemetry_topic(gateway: str) -> str:
    return f"fieldgate/{gateway}/telemetry"


def status_topic(gateway: str) -> str:
    return f"fieldgate/{gateway}/status"


def event_topic(gateway: str, event_type: str) -> str:
    return f"fieldgate/{gateway}/events/{event_type}"


def resend_topic(gateway: str) -> str:
    return f"fieldgate/{gateway}/resend"


def reply_topic(gateway: str) -> str:
    return f"fieldgate/{gateway}/resend/reply"


def telemetry_head(gateway: str) -> bytes:
    """What every telemetry payload of ``gateway`` starts with (the readings follow)."""
    return b'{"gateway":' + orjson.dumps(gateway) + b',"readings":['


def seq_properties(first: int, last: int, *, compressed: bool) -> Properties:
    props = [("seq_first", str(first)), ("seq_last", str(last))]
    if compressed:
        props.append(("content-encoding", "gzip"))
    return props


def compress(payload: bytes) -> bytes:
    return gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)


def cloud_event(gateway: str, seq: int, event_type: str, subject: str, when: float,
                data: dict[str, Any]) -> bytes:
    """A CloudEvent as gateway/events.py renders record ``seq`` of ``gateway``."""
    return orjson.dumps({
        "specversion": "1.0",
        "id": f"{gateway}-{seq:012d}",
        "source": f"fieldgate://{gateway}",
        "type": event_type,
        "subject": subject,
        "time": datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "seq": seq,
        "data": data,
    })


def status(gateway: str, state: str, *, version: str, when: float, readings: int,
           **extra: Any) -> bytes:
    return orjson.dumps({"state": state, "gateway": gateway, "version": version, "ts": when,
                         "readings": readings, "dead_letters": 0, "undelivered": 0, **extra})


def decode_telemetry(payload: bytes, props: Properties | tuple[tuple[str, str], ...]
                     ) -> dict[str, Any]:
    """A telemetry payload as a consumer reads it (gunzipped when the property says so)."""
    if ("content-encoding", "gzip") in props:
        payload = gzip.decompress(payload)
    body: dict[str, Any] = orjson.loads(payload)
    return body


def parse_resend(payload: bytes) -> tuple[str, int, int]:
    """A resend request's (request_id, from, to); ValueError (one line) when it is not one.
    A request_id readable in a bad request is in ``err.args[1]``."""
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON", None) from None
    if not isinstance(request, dict):
        raise ValueError("not a JSON object", None)
    request_id, first, last = request.get("request_id"), request.get("from"), request.get("to")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("request_id must be a non-empty string", None)
    if type(first) is not int or type(last) is not int or not 1 <= first <= last:
        raise ValueError("from and to must be seqs (integers) with 1 <= from <= to",
                         request_id)
    if last - first + 1 > RESEND_MAX:
        raise ValueError(f"at most {RESEND_MAX} seqs per request", request_id)
    return request_id, first, last
