"""gateway/mqtt/session.py against real Mosquitto: connect, subscribe, QoS 1 both ways,
reconnects, keepalive, the server's limits, refusals, TLS with a private CA."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt5 import (
    ConnAckPacket,
    ConnAckReasonCode,
    DisconnectPacket,
    DisconnectReasonCode,
    PubAckReasonCode,
    PublishPacket,
    QoS,
    RetainHandling,
    SubAckReasonCode,
    TopicFilter,
    Will,
    read,
)

from fieldmqtt import (
    Connected,
    ConnectionLostError,
    ConnectRefusedError,
    Event,
    Message,
    MqttSession,
    PacketTooLargeError,
    Published,
    SessionConfig,
    Subscribed,
    WindowFullError,
)
from gateway.mosquitto import Mosquitto
from tests.mqtt_helpers import SLACK

Q1 = QoS.AT_LEAST_ONCE


def _config(broker: Mosquitto, **kw: Any) -> SessionConfig:
    kw.setdefault("client_id", f"t-{uuid.uuid4().hex[:10]}")
    return SessionConfig(host="127.0.0.1", port=broker.port, **kw)


class Driver:
    """Several sessions in one select loop, as the gateway will run them; events kept."""

    def __init__(self, *sessions: MqttSession) -> None:
        self.sessions = list(sessions)
        self.events: dict[int, list[Event]] = {id(s): [] for s in sessions}

    def of(self, s: MqttSession) -> list[Event]:
        return self.events[id(s)]

    def messages(self, s: MqttSession) -> list[Message]:
        return [e for e in self.of(s) if isinstance(e, Message)]

    def until(self, done: Callable[[], bool], timeout: float = 10,
              on_message: Callable[[MqttSession, Message], None] | None = None) -> None:
        deadline = time.monotonic() + timeout * SLACK
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met")
            live = [s for s in self.sessions if s.fileno() >= 0]
            wait = min([s.next_timeout() for s in live] + [0.2])
            select.select(live, [s for s in live if s.wants_write()], [], wait)
            for s in live:
                for e in s.step():
                    self.of(s).append(e)
                    if on_message is not None and isinstance(e, Message):
                        on_message(s, e)


def connected(broker: Mosquitto, **kw: Any) -> tuple[MqttSession, Driver]:
    s = MqttSession(_config(broker, **kw))
    s.connect()
    d = Driver(s)
    d.until(lambda: s.connected)
    return s, d


def subscribed(s: MqttSession, d: Driver, filters: list[TopicFilter], **kw: Any) -> Subscribed:
    pid = s.subscribe(filters, **kw)
    d.until(lambda: pid not in s.pending_subscriptions)
    return next(e for e in d.of(s) if isinstance(e, Subscribed) and e.packet_id == pid)


@pytest.fixture
def topic() -> str:
    return f"t/{uuid.uuid4().hex[:8]}"


def test_subscribe_options_and_subscription_identifiers(site, topic):
    s, d = connected(site)
    # A retained message is there before the subscriptions.
    pub, dp = connected(site)
    pub.publish(f"{topic}/r", b"kept", qos=1, retain=True)
    dp.until(lambda: any(isinstance(e, Published) for e in dp.of(pub)))

    never = subscribed(s, d, [TopicFilter(f"{topic}/r", max_qos=Q1,
                                          retain_handling=RetainHandling.SEND_NEVER)])
    a = subscribed(s, d, [TopicFilter(f"{topic}/+", max_qos=Q1, no_local=True)],
                   subscription_id=7)
    b = subscribed(s, d, [TopicFilter(f"{topic}/x", max_qos=QoS.AT_MOST_ONCE)],
                   subscription_id=9)
    assert never.reason_codes == (SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,)
    assert a.reason_codes == (SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,)
    assert b.reason_codes == (SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE,)

    s.publish(f"{topic}/x", b"mine", qos=1)  # no-local: not delivered back to us via +
    pub.publish(f"{topic}/x", b"theirs", qos=1, content_type="text/plain",
                user_properties=[("k", "v")])
    both = Driver(s, pub)
    both.until(lambda: any(m.payload == b"theirs" for m in both.messages(s)))
    s.publish(f"{topic}/end", b"end", qos=0)
    pub.publish(f"{topic}/end", b"end", qos=1)
    both.until(lambda: any(m.payload == b"end" for m in both.messages(s)))

    got = both.messages(s)
    assert not any(m.retain for m in got)  # SEND_NEVER kept the retained message back
    theirs = [m for m in got if m.payload == b"theirs"]
    # Overlapping subscriptions: Mosquitto sends one copy per subscription, each naming it.
    assert sorted(i for m in theirs for i in m.subscription_ids) == [7, 9]
    assert all(m.content_type == "text/plain" and m.user_properties == (("k", "v"),)
               for m in theirs)
    # Our own "mine" came back only through the subscription without no-local (id 9).
    assert [m.subscription_ids for m in got if m.payload == b"mine"] == [(9,)]
    s.disconnect()
    pub.disconnect()


def test_unacked_qos1_is_redelivered_with_dup_after_a_dropped_connection(site, topic):
    s, d = connected(site, clean_start=False, session_expiry=300)
    subscribed(s, d, [TopicFilter(f"{topic}/#", max_qos=Q1)])
    pub, dp = connected(site)
    for i in range(4):
        pub.publish(f"{topic}/m", str(i).encode(), qos=1)
    dp.until(lambda: pub.in_flight == 0)
    d.until(lambda: len(d.messages(s)) == 4)
    first = d.messages(s)
    for m in first[:2]:
        s.ack(m)  # manual ack of two of four
    d.until(lambda: not s.wants_write())

    s.connect()  # drop the connection without DISCONNECT, then connect again
    d.until(lambda: s.connected)
    assert next(e for e in d.of(s) if isinstance(e, Connected) and e is not d.of(s)[0]) \
        .session_present
    d.until(lambda: len(d.messages(s)) == 6)
    again = d.messages(s)[4:]
    assert [m.payload for m in again] == [b"2", b"3"]
    assert all(m.duplicate for m in again)
    # An ack for a message of the old connection is not sent on the new one.
    s.ack(first[2])
    assert not s.wants_write()
    for m in again:
        s.ack(m)
    d.until(lambda: not s.wants_write())
    s.disconnect(session_expiry=0)
    pub.disconnect()


def test_publish_window_honours_the_servers_receive_maximum(tmp_path, topic):
    broker = Mosquitto(tmp_path, "rm", extra="max_inflight_messages 5\n").start()
    try:
        sub, ds = connected(broker)
        subscribed(sub, ds, [TopicFilter(f"{topic}/#", max_qos=Q1)])
        s, d = connected(broker, max_inflight=100)
        assert d.of(s)[0] == Connected(False, 5, None, 60, None)
        assert s.window == 5
        for i in range(5):
            s.publish(f"{topic}/m", str(i).encode(), qos=1)
        with pytest.raises(WindowFullError):
            s.publish(f"{topic}/m", b"too many", qos=1)
        sent = 5
        while sent < 40:
            d.until(s.can_publish)
            s.publish(f"{topic}/m", str(sent).encode(), qos=1)
            sent += 1
        d.until(lambda: s.in_flight == 0)
        acks = [e for e in d.of(s) if isinstance(e, Published)]
        assert len(acks) == 40
        assert all(a.reason_code == PubAckReasonCode.SUCCESS for a in acks)
        ds.until(lambda: len(ds.messages(sub)) >= 40,
                 on_message=lambda ss, m: ss.ack(m))
        assert [m.payload for m in ds.messages(sub)] == [str(i).encode() for i in range(40)]
    finally:
        broker.stop()


def test_publish_while_disconnected_goes_out_after_connack_and_resends_in_flight(site, topic):
    sub, ds = connected(site)
    subscribed(sub, ds, [TopicFilter(f"{topic}/#", max_qos=Q1)])
    s = MqttSession(_config(site))
    s.publish(f"{topic}/m", b"early", qos=1)  # before any connection: kept, not sent
    assert s.in_flight == 1 and s.fileno() == -1
    s.connect()
    d = Driver(s, sub)
    d.until(lambda: s.in_flight == 0)
    # Written and flushed, then the connection drops before the PUBACKs are read: both go
    # again after the next CONNACK, and the broker acknowledges each.
    for i in range(3):
        s.publish(f"{topic}/m", str(i).encode(), qos=1)
    s.step()
    s.connect()
    d.until(lambda: s.in_flight == 0 and len(d.messages(sub)) >= 4)
    assert {m.payload for m in d.messages(sub)} == {b"early", b"0", b"1", b"2"}
    s.disconnect()
    sub.disconnect()


def test_resend_after_reconnect_sets_dup_when_the_session_is_present():
    # What a broker cannot show: the DUP bit on the wire. A one-connection-at-a-time
    # listener answers CONNACK (session present) and records the PUBLISHes it reads.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    s = MqttSession(SessionConfig(host="127.0.0.1", port=port, client_id="dup",
                                  clean_start=False, session_expiry=60))
    seen: list[PublishPacket] = []

    def serve_once() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5 * SLACK)
        buf = b""
        while True:  # CONNECT
            buf += conn.recv(4096)
            try:
                _, used = read(memoryview(buf))
                buf = buf[used:]
                break
            except IndexError:
                continue
        conn.sendall(ConnAckPacket(session_present=True).write())
        while not seen or len(seen) % 2:
            try:
                p, used = read(memoryview(buf))
            except IndexError:
                buf += conn.recv(4096)
                continue
            buf = buf[used:]
            assert isinstance(p, PublishPacket)
            seen.append(p)
            if len(seen) == 2:
                break
        conn.close()

    s.publish("a", b"1", qos=1)
    s.publish("b", b"2", qos=1)
    s.connect()
    listener.setblocking(True)
    t = threading.Thread(target=serve_once)
    t.start()
    d = Driver(s)
    with pytest.raises(ConnectionLostError):
        d.until(lambda: False, timeout=5)
    t.join()
    seen_first = list(seen)
    seen.clear()
    s.connect()
    t = threading.Thread(target=serve_once)
    t.start()
    with pytest.raises(ConnectionLostError):
        d.until(lambda: False, timeout=5)
    t.join()
    listener.close()
    assert [(p.topic, p.duplicate) for p in seen_first] == [("a", False), ("b", False)]
    assert [(p.topic, p.packet_id, p.duplicate) for p in seen] == \
        [("a", seen_first[0].packet_id, True), ("b", seen_first[1].packet_id, True)]


def test_keepalive_pings_keep_an_idle_link_up(site):
    s, d = connected(site, keepalive=1)
    # Mosquitto drops a client silent for 1.5 keepalives; three answered pings prove the
    # link stayed up across that.
    d.until(lambda: s.pongs >= 3, timeout=15)
    assert s.connected
    assert s.pings_sent >= 3
    s.disconnect()


def test_servers_maximum_packet_size_is_honoured(tmp_path, topic):
    broker = Mosquitto(tmp_path, "mps", extra="max_packet_size 2000\n").start()
    try:
        s, d = connected(broker)
        assert s.server_max_packet == 2000
        with pytest.raises(PacketTooLargeError) as err:
            s.publish(f"{topic}/big", b"x" * 3000, qos=1)
        assert err.value.limit == 2000
        assert s.in_flight == 0  # nothing was taken
        s.publish(f"{topic}/small", b"x" * 1000, qos=1)
        d.until(lambda: s.in_flight == 0)
        assert s.connected
        s.disconnect()
    finally:
        broker.stop()


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, "auth", users={"gw": "s3cret"}).start()
    yield broker
    broker.stop()


def test_refused_connack_carries_the_reason_and_good_credentials_connect(auth_broker):
    s = MqttSession(_config(auth_broker, username="gw", password=b"wrong"))
    s.connect()
    with pytest.raises(ConnectRefusedError) as err:
        Driver(s).until(lambda: False)
    assert err.value.reason_code == ConnAckReasonCode.NOT_AUTHORIZED
    assert "refused the connection: Not authorized (0x87)" in str(err.value)
    assert "wrong" not in str(err.value)
    assert s.fileno() == -1

    ok, _ = connected(auth_broker, username="gw", password=b"s3cret")
    assert ok.connected
    ok.disconnect()


def test_will_is_published_when_the_link_drops_and_not_on_disconnect(site, topic):
    sub, ds = connected(site)
    subscribed(sub, ds, [TopicFilter(f"{topic}/status", max_qos=Q1)])
    will = Will(f"{topic}/status", payload=b"offline", qos=Q1)
    s, _ = connected(site, will=will)
    s.disconnect()  # normal DISCONNECT: no will
    s.connect()
    Driver(s).until(lambda: s.connected)
    s.connect()  # dropped without DISCONNECT: the will goes out
    ds.until(lambda: bool(ds.messages(sub)), on_message=lambda ss, m: ss.ack(m))
    assert [m.payload for m in ds.messages(sub)] == [b"offline"]
    s.disconnect()
    sub.disconnect()


def test_a_session_taken_over_ends_with_connection_lost_and_can_connect_again(site):
    s, d = connected(site, client_id="twin")
    other, _ = connected(site, client_id="twin")
    # Mosquitto 2.0.11 closes the socket without a DISCONNECT (no reason code) here.
    with pytest.raises(ConnectionLostError, match="closed the connection"):
        d.until(lambda: False)
    assert s.fileno() == -1 and not s.connected
    other.disconnect()
    s.connect()
    d.until(lambda: s.connected)
    s.disconnect(DisconnectReasonCode.NORMAL_DISCONNECTION)


# -- TLS with a private CA ----------------------------------------------------------------------

def test_tls_with_a_private_ca_and_password(tmp_path, pki, topic):
    broker = Mosquitto(tmp_path, "tls", tls=pki, users={"gw": "pw"}).start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki[0]))
        s, d = connected(broker, tls=ctx, username="gw", password=b"pw")
        subscribed(s, d, [TopicFilter(f"{topic}/#", max_qos=Q1)])
        payload = bytes(range(256)) * 64  # 16 KiB: more than one TLS record
        for _ in range(20):
            s.publish(f"{topic}/m", payload, qos=1)
        d.until(lambda: len(d.messages(s)) == 20, on_message=lambda ss, m: ss.ack(m))
        assert all(m.payload == payload for m in d.messages(s))
        d.until(lambda: s.in_flight == 0)
        s.disconnect()

        untrusting = MqttSession(_config(broker, tls=ssl.create_default_context(),
                                         username="gw", password=b"pw"))
        untrusting.connect()
        with pytest.raises(ConnectionLostError, match="CERTIFICATE_VERIFY_FAILED"):
            Driver(untrusting).until(lambda: False)
    finally:
        broker.stop()


# mqtt5 0.8 leaves the UnicodeDecodeError behind as an "unraisable" exception before it
# panics; that is the library's, not ours, so this one test lets it pass.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_malformed_packet_from_the_server_ends_the_connection_with_a_reason():
    # Mosquitto never sends a topic that is not UTF-8; mqtt5 0.8 panics on one (a
    # BaseException). A listener that answers CONNACK and then such a PUBLISH shows the
    # session turns that into one error and a DISCONNECT with MALFORMED_PACKET.
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5 * SLACK)
        conn.recv(4096)  # CONNECT
        conn.sendall(ConnAckPacket().write() + b"\x30\x06\x00\x02\xff\xfe\x00x")
        while chunk := conn.recv(4096):
            got.append(chunk)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    s = MqttSession(SessionConfig(host="127.0.0.1", port=listener.getsockname()[1],
                                  client_id="m"))
    s.connect()
    with pytest.raises(ConnectionLostError) as err:
        Driver(s).until(lambda: False)
    t.join()
    listener.close()
    assert err.value.reason_code == DisconnectReasonCode.MALFORMED_PACKET
    packet, _ = read(memoryview(b"".join(got)))
    assert isinstance(packet, DisconnectPacket)
    assert packet.reason_code == DisconnectReasonCode.MALFORMED_PACKET
