"""What a session's ``step()`` returns: plain records, one per thing that happened."""

from __future__ import annotations

from typing import NamedTuple

from mqtt5 import PubAckReasonCode, SubAckReasonCode


class Message(NamedTuple):
    """An inbound PUBLISH (a NamedTuple: built once per message, cheaper than a dataclass)."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    duplicate: bool
    retain: bool
    subscription_ids: tuple[int, ...]
    content_type: str | None
    user_properties: tuple[tuple[str, str], ...]
    response_topic: str | None
    correlation_data: bytes | None
    connection: int     # which connection it came on; an ack on a later one is not sent
    received: float     # time.time() when it was read (one clock read per step)


class Connected(NamedTuple):
    session_present: bool
    receive_maximum: int
    max_packet_size: int | None
    keepalive: int
    assigned_client_id: str | None


class Published(NamedTuple):
    """The server's PUBACK for our QoS 1 publish ``packet_id``."""

    packet_id: int
    reason_code: PubAckReasonCode


class Subscribed(NamedTuple):
    packet_id: int
    reason_codes: tuple[SubAckReasonCode, ...]


Event = Message | Connected | Published | Subscribed
