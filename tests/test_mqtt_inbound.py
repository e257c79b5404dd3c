"""Our PUBLISH reader agrees with paho's decoder, and leaves to paho what it must."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion

from gateway.mqtt.inbound import parse_publish


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet_bytes(topic: bytes, mid: int, qos: int, dup: bool, props: bytes,
                  payload: bytes) -> tuple[int, bytes]:
    header = 0x30 | (0x08 if dup else 0) | (qos << 1)
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    body += props + payload
    return header, bytes([header]) + _varint(len(body)) + body


@given(topic=st.text(min_size=1, max_size=30).map(str.encode), mid=st.integers(1, 65535),
       qos=st.integers(0, 1), dup=st.booleans(), payload=st.binary(max_size=400),
       prefix=st.binary(max_size=5))
def test_agrees_with_paho(topic, mid, qos, dup, payload, prefix):
    header, raw = _packet_bytes(topic, mid, qos, dup, b"\x00", payload)
    buf = prefix + raw + b"\x30"  # a packet before (skipped via pos) and a partial one after
    ours = parse_publish(buf, len(prefix), True)
    assert ours is not None
    decoded = _packet.decode_publish(header, bytearray(_strip_fixed_header(raw)),
                                     MQTTProtocolVersion.MQTTv5)
    assert ours.end == len(prefix) + len(raw)
    assert ours.topic == decoded.topic.decode()
    assert ours.payload == decoded.payload
    assert (ours.qos, ours.mid, ours.dup) == (decoded.qos, decoded.mid, decoded.dup)


def _strip_fixed_header(raw: bytes) -> bytes:
    i = 1
    while raw[i] & 0x80:
        i += 1
    return raw[i + 1:]


@given(cut=st.integers(0, 60))
def test_incomplete_packets_are_left_alone(cut):
    _, raw = _packet_bytes(b"sensors/d/telemetry", 7, 1, False, b"\x00", b'{"t": 1}')
    if cut < len(raw):
        assert parse_publish(raw[:cut], 0, True) is None


def test_left_to_paho():
    # properties present, QoS 2, not a PUBLISH, topic not UTF-8
    assert parse_publish(_packet_bytes(b"t", 1, 1, False, b"\x02\x0b\x05", b"x")[1], 0, True) \
        is None
    raw = bytearray(_packet_bytes(b"t", 1, 1, False, b"\x00", b"x")[1])
    raw[0] = 0x34  # QoS 2
    assert parse_publish(bytes(raw), 0, True) is None
    assert parse_publish(b"\x40\x02\x00\x01", 0, True) is None  # PUBACK
    assert parse_publish(_packet_bytes(b"\xff\xfe", 1, 1, False, b"\x00", b"x")[1], 0, True) \
        is None
