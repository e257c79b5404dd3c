"""The MQTT link against real Mosquitto: backoff per attempt, and why a link was lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from gateway.config import Link
from gateway.mosquitto import Mosquitto
from gateway.mqtt.link import Backoff, MqttLink, poll_links


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


def test_a_disconnect_from_the_broker_names_its_reason_code(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "gateway")
    broker = Mosquitto(tmp_path, "small", extra="max_packet_size 1000\n").start()
    try:
        link = _connected(broker, "too-large")
        link.publish("a/b", b"x" * 2000)  # Mosquitto answers with DISCONNECT 0x95
        link.flush()
        _drive(link, lambda: not link.connected)
        line = _lost_line(caplog)
        assert "broker sent DISCONNECT: Packet too large (0x95)" in line, line
        link.close()
    finally:
        broker.stop()
