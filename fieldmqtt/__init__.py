"""Fieldgate's MQTT v5 client layer: a session on the ``mqtt5`` codec, driven by the
caller's select loop. Shared by the gateway (``gateway.mqtt``) and the emulator
(``devices``); it imports neither.

- ``fieldmqtt.session``: ``MqttSession`` and its ``SessionConfig`` (the state machine);
- ``fieldmqtt.events``: what ``step()`` returns (``Message``, ``Connected``, ``Published``,
  ``Subscribed``);
- ``fieldmqtt.errors``: what can go wrong, with the reason code.
"""

from fieldmqtt.errors import (
    ConnectionLostError,
    ConnectRefusedError,
    MqttError,
    NotConnectedError,
    PacketTooLargeError,
    ProtocolViolationError,
    ServerDisconnectError,
    WindowFullError,
    reason_name,
)
from fieldmqtt.events import Connected, Event, Message, Published, Subscribed
from fieldmqtt.session import AddressInfo, MqttSession, SessionConfig, State

__all__ = [
    "AddressInfo",
    "ConnectRefusedError",
    "Connected",
    "ConnectionLostError",
    "Event",
    "Message",
    "MqttError",
    "MqttSession",
    "NotConnectedError",
    "PacketTooLargeError",
    "ProtocolViolationError",
    "Published",
    "ServerDisconnectError",
    "SessionConfig",
    "State",
    "Subscribed",
    "WindowFullError",
    "reason_name",
]
