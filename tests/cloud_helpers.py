"""Helpers for the cloud ingest tests and bench: the worker as a real process, and a fleet
of fake gateways publishing uplink in the real format (README "Uplink")."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mosquitto import free_port
from tests.mqtt_helpers import SLACK

ROOT = Path(__file__).resolve().parents[1]
READY = "Ready: subscribed"
BASE_TS = 1_732_600_000.0


def wait_for(cond: Any, timeout: float = 60) -> bool:
    """Poll an outcome; the bound (times SLACK) only catches a hang."""
    deadline = time.monotonic() + timeout * SLACK
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


class IngestProcess:
    """`gateway cloud ingest` as a real process with its own client id and /metrics port."""

    def __init__(self, config: Path, client_id: str, workdir: Path) -> None:
        self.config = config
        self.client_id = client_id
        self.metrics_port = free_port()
        self.stderr = workdir / f"{client_id}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_errors: list[str] = []

    def start(self) -> IngestProcess:
        before = self.log().count(READY)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "cloud", "ingest", "-c", str(self.config),
             "--client-id", self.client_id, "--metrics", f"127.0.0.1:{self.metrics_port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.stderr.open("ab"))
        deadline = time.monotonic() + 30 * SLACK
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log()}")
            if self.log().count(READY) > before:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"worker not ready: {self.log()}")

    def log(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30 * SLACK)

    def unexpected_errors(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if (" ERROR " in line or line.startswith("Traceback"))
                and not any(text in line for text in self.expected_errors)]


def write_config(path: Path, *, broker_url: str, influx: dict[str, Any], state: Path,
                 **extra: Any) -> Path:
    cfg: dict[str, Any] = {"broker": {"url": broker_url}, "group": "ingest-test",
                           "influx": {"backoff_min": "100ms", "backoff_max": "500ms",
                                      **influx},
                           "state_path": str(state), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def readings(gateway: str, first: int, count: int, *, devices: int = 4) -> list[dict[str, Any]]:
    """``count`` readings from seq ``first``: every seq a distinct point (its own ms)."""
    return [{"seq": s, "device": f"{gateway}-d{s % devices}", "ts": BASE_TS + s / 1000,
             "temp": round(20 + (s % 100) / 10, 1), "hum": s % 60}
            for s in range(first, first + count)]


class FleetPublisher:
    """Fake gateways: uplink batches on ``fieldgate/<id>/telemetry`` as the uplink sink
    sends them (payload, content type, seq_first/seq_last), QoS 1, PUBACKs awaited."""

    def __init__(self, port: int, client_id: str = "") -> None:
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=client_id, protocol=paho.MQTTv5)
        self.c.max_inflight_messages_set(500)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.infos: list[Any] = []

    def batch(self, gateway: str, rows: list[dict[str, Any]], *,
              extra: list[tuple[str, str]] | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.UserProperty = [("seq_first", str(rows[0]["seq"])),
                              ("seq_last", str(rows[-1]["seq"])), *(extra or [])]
        payload = orjson.dumps({"gateway": gateway, "readings": rows})
        self.send(f"fieldgate/{gateway}/telemetry", payload, props)

    def send(self, topic: str, payload: bytes, props: Properties | None = None,
             retain: bool = False) -> None:
        if len(self.infos) >= 2000:
            self.wait()
        self.infos.append(self.c.publish(topic, payload, qos=1, properties=props,
                                         retain=retain))

    def wait(self) -> None:
        for info in self.infos:
            info.wait_for_publish(30 * SLACK)
        self.infos.clear()

    def close(self) -> None:
        self.wait()
        self.c.disconnect()
        self.c.loop_stop()


class FakeGateway:
    """A gateway's resend side as ISSUE12.md specifies it: on ``fieldgate/<id>/resend`` it
    re-publishes what ``log`` holds in the range (user property ``resend``) and replies to
    the Response Topic with the Correlation Data."""

    def __init__(self, port: int, gateway: str, log: dict[int, dict[str, Any]],
                 publisher: FleetPublisher) -> None:
        self.gateway = gateway
        self.log = log
        self.publisher = publisher
        self.requests: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=paho.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *_: self._subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(f"fieldgate/{gateway}/resend", qos=1)
        if not self._subscribed.wait(30):
            raise TimeoutError("fake gateway got no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        request = orjson.loads(msg.payload)
        self.requests.append(request)
        first, last = request["from"], request["to"]
        held = [self.log[s] for s in range(first, last + 1) if s in self.log]
        for i in range(0, len(held), 50):
            self.publisher.batch(self.gateway, held[i:i + 50],
                                 extra=[("resend", request["request_id"])])
        missing: list[list[int]] = []
        for s in range(first, last + 1):
            if s not in self.log:
                if missing and missing[-1][1] == s - 1:
                    missing[-1][1] = s
                else:
                    missing.append([s, s])
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        reply = {"request_id": request["request_id"], "from": first, "to": last,
                 "resent": len(held), "missing": missing}
        self.c.publish(msg.properties.ResponseTopic, orjson.dumps(reply), qos=1,
                       properties=props)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
