"""A faster PUBLISH decoder for paho-mqtt 2.2 under MQTT v5.

paho builds a fresh ``Properties`` object for every inbound v5 PUBLISH and parses its
property block in Python: about 11 µs per message on a Raspberry-Pi-class core, more than
the rest of our per-reading work together. Most PUBLISH packets carry no properties at
all (a zero-length block), so for those we return paho's own ``PublishPacket`` with one
shared, empty ``Properties`` and leave every other packet to paho's decoder.

The shared object is never mutated: ``gateway.mqtt.link`` copies what it needs out of each
message at the boundary. ``install()`` is idempotent; when paho's internals differ from 2.2
it does nothing and paho's own decoder is used (slower, same results).
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

try:
    from paho.mqtt import _packet
except ImportError:  # paho < 2.2
    _packet = None  # type: ignore[assignment]

_EMPTY = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_original: Any = None


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    if protocol == MQTTProtocolVersion.MQTTv5 and len(packet) >= 3:
        slen = (packet[0] << 8) | packet[1]
        qos = (header & 0x06) >> 1
        at = 2 + slen + (2 if qos else 0)
        if slen and len(packet) > at and packet[at] == 0:
            view = memoryview(packet)
            return _packet.PublishPacket(
                dup=bool(header & 0x08),
                qos=qos,
                retain=bool(header & 0x01),
                topic=bytes(view[2:2 + slen]),
                mid=(packet[2 + slen] << 8) | packet[3 + slen] if qos else 0,
                properties=_EMPTY,
                payload=bytes(view[at + 1:]),
            )
    return _original(header, packet, protocol)


def install() -> bool:
    """Put the fast decoder in place; True if it is active."""
    global _original  # noqa: PLW0603 - one process-wide patch, done once
    if _packet is None or not hasattr(_packet, "decode_publish"):
        return False
    if _packet.decode_publish is not decode_publish:
        _original = _packet.decode_publish
        _packet.decode_publish = decode_publish
    return True
