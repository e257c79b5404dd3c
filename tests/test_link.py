"""The MQTT link against real Mosquitto: backoff per attempt, and why a link was lost."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest
from mqtt5 import ConnAckPacket, DisconnectPacket, DisconnectReasonCode

from fieldmqtt import PacketTooLargeError
from gateway.backoff import Backoff
from gateway.config import Link
from gateway.mosquitto import Mosquitto
from gateway.mqtt.link import MqttLink, poll_links


def _drive(link: MqttLink, until: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "condition not reached"
        poll_links([link], 0.02)


def test_a_refused_connack_advances_the_backoff_once(tmp_path, caplog):
    broker = Mosquitto(tmp_path, "auth", users={"gw": "right"}).start()
    try:
        backoff = Backoff(0.001, 0.002)
        link = MqttLink(name="site", link=Link(url=broker.url), client_id="refused",
                        clean_start=True, backoff=backoff)
        _drive(link, lambda: link.failures >= 4)
        # One step of backoff per refused attempt (it was two: CONNACK and the disconnect).
        assert backoff.attempts in (link.failures, link.failures + 1)
        link.close()
    finally:
        broker.stop()
    assert any("refused the connection: Not authorized" in r.getMessage()
               for r in caplog.records)
    caplog.clear()  # the refusal is logged as an error, on purpose


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path, "b").start()
    yield b
    b.stop()


def _connected(broker: Mosquitto, client_id: str) -> MqttLink:
    link = MqttLink(name="site", link=Link(url=broker.url), client_id=client_id,
                    clean_start=True, backoff=Backoff(5, 5))
    _drive(link, lambda: link.connected)
    return link


def _lost_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Lost ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_killed_broker_is_reported_with_what_the_socket_saw(broker, caplog):
    caplog.set_level(logging.WARNING, "gateway")
    link = _connected(broker, "killed")
    assert broker.proc is not None
    broker.proc.kill()
    broker.proc.wait()
    _drive(link, lambda: not link.connected)
    line = _lost_line(caplog)
    assert "Unspecified error" not in line
    assert "the broker closed the connection" in line or "reset" in line, line
    link.close()


def test_a_disconnect_from_the_broker_names_its_reason_code(caplog):
    # Mosquitto 2.0 closes without a DISCONNECT in the cases a test can cause, so a listener
    # plays the broker: CONNACK, then DISCONNECT 0x95 with a reason string.
    caplog.set_level(logging.WARNING, "gateway")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(30)
        conn.recv(4096)  # CONNECT
        conn.sendall(ConnAckPacket().write() + DisconnectPacket(
            reason_code=DisconnectReasonCode.PACKET_TOO_LARGE, reason_str="1 MB max").write())
        conn.recv(4096)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    port = listener.getsockname()[1]
    link = MqttLink(name="cloud", link=Link(url=f"mqtt://127.0.0.1:{port}"),
                    client_id="told", clean_start=True, backoff=Backoff(5, 5))
    _drive(link, lambda: link.connects == 1 and not link.connected)
    link.close()
    t.join()
    listener.close()
    line = _lost_line(caplog)
    assert "broker sent DISCONNECT: Packet too large (0x95): '1 MB max'" in line, line


def test_a_publish_over_the_brokers_maximum_packet_size_is_refused_before_sending(tmp_path):
    broker = Mosquitto(tmp_path, "small", extra="max_packet_size 1000\n").start()
    try:
        link = _connected(broker, "too-large")
        assert link.server_max_packet == 1000
        with pytest.raises(PacketTooLargeError):
            link.publish("a/b", b"x" * 2000)
        link.publish("a/b", b"x" * 500)  # the link is still up and usable
        _drive(link, lambda: link.pending_publishes() == 0)
        assert link.connected
        link.close()
    finally:
        broker.stop()
