"""What can go wrong in an MQTT session, as exceptions that carry the reason.

Errors::

    MqttError                      base of this module's errors
    ├── ConnectionLostError         the connection ended (``reason_code`` when the server said)
    │   ├── ConnectRefusedError     CONNACK with a failure reason code
    │   └── ProtocolViolationError  the server sent something malformed or not allowed
    ├── NotConnectedError           a QoS 0 publish or an ack without a connection
    ├── WindowFullError             the QoS 1 in-flight window is full (see ``can_publish``)
    └── PacketTooLargeError         over the server's Maximum Packet Size; nothing was sent
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqtt5 import ConnAckReasonCode, DisconnectReasonCode, PubAckReasonCode, SubAckReasonCode

if TYPE_CHECKING:
    from fieldmqtt.events import Event


def reason_name(code: int) -> str:
    """The name of an MQTT v5 reason code, e.g. 0x87 -> "Not authorized"."""
    for kind in (PubAckReasonCode, DisconnectReasonCode, ConnAckReasonCode, SubAckReasonCode):
        try:
            return str(kind(code).name).replace("_", " ").capitalize()
        except ValueError:
            continue
    return "Unknown reason"


class MqttError(Exception):
    """Base of the errors of an MQTT session."""


class ConnectionLostError(MqttError):
    """``why`` says what happened without naming the server ("the connection broke:
    Connection reset by peer"); str() is "host:port: why". ``events`` are what the same
    step() saw before the end (a CONNACK, messages, PUBACKs): the caller must handle them."""

    def __init__(self, where: str, why: str, reason_code: int | None = None) -> None:
        self.where = where
        self.why = why
        self.reason_code = reason_code
        self.events: list[Event] = []
        super().__init__(f"{where}: {why}")


class ConnectRefusedError(ConnectionLostError):
    """The server answered CONNECT with a failure; ``reason_code`` says why."""


class ProtocolViolationError(ConnectionLostError):
    """The server broke the protocol; we sent DISCONNECT with ``reason_code``."""


class ServerDisconnectError(ConnectionLostError):
    """The server sent DISCONNECT with ``reason_code`` (and maybe ``reason_string``)."""

    def __init__(self, where: str, reason_code: int, reason_string: str | None) -> None:
        self.reason_string = reason_string
        why = f"the server sent DISCONNECT: {reason_name(reason_code)} (0x{reason_code:02x})"
        super().__init__(where, why + (f", {reason_string!r}" if reason_string else ""),
                         reason_code)


class NotConnectedError(MqttError):
    pass


class WindowFullError(MqttError):
    pass


class PacketTooLargeError(MqttError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"Packet of {size} bytes is over the server's Maximum Packet Size "
                         f"of {limit}; send less per message")
