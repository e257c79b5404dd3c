"""The fast PUBLISH decoder gives what paho's own decoder gives."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion

from gateway.mqtt import fastpath


def _publish(topic: bytes, mid: int, qos: int, props: bytes, payload: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    return body + props + payload


def test_installed_on_this_paho():
    assert fastpath.install()
    assert _packet.decode_publish is fastpath.decode_publish


@given(topic=st.binary(min_size=1, max_size=40), mid=st.integers(1, 65535),
       qos=st.integers(0, 1), dup=st.booleans(), retain=st.booleans(),
       props=st.sampled_from([b"\x00", b"\x02\x0b\x05", b"\x05\x03\x00\x02hi"]),
       payload=st.binary(max_size=200))
def test_same_result_as_paho(topic, mid, qos, dup, retain, props, payload):
    fastpath.install()
    header = 0x30 | (0x08 if dup else 0) | (qos << 1) | int(retain)
    packet = bytearray(_publish(topic, mid, qos, props, payload))
    ours = fastpath.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5)
    theirs = fastpath._original(header, bytearray(packet), MQTTProtocolVersion.MQTTv5)
    for field in ("dup", "qos", "retain", "topic", "mid", "payload"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.properties.json() == theirs.properties.json()
    assert isinstance(ours.payload, bytes)
