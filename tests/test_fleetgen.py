"""`devices simulate-gateways` against a real Mosquitto: what a cloud worker subscribes to is
the uplink format, exactly (seqs, properties, content types, gzip, retained status), and the
gaps and resends it promises are the ones that happen."""

from __future__ import annotations

import gzip
import itertools
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mosquitto import Mosquitto
from tests.mqtt_helpers import SLACK

ROOT = Path(__file__).resolve().parents[1]
START = 1_732_600_000.0


class Cloud:
    """A cloud-side subscriber on fieldgate/# that keeps every message with its properties."""

    def __init__(self, port: int, topic: str = "fieldgate/#") -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=paho.MQTTv5, client_id=f"cloud-{uuid.uuid4().hex[:8]}")
        self.c.on_message = self._on_message
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *_: subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()
        assert subscribed.wait(30), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        with self.lock:
            self.messages.append({
                "topic": msg.topic, "payload": msg.payload, "retain": msg.retain,
                "qos": msg.qos,
                "content_type": getattr(props, "ContentType", None),
                "user": dict(getattr(props, "UserProperty", [])),
                "response_topic": getattr(props, "ResponseTopic", None),
                "correlation": getattr(props, "CorrelationData", None),
            })
        self.on_message(msg)

    def on_message(self, msg: paho.MQTTMessage) -> None:
        pass

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, cond: Any, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout * SLACK
        while not cond():
            assert time.monotonic() < deadline, "condition not met"
            time.sleep(0.05)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def cloud(tmp_path: Path):
    broker = Mosquitto(tmp_path, "cloud").start()
    yield broker
    broker.stop()


def _run(broker: Mosquitto, tmp_path: Path, *args: str, timeout: float = 120
         ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / f"report-{uuid.uuid4().hex[:6]}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "devices", "simulate-gateways", "--broker", broker.url,
         "--report", str(report), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout * SLACK)
    assert proc.returncode == 0, proc.stderr
    return proc, orjson.loads(report.read_bytes())


