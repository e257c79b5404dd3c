"""The emulator's MQTT link against real Mosquitto: a broker restarted mid-run, TLS with a
password, and the errors a user sees when the broker cannot be used."""

from __future__ import annotations

import select
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from mqtt5 import QoS, TopicFilter

from devices.fleet import parse_fleet
from devices.generator import FleetModel
from devices.simulator import Simulator
from fieldmqtt import ConnectionLostError, Message, MqttSession, SessionConfig
from gateway.mosquitto import Mosquitto, free_port
from tests.mqtt_helpers import SLACK

ROOT = Path(__file__).resolve().parents[1]


class Watcher:
    """A subscriber on a persistent session: what the broker held for it while it was
    away (also across a restart) arrives when it is back."""

    def __init__(self, broker: Mosquitto) -> None:
        self.session = MqttSession(SessionConfig(
            host="127.0.0.1", port=broker.port, client_id="emulator-watcher",
            clean_start=False, session_expiry=600))
        self.readings: set[tuple[str, float]] = set()
        self.received = 0

    def connect(self) -> None:
        self.session.connect()
        self.until(lambda: self.session.connected)

    def subscribe(self) -> None:
        pid = self.session.subscribe([TopicFilter("sensors/#", max_qos=QoS.AT_LEAST_ONCE)])
        self.until(lambda: pid not in self.session.pending_subscriptions)

    def until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout * SLACK
        while not done():
            assert time.monotonic() < deadline, "condition not met"
            s = self.session
            select.select([s], [s] if s.wants_write() else [], [], 0.1)
            for event in s.step():
                if isinstance(event, Message):
                    self.received += 1
                    device = event.topic.split("/")[1]
                    self.readings.add((device, orjson.loads(event.payload)["ts"]))
                    s.ack(event)


def test_the_emulator_reconnects_after_a_broker_restart_and_loses_no_qos1_reading(tmp_path):
    broker = Mosquitto(tmp_path, "site").start()
    watcher = Watcher(broker)
    try:
        watcher.connect()
        watcher.subscribe()
        fleet = parse_fleet({"seed": 5, "types": {"s": {
            "count": 20, "id": "s-{n}", "interval": "10ms", "qos": 1,
            "metrics": {"temp": {"baseline": 20, "noise": 0.5}}}}})
        said: list[str] = []
        record = (tmp_path / "record.jsonl").open("wb")
        sim = Simulator(FleetModel(fleet, start=time.time()), broker=broker.url, key=None,
                        record=record, say=said.append)
        stop = threading.Event()
        runner = threading.Thread(target=sim.run, args=(0, stop.is_set), daemon=True)
        runner.start()
        watcher.until(lambda: watcher.received >= 500)  # the emulator is in full flow

        broker.stop()
        with pytest.raises(ConnectionLostError):  # the watcher saw it go: it is down
            watcher.until(lambda: False)
        broker.start()
        watcher.connect()
        before = watcher.received
        watcher.until(lambda: sim.stats.reconnects == 1 and watcher.received >= before + 500)
        stop.set()
        runner.join(30 * SLACK)
        assert not runner.is_alive()
        record.close()

        recorded = {(r["device"], r["ts"]) for r in map(
            orjson.loads, (tmp_path / "record.jsonl").read_bytes().splitlines())}
        watcher.until(lambda: recorded <= watcher.readings)
        assert sim.stats.unacked == 0 and sim.stats.dropped == 0
        assert len(recorded) == sim.stats.published
        assert any(line.startswith("Lost the broker") for line in said)
        assert any(line.startswith("Reconnected after") for line in said)
    finally:
        watcher.session.disconnect(session_expiry=0)
        broker.stop()


def _simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devices", "simulate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_tls_with_a_private_ca_and_a_password(tmp_path, pki):
    ca = pki[0]
    broker = Mosquitto(tmp_path, "tls", tls=pki, users={"emu": "s3cret-pw"}).start()
    (tmp_path / "pw").write_text("s3cret-pw\n")
    (tmp_path / "bad").write_text("wrong\n")
    try:
        # A subscriber over the same TLS listener sees what the emulator sends.
        watcher = MqttSession(SessionConfig(
            host="127.0.0.1", port=broker.port, client_id="tls-watcher", username="emu",
            password=b"s3cret-pw", tls=ssl.create_default_context(cafile=str(ca))))
        watcher.connect()
        watcher.run_until(lambda: watcher.connected, 30 * SLACK)
        pid = watcher.subscribe([TopicFilter("sensors/#", max_qos=QoS.AT_LEAST_ONCE)])
        watcher.run_until(lambda: pid not in watcher.pending_subscriptions, 30 * SLACK)

        ok = _simulate("--broker", broker.url, "--ca-file", str(ca), "--username", "emu",
                       "--password-file", str(tmp_path / "pw"), "--devices", "5",
                       "--rate", "100", "--duration", "1s",
                       "--record", str(tmp_path / "rec.jsonl"))
        assert ok.returncode == 0, ok.stderr
        recorded = (tmp_path / "rec.jsonl").read_bytes().splitlines()
        assert len(recorded) > 20
        got: list[Message] = []
        deadline = time.monotonic() + 30 * SLACK
        while len(got) < len(recorded) and time.monotonic() < deadline:
            got += [e for e in watcher.run_once(0.2) if isinstance(e, Message)]
        assert sorted(orjson.loads(m.payload)["ts"] for m in got) == \
            sorted(orjson.loads(line)["ts"] for line in recorded)
        watcher.disconnect()

        bad = _simulate("--broker", broker.url, "--ca-file", str(ca), "--username", "emu",
                        "--password-file", str(tmp_path / "bad"), "--duration", "1s")
        assert bad.returncode == 1
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
        assert "refused the connection" in bad.stderr and "wrong" not in bad.stderr

        # The system's CAs do not know the private CA: the handshake fails, one line.
        untrusted = _simulate("--broker", broker.url, "--username", "emu",
                              "--password-file", str(tmp_path / "pw"), "--duration", "1s")
        assert untrusted.returncode == 1
        assert "certificate verify failed" in untrusted.stderr.lower()
        assert untrusted.stderr.count("\n") == 1
    finally:
        broker.stop()


def test_no_broker_and_bad_options_are_one_line_errors(tmp_path):
    gone = _simulate("--broker", f"mqtt://127.0.0.1:{free_port()}", "--duration", "1s")
    assert gone.returncode == 1 and gone.stderr.startswith("error: cannot reach broker")
    assert gone.stderr.count("\n") == 1
    plain = _simulate("--broker", "mqtt://127.0.0.1:1883", "--ca-file", "ca.pem")
    assert plain.returncode == 2 and "needs an mqtts:// broker" in plain.stderr
    nouser = (tmp_path / "pw")
    nouser.write_text("x\n")
    lonely = _simulate("--password-file", str(nouser))
    assert lonely.returncode == 2 and "a password needs a username" in lonely.stderr
