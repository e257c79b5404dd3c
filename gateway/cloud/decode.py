"""The uplink as it arrives on the cloud broker (README "Uplink"), turned into what the
worker writes: readings and events with the seq range they cover, or a gateway's status.

Anything else is a ``BadMessage`` with a reason (the dead-letter table's ``reason``):
a message we cannot use must be acknowledged and put aside, never retried forever.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from gateway.ingest.decode import valid_device_id

# Largest payload after gzip is undone (a gzip bomb must not take the worker's memory).
_MAX_INFLATED = 64 * 1024 * 1024


class Kind(StrEnum):
    TELEMETRY = "telemetry"
    EVENT = "event"
    STATUS = "status"
    REPLY = "resend_reply"


class Reason(StrEnum):
    """Why a message was dead-lettered (the ``reason`` label on /metrics)."""

    TOPIC = "bad_topic"                # not fieldgate/<id>/<telemetry|events/..|status>
    GZIP = "bad_gzip"
    JSON = "not_json"
    SHAPE = "bad_shape"                # JSON, but not our format
    GATEWAY = "gateway_mismatch"       # the payload's gateway is not the topic's
    UNKNOWN = "unknown_gateway"        # not on the allowlist
    REJECTED = "influx_rejected"       # InfluxDB refused its points for good (4xx)


class BadMessage(Exception):  # noqa: N818 - a verdict, raised and caught within the worker
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Uplink:
    """One decoded uplink message."""

    kind: Kind
    gateway: str
    first: int                       # seq range covered (telemetry, event); 0 otherwise
    last: int
    readings: list[dict[str, Any]]   # telemetry
    body: dict[str, Any]             # the event, the status, or the resend reply


def split_topic(topic: str) -> tuple[str, Kind]:
    """(gateway id, kind) of an uplink topic; BadMessage otherwise."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[0] == "fieldgate" and parts[1]:
        rest = parts[2:]
        if rest == ["telemetry"]:
            return parts[1], Kind.TELEMETRY
        if rest[0] == "events" and len(rest) >= 2:
            return parts[1], Kind.EVENT
        if rest == ["status"]:
            return parts[1], Kind.STATUS
        if rest == ["resend", "reply"]:
            return parts[1], Kind.REPLY
    raise BadMessage(Reason.TOPIC, f"topic {topic!r} is not an uplink topic")


def _props(user_properties: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(user_properties)


def _inflate(payload: bytes) -> bytes:
    try:
        out = zlib.decompressobj(wbits=31).decompress(payload, _MAX_INFLATED)
    except zlib.error as err:
        raise BadMessage(Reason.GZIP, f"content-encoding gzip but {err}") from None
    if len(out) >= _MAX_INFLATED:
        raise BadMessage(Reason.GZIP, f"inflates past {_MAX_INFLATED} bytes")
    return out


# Longest device id taken: the edge's largest ingest.max_device_id.
_MAX_DEVICE_ID = 1024
# The largest seq taken: exact in a JSON number (a double) and in SQLite's INTEGER.
MAX_SEQ = 2**53


def _seq(value: object, what: str) -> int:
    """A seq: a positive integer (or its decimal digits, in a user property) below 2**53."""
    if type(value) is int:
        seq = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16:
        seq = int(value)
    else:
        raise BadMessage(Reason.SHAPE, f"{what} {str(value)[:40]!r} is not an integer")
    if not 1 <= seq <= MAX_SEQ:
        raise BadMessage(Reason.SHAPE, f"{what} {seq} is not in 1..{MAX_SEQ}")
    return seq


def decode(topic: str, payload: bytes,
           user_properties: tuple[tuple[str, str], ...]) -> Uplink:
    """The message as an ``Uplink``; BadMessage(reason, detail) if it is not one of ours."""
    gateway, kind = split_topic(topic)
    props = _props(user_properties) if user_properties else {}
    if props.get("content-encoding") == "gzip":
        payload = _inflate(payload)
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        raise BadMessage(Reason.JSON, f"not JSON ({err})") from None
    if not isinstance(body, dict):
        raise BadMessage(Reason.SHAPE, "the payload is not a JSON object")
    if kind is Kind.TELEMETRY:
        return _telemetry(gateway, body, props)
    if kind is Kind.EVENT:
        return _event(gateway, body, props)
    return Uplink(kind, gateway, 0, 0, [], body)


def _telemetry(gateway: str, body: dict[str, Any], props: dict[str, str]) -> Uplink:
    if body.get("gateway") != gateway:
        raise BadMessage(Reason.GATEWAY, f"payload gateway {body.get('gateway')!r} on "
                         f"gateway {gateway!r}'s topic")
    readings = body.get("readings")
    if not isinstance(readings, list) or not readings:
        raise BadMessage(Reason.SHAPE, "no readings list")
    for reading in readings:
        if not isinstance(reading, dict) or type(reading.get("device")) is not str \
                or not isinstance(reading.get("ts"), int | float) \
                or type(reading.get("seq")) is not int:
            raise BadMessage(Reason.SHAPE, "a reading without seq, device and ts: "
                             f"{str(reading)[:200]}")
        wrong = valid_device_id(reading["device"], _MAX_DEVICE_ID)
        if wrong is not None:  # the edge refuses such ids; a tag would be garbage
            raise BadMessage(Reason.SHAPE, wrong)
    seqs = [r["seq"] for r in readings]
    first, last = _seq(min(seqs), "seq"), _seq(max(seqs), "seq")
    # The properties, when there, must say what the readings say: a message that claims
    # seqs it does not carry would move the high-water mark past real gaps.
    if "seq_first" in props or "seq_last" in props:
        said = (_seq(props.get("seq_first"), "seq_first"), _seq(props.get("seq_last"), "seq_last"))
        if said != (first, last):
            raise BadMessage(Reason.SHAPE, f"seq_first/seq_last {said[0]}..{said[1]} do not "
                             f"match the readings' seqs {first}..{last}")
    return Uplink(Kind.TELEMETRY, gateway, first, last, readings, {})


def _event(gateway: str, body: dict[str, Any], props: dict[str, str]) -> Uplink:
    if body.get("source") != f"fieldgate://{gateway}":
        raise BadMessage(Reason.GATEWAY, f"event source {body.get('source')!r} on gateway "
                         f"{gateway!r}'s topic")
    if not isinstance(body.get("type"), str) or not isinstance(body.get("time"), str):
        raise BadMessage(Reason.SHAPE, "a CloudEvent needs type and time")
    seq = _seq(props.get("seq_first", body.get("seq")), "seq")
    return Uplink(Kind.EVENT, gateway, seq, seq, [], body)