def _seqs_by_gateway(messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Every seq each gateway's telemetry and events carried, as a consumer reads them,
    checking the format of each message on the way."""
    seqs: dict[str, list[int]] = {}
    for m in messages:
        parts = m["topic"].split("/")
        assert parts[0] == "fieldgate"
        gateway, kind = parts[1], parts[2]
        assert m["qos"] == 1
        if kind == "telemetry":
            assert m["content_type"] == "application/json"
            payload = m["payload"]
            if m["user"].get("content-encoding") == "gzip":
                payload = gzip.decompress(payload)
            body = orjson.loads(payload)
            assert body["gateway"] == gateway
            got = [r["seq"] for r in body["readings"]]
            assert got == list(range(got[0], got[0] + len(got))), "a batch's seqs run on"
            assert m["user"]["seq_first"] == str(got[0])
            assert m["user"]["seq_last"] == str(got[-1])
            for r in body["readings"]:
                assert set(r) == {"seq", "device", "ts", "temp", "hum"}
                assert isinstance(r["ts"], float) and r["ts"] >= START
            seqs.setdefault(gateway, []).extend(got)
        elif kind == "events":
            assert m["content_type"] == "application/cloudevents+json"
            event = orjson.loads(m["payload"])
            assert parts[3] == event["type"]
            assert event["specversion"] == "1.0"
            assert event["source"] == f"fieldgate://{gateway}"
            assert event["id"] == f"{gateway}-{event['seq']:012d}"
            assert m["user"]["seq_first"] == m["user"]["seq_last"] == str(event["seq"])
            seqs.setdefault(gateway, []).append(event["seq"])
    return seqs


def test_every_gateway_sends_the_uplink_format_with_continuous_seqs(cloud, tmp_path):
    sub = Cloud(cloud.port)
    proc, report = _run(cloud, tmp_path, "--count", "6", "--rate", "60", "--duration",
                        "2s", "--events-every", "25", "--gzip", "--seed", "3",
                        "--batch-interval", "50ms", "--start", str(START))
    total = report["batches"] + report["events"]
    sub.wait_for(lambda: sum("/status" not in m["topic"] for m in sub.snapshot()) >= total)
    messages = sub.snapshot()
    sub.close()

    telemetry = [m for m in messages if m["topic"].endswith("/telemetry")]
    assert telemetry and all(m["user"].get("content-encoding") == "gzip" for m in telemetry)
    assert any("/events/io.fieldgate.alert." in m["topic"] for m in messages)
    seqs = _seqs_by_gateway(messages)
    assert sorted(seqs) == [f"gw-{i}" for i in range(1, 7)]
    for row in report["gateways"]:
        got = seqs[row["gateway"]]
        # Every seq from 1 to the last, once each, in order: nothing skipped or repeated.
        assert got == list(range(1, row["seq_last"] + 1))
        assert row["seq_first"] == 1
        assert row["readings"] + row["events"] == row["seq_last"]
        # 60 readings/s for ~2 s, one batch per 50 ms commit: batches of about 3 readings.
        assert row["batches"] >= 20 and row["readings"] >= 60
    assert sum(len(got) for got in seqs.values()) == report["readings"] + report["events"]
    assert f"sent {report['batches']} batches ({report['readings']} readings" in proc.stdout

    # The birth message came first on each gateway's status topic, retained; a consumer
    # arriving later gets the last one: offline, shutdown.
    for gateway in seqs:
        status = [m for m in messages if m["topic"] == f"fieldgate/{gateway}/status"]
        first = orjson.loads(status[0]["payload"])
        assert first["state"] == "online" and first["gateway"] == gateway
        assert status[0]["content_type"] == "application/json"
    late = Cloud(cloud.port, "fieldgate/+/status")
    late.wait_for(lambda: len(late.snapshot()) >= 6)
    retained = {m["topic"]: m for m in late.snapshot()}
    late.close()
    assert len(retained) == 6 and all(m["retain"] for m in retained.values())
    for topic, m in retained.items():
        body = orjson.loads(m["payload"])
        assert body["state"] == "offline" and body["reason"] == "shutdown"
        assert topic == f"fieldgate/{body['gateway']}/status"
        assert {"version", "ts", "readings", "dead_letters", "undelivered"} <= set(body)


def test_gap_every_leaves_exactly_the_gaps_it_reports(cloud, tmp_path):
    sub = Cloud(cloud.port)
    _, report = _run(cloud, tmp_path, "--count", "4", "--rate", "100", "--duration", "2s",
                     "--gap-every", "5", "--connections", "4", "--batch-interval", "50ms")
    total = report["batches"] + report["events"]
    sub.wait_for(lambda: sum("/status" not in m["topic"] for m in sub.snapshot()) >= total)
    seqs = _seqs_by_gateway(sub.snapshot())
    sub.close()
    for row in report["gateways"]:
        got = seqs[row["gateway"]]
        withheld = [tuple(r) for r in row["withheld"]]
        # About one batch in five: at 100/s and 50 ms commits, ~40 batches in 2 s.
        assert len(withheld) >= 5
        skipped = {s for a, b in withheld for s in range(a, b + 1)}
        assert sorted(set(got) | skipped) == list(range(1, row["seq_last"] + 1))
        assert not set(got) & skipped
        # A consumer sees each withheld range as a jump in seq of exactly that size.
        jumps = [(prev + 1, nxt - 1) for prev, nxt in itertools.pairwise(got)
                 if nxt != prev + 1]
        assert jumps == [w for w in withheld if w[1] < got[-1]]


def test_resend_answers_a_gap_from_its_history(cloud, tmp_path):
    """The cloud worker's side of gap repair: ask for a withheld range, get it back with
    the `resend` property, and a reply on the Response Topic with the Correlation Data."""
    replies: list[dict[str, Any]] = []
    asked: list[tuple[int, int]] = []
    sub = Cloud(cloud.port)
    high: dict[str, int] = {}

    def on_message(msg: paho.MQTTMessage) -> None:
        props = msg.properties
        if msg.topic.endswith("/worker-replies"):
            replies.append({"body": orjson.loads(msg.payload),
                            "correlation": getattr(props, "CorrelationData", None)})
            return
        if not msg.topic.endswith("/telemetry") or msg.topic.split("/")[1] != "gw-1":
            return
        user = dict(getattr(props, "UserProperty", []))
        if "resend" in user:
            return
        first, last = int(user["seq_first"]), int(user["seq_last"])
        if not asked and first > high.get("gw-1", 0) + 1:
            gap = (high["gw-1"] + 1, first - 1)
            asked.append(gap)
            request = Properties(PacketTypes.PUBLISH)
            request.ResponseTopic = "fieldgate/gw-1/worker-replies"
            request.CorrelationData = b"req-1"
            sub.c.publish("fieldgate/gw-1/resend", orjson.dumps(
                {"request_id": "req-1", "from": gap[0], "to": gap[1]}), qos=1,
                properties=request)
        high["gw-1"] = max(high.get("gw-1", 0), last)

    sub.on_message = on_message  # type: ignore[method-assign]
    _, report = _run(cloud, tmp_path, "--count", "2", "--rate", "100", "--duration", "3s",
                     "--gap-every", "10", "--resend", "--batch-interval", "50ms")
    sub.wait_for(lambda: bool(replies))
    messages = sub.snapshot()
    sub.close()
    assert asked, "the run left no gap to ask about"
    gap = asked[0]
    assert [list(gap)] == report["gateways"][0]["withheld"][:1]
    again = [m for m in messages if m["user"].get("resend") == "req-1"]
    assert again and all(m["topic"] == "fieldgate/gw-1/telemetry" for m in again)
    seqs = [r["seq"] for m in again for r in orjson.loads(m["payload"])["readings"]]
    assert seqs == list(range(gap[0], gap[1] + 1))
    reply = replies[0]
    assert reply["correlation"] == b"req-1"
    assert reply["body"] == {"request_id": "req-1", "from": gap[0], "to": gap[1],
                             "resent": gap[1] - gap[0] + 1, "missing": []}
    assert report["gateways"][0]["resend_requests"] == 1


def test_dry_run_is_deterministic_by_seed():
    args = [sys.executable, "-m", "devices", "simulate-gateways", "--count", "3", "--rate",
            "40", "--dry-run", "--duration", "1s", "--start", str(START),
            "--events-every", "10", "--batch-interval", "50ms"]
    one = subprocess.run([*args, "--seed", "5"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    two = subprocess.run([*args, "--seed", "5"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    other = subprocess.run([*args, "--seed", "6"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    assert one == two and one != other
    lines = [orjson.loads(line) for line in one.splitlines()]
    # 40 readings/s for 1 s per gateway (one at t = 0 too), less what waits for the next
    # 50 ms commit (2 readings at most); with the events, seqs 1..N once each.
    for gateway in ("gw-1", "gw-2", "gw-3"):
        mine = [m for m in lines if m["topic"].startswith(f"fieldgate/{gateway}/")]
        readings = [r for m in mine if m["topic"].endswith("/telemetry")
                    for r in m["payload"]["readings"]]
        assert 39 <= len(readings) <= 41
        seqs = sorted([r["seq"] for r in readings]
                      + [m["payload"]["seq"] for m in mine if "/events/" in m["topic"]])
        assert seqs == list(range(1, len(readings) + len(readings) // 10 + 1))


@pytest.mark.parametrize(("args", "message"), [
    (["--rate", "0"], "--rate must be a positive number"),
    (["--count", "0"], "--count must be 1..100,000"),
    (["--count", "100000000"], "--count must be 1..100,000"),
    (["--gap-every", "1"], "--gap-every must be 0 (no gaps) or 2 or more"),
    (["--broker", "http://x"], "write mqtt://host:port"),
    (["--connections", "5", "--count", "2"], "--connections must be 1..2"),
])
def test_bad_options_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "devices", "simulate-gateways",
                           "--duration", "1s", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
