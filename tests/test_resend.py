"""Gap repair end to end with real Mosquitto: a cloud consumer asks `gateway run` on
``fieldgate/<id>/resend`` for a seq range and gets it again, from the gateway's log."""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mosquitto import Mosquitto
from tests.mqtt_helpers import SLACK, CloudCollector, Publisher


class Worker:
    """A cloud consumer of one gateway's uplink: keeps every telemetry message (readings
    and user properties, in arrival order) and the answers to its resend requests."""

    _count = 0

    def __init__(self, port: int, gateway_id: str, *, persistent: bool = False) -> None:
        Worker._count += 1
        self.gateway_id = gateway_id
        self.messages: list[tuple[dict[str, str], list[dict[str, Any]]]] = []
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.online = threading.Event()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=paho.MQTTv5, client_id=f"worker-{Worker._count}")
        self.c.max_inflight_messages_set(200)
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *_: c.subscribe(
            [(f"fieldgate/{gateway_id}/telemetry", 1), (f"fieldgate/{gateway_id}/status", 1),
             (f"fieldgate/{gateway_id}/resend/reply", 1), ("worker/replies", 1)])
        self.c.on_subscribe = lambda *_: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.c.loop_start()
        if not self._subscribed.wait(30):
            raise TimeoutError("worker got no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        with self._lock:
            if msg.topic.endswith("/telemetry"):
                props = dict(getattr(msg.properties, "UserProperty", []))
                self.messages.append((props, body["readings"]))
            elif msg.topic.endswith("/status"):
                if body.get("state") == "online":
                    self.online.set()
            else:
                corr = getattr(msg.properties, "CorrelationData", b"") or b""
                self.replies[bytes(corr)] = {"topic": msg.topic, **body}

    def ask(self, request_id: str, first: int, last: int, *,
            response_topic: str | None = "worker/replies") -> None:
        self.send(orjson.dumps({"request_id": request_id, "from": first, "to": last}),
                  correlation=request_id.encode(), response_topic=response_topic)

    def send(self, payload: bytes, *, correlation: bytes | None = None,
             response_topic: str | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.c.publish(f"fieldgate/{self.gateway_id}/resend", payload, qos=1,
                       properties=props).wait_for_publish(30)

    def reply(self, correlation: bytes, timeout: float = 30) -> dict[str, Any]:
        assert CloudCollector.wait_for(lambda: correlation in self.replies, timeout), \
            f"no reply to {correlation!r}"
        return self.replies[correlation]

    def seqs(self, *, resend: str | None) -> list[int]:
        """Seqs of the messages re-sent for request ``resend`` (None: the live uplink's)."""
        with self._lock:
            return [r["seq"] for props, readings in self.messages
                    if props.get("resend") == resend for r in readings]

    def readings(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {r["seq"]: r for _, readings in self.messages for r in readings}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _publish(site: Mosquitto, count: int, *, per_message: int = 1, start: int = 0) -> None:
    """``count`` readings to the site broker, ``per_message`` to a JSON array."""
    pub = Publisher(site.port)
    rng = random.Random(start)
    for i in range(start, start + count, per_message):
        batch = [{"i": j, "temp": round(rng.uniform(0, 40), 3), "hum": rng.random()}
                 for j in range(i, min(i + per_message, start + count))]
        pub.publish("sensors/dev-1/telemetry", orjson.dumps(batch))
    pub.close()


def _start(site: Mosquitto, cloud: Mosquitto, make_gateway: Any, **overrides: Any) -> Any:
    gw = make_gateway(site, cloud, **overrides).start()
    worker = Worker(cloud.port, gw.gateway_id)
    # The gateway subscribes to resend requests before it publishes "online".
    assert worker.online.wait(30 * SLACK), gw.log()
    return gw, worker


def _delivered(gw: Any, worker: Worker, total: int) -> None:
    assert CloudCollector.wait_for(lambda: len(worker.readings()) >= total, 30), \
        f"{len(worker.readings())} of {total} arrived; gateway log:\n{gw.log()}"


def test_a_delivered_range_is_resent_with_the_resend_property(site, cloud, make_gateway):
    gw, worker = _start(site, cloud, make_gateway)
    _publish(site, 2000, per_message=10)
    _delivered(gw, worker, 2000)
    live_before = worker.seqs(resend=None)
    original = worker.readings()

    worker.ask("r-1", 101, 600)
    reply = worker.reply(b"r-1")
    assert reply == {"topic": "worker/replies", "request_id": "r-1", "from": 101, "to": 600,
                     "resent": 500, "missing": []}
    again = worker.seqs(resend="r-1")
    assert sorted(again) == list(range(101, 601))     # exactly those, each once
    with worker._lock:
        resent_msgs = [(p, rs) for p, rs in worker.messages if p.get("resend") == "r-1"]
    for props, readings in resent_msgs:   # the uplink's format: seq_first/last, same bytes
        assert props["seq_first"] == str(readings[0]["seq"])
        assert props["seq_last"] == str(readings[-1]["seq"])
        assert all(r == original[r["seq"]] for r in readings)
    # The uplink's cursor did not move back: the live uplink sent nothing again, and what
    # comes next continues after 2000.
    _publish(site, 10, start=2000)
    _delivered(gw, worker, 2010)
    live = worker.seqs(resend=None)
    assert live == live_before + list(range(2001, 2011))
    assert gw.metric('fieldgate_resend_requests_total{result="done"}') == 1
    assert gw.metric("fieldgate_resent_records_total") == 500
    assert gw.log().count("Resend 'r-1': seq 101-600: 500 records re-sent") == 1
    assert gw.stop() == 0
    worker.close()


def test_a_range_partly_removed_at_the_log_cap_answers_what_is_missing(
        site, cloud, make_gateway, tmp_path):
    gw, worker = _start(site, cloud, make_gateway, log={"max_bytes": "256KiB"})
    total = 30_000
    for start in range(0, total, 5000):   # paced by delivery: only delivered records go
        _publish(site, 5000, per_message=100, start=start)
        _delivered(gw, worker, start + 5000)
    with sqlite3.connect(f"file:{tmp_path / 'log.db'}?mode=ro", uri=True) as conn:
        oldest = conn.execute("SELECT MIN(seq) FROM records").fetchone()[0]
    assert 1 < oldest < total   # the cap removed the oldest records, delivered ones

    worker.ask("r-cap", 1, total)
    reply = worker.reply(b"r-cap", 60)
    # Nothing is removed after the request: nothing new is logged.
    assert reply["missing"] == [[1, oldest - 1]]
    assert reply["resent"] == total - oldest + 1
    assert sorted(worker.seqs(resend="r-cap")) == list(range(oldest, total + 1))
    # What the cap removed had been delivered: no undelivered reading was dropped.
    assert not gw.metric('fieldgate_log_dropped_readings_total{reason="cap"}')
    assert gw.stop() == 0
    worker.close()


def test_seqs_not_logged_yet_are_reported_missing(site, cloud, make_gateway):
    gw, worker = _start(site, cloud, make_gateway)
    _publish(site, 50, per_message=10)
    _delivered(gw, worker, 50)
    worker.ask("r-ahead", 41, 80)
    assert worker.reply(b"r-ahead") | {"topic": None} == {
        "topic": None, "request_id": "r-ahead", "from": 41, "to": 80, "resent": 10,
        "missing": [[51, 80]]}
    assert sorted(worker.seqs(resend="r-ahead")) == list(range(41, 51))
    assert gw.stop() == 0
    worker.close()


def test_malformed_requests_get_an_error_and_the_gateway_keeps_running(
        site, cloud, make_gateway):
    gw, worker = _start(site, cloud, make_gateway)
    _publish(site, 20, per_message=10)
    _delivered(gw, worker, 20)
    worker.send(b"not json", correlation=b"c-1")
    assert worker.reply(b"c-1") == {"topic": "fieldgate/gw-test/resend/reply",
                                    "error": "the request is not JSON"}
    worker.send(b"[1, 2]", correlation=b"c-2")
    assert "not a JSON object" in worker.reply(b"c-2")["error"]
    worker.ask("r-backwards", 10, 5)
    assert worker.reply(b"r-backwards") | {"topic": None} == {
        "topic": None, "request_id": "r-backwards", "error": '"to" 5 is before "from" 10'}
    worker.ask("r-huge", 1, 2_000_000)
    assert "at most 1,000,000" in worker.reply(b"r-huge")["error"]
    worker.send(orjson.dumps({"request_id": "r-bool", "from": True, "to": 3}),
                correlation=b"r-bool")
    assert worker.reply(b"r-bool")["request_id"] == "r-bool"
    worker.send(orjson.dumps({"request_id": "r-zero", "from": 0, "to": 3}),
                correlation=b"r-zero")
    assert "integers >= 1" in worker.reply(b"r-zero")["error"]
    # Past SQLite's integers (JSON parses 2**63 as an int): it reached the log's reader and
    # stopped the gateway.
    worker.send(b'{"request_id": "r-vast", "from": 9223372036854775808, '
                b'"to": 9223372036854775808}', correlation=b"r-vast")
    assert "integers >= 1" in worker.reply(b"r-vast")["error"]
    worker.send(orjson.dumps({"from": 1, "to": 3}), correlation=b"c-3")
    assert "request_id" in worker.reply(b"c-3")["error"]
    worker.ask("r-wild", 1, 3, response_topic="worker/#")   # cannot be published to
    assert "Response Topic" in worker.reply(b"r-wild")["error"]
    assert worker.replies[b"r-wild"]["topic"] == "fieldgate/gw-test/resend/reply"
    # Still running, and a good request is answered.
    worker.ask("r-good", 1, 20)
    assert worker.reply(b"r-good")["resent"] == 20
    assert gw.metric('fieldgate_resend_requests_total{result="error"}') == 9
    # Logged once per kind of fault (bad_range came four times), not once per request.
    assert gw.log().count("Refused a resend request") == 6
    assert gw.log().count("Refused a resend request (bad_range)") == 1
    assert gw.stop() == 0
    worker.close()


def _ask_until_not_busy(worker: Worker, request_id: str, first: int,
                        last: int) -> dict[str, Any]:
    """Ask until the gateway takes the request (at most one starts per second), as a worker
    does: each try under its own id, the last one's answer returned."""
    for attempt in range(int(30 * SLACK)):
        rid = f"{request_id}-{attempt}"
        worker.ask(rid, first, last)
        reply = worker.reply(rid.encode())
        if reply.get("error") != "busy":
            return reply
        time.sleep(0.2)   # pacing the retries; readiness is the reply itself
    raise AssertionError("the gateway stayed busy")


def test_a_request_while_one_runs_is_busy_and_the_live_uplink_keeps_flowing(
        site, cloud, make_gateway):
    gw, worker = _start(site, cloud, make_gateway, uplink={"batch_max_readings": 100})
    _publish(site, 60_000, per_message=100)
    _delivered(gw, worker, 60_000)

    # Readings keep coming while the resend runs.
    stop = threading.Event()
    published: list[int] = []

    def live() -> None:
        pub = Publisher(site.port)
        i = 100_000
        while not stop.is_set():
            pub.publish("sensors/dev-2/telemetry", orjson.dumps({"i": i}))
            published.append(i)
            i += 1
            if i % 50 == 0:
                pub.wait()
        pub.close()

    thread = threading.Thread(target=live, daemon=True)
    thread.start()
    try:
        worker.ask("r-long", 1, 60_000)
        worker.ask("r-second", 1, 10)
        assert worker.reply(b"r-second") | {"topic": None} == {
            "topic": None, "request_id": "r-second", "error": "busy"}
        reply = worker.reply(b"r-long", 120)
    finally:
        stop.set()
        thread.join(30)
    assert reply["resent"] == 60_000
    assert reply["missing"] == []
    assert sorted(worker.seqs(resend="r-long")) == list(range(1, 60_001))
    assert worker.seqs(resend="r-second") == []
    # Live batches went out between the first and the last re-sent one.
    with worker._lock:
        kinds = [p.get("resend") for p, _ in worker.messages]
    first = kinds.index("r-long")
    last = len(kinds) - 1 - kinds[::-1].index("r-long")
    assert None in kinds[first:last], "the live uplink stopped while the resend ran"
    # And every live reading arrives.
    total = 60_000 + len(published)
    _delivered(gw, worker, total)
    assert gw.metric('fieldgate_resend_requests_total{result="busy"}') == 1
    assert gw.stop() == 0
    worker.close()


def test_a_cloud_broker_killed_after_acknowledging_loses_batches_and_a_resend_repairs_it(
        site, make_gateway, tmp_path: Path):
    # The cloud broker keeps nothing on disk: killed, it forgets what it had acknowledged.
    cloud = Mosquitto(tmp_path, "cloud-volatile", extra="persistence false\n").start()
    try:
        gw = make_gateway(site, cloud).start()
        worker = Worker(cloud.port, gw.gateway_id, persistent=True)
        assert worker.online.wait(30 * SLACK)
        _publish(site, 1000, per_message=10)
        _delivered(gw, worker, 1000)
        # The worker is away: the broker queues for its session what the gateway sends,
        # and acknowledges it to the gateway, whose cursor moves on.
        worker.close()
        _publish(site, 1000, per_message=10, start=1000)
        assert CloudCollector.wait_for(lambda: gw.metric(
            'fieldgate_log_undelivered_readings{sink="uplink"}') == 0
            and gw.metric("fieldgate_uplink_readings_total") == 2000, 30)
        assert cloud.proc is not None
        cloud.proc.send_signal(signal.SIGKILL)
        cloud.proc.wait()
        cloud.start()   # same port, empty: the queued readings are gone

        worker = Worker(cloud.port, gw.gateway_id, persistent=True)
        _publish(site, 1000, per_message=10, start=2000)
        _delivered(gw, worker, 1000)
        seen = sorted(worker.readings())
        # The gap the worker sees: everything after its high-water mark 1000 (it had
        # 1..1000 before) up to the first seq that came after the restart.
        assert seen[0] > 1001 and seen[-1] == 3000
        gap = (1001, seen[0] - 1)
        worker.ask("r-gap", *gap)
        reply = worker.reply(b"r-gap", 60)
        assert reply["missing"] == []
        assert reply["resent"] == gap[1] - gap[0] + 1
        assert set(range(gap[0], 3001)) <= set(worker.readings())
        assert gw.stop() == 0
        worker.close()
    finally:
        cloud.stop()


def test_resent_batches_hold_at_most_half_the_brokers_receive_maximum(
        site, make_gateway, tmp_path: Path):
    """Behind 50 ms of latency (the whole window on the wire before a PUBACK returns), with
    live readings flowing: the broker's Receive Maximum 6 leaves the uplink a window of 4
    (room for status); a resend holds at most 2 of it, the live uplink the rest."""
    import mqtt5

    from tests.mqtt_helpers import MqttTap

    cloud = Mosquitto(tmp_path, "tight-cloud", extra="max_inflight_messages 6\n").start()
    tap = MqttTap(cloud.port, latency=0.05)
    try:
        gw = make_gateway(site, None, cloud={"url": tap.url},
                          uplink={"batch_max_readings": 50})
        gw.start()
        worker = Worker(cloud.port, gw.gateway_id)
        assert worker.online.wait(30 * SLACK)
        _publish(site, 3000, per_message=50)
        _delivered(gw, worker, 3000)
        stop = threading.Event()

        def live() -> None:
            pub = Publisher(site.port)
            i = 0
            while not stop.is_set():
                pub.publish("sensors/dev-2/telemetry", orjson.dumps({"i": i}))
                i += 1
                pub.wait()
            pub.close()

        thread = threading.Thread(target=live, daemon=True)
        thread.start()
        try:
            worker.ask("r-window", 1, 3000)
            reply = worker.reply(b"r-window", 120)
        finally:
            stop.set()
            thread.join(30)
        assert reply["resent"] == 3000
        outstanding: dict[int, bool] = {}   # packet id -> is a resend
        most_resent = most = 0
        for way, p in tap.packets(1):
            if way == "c2s" and isinstance(p, mqtt5.PublishPacket) and p.qos:
                outstanding[p.packet_id] = any(k == "resend" for k, _ in p.user_properties)
                most = max(most, len(outstanding))
                most_resent = max(most_resent, sum(outstanding.values()))
            elif way == "s2c" and isinstance(p, mqtt5.PubAckPacket):
                outstanding.pop(p.packet_id, None)
        assert most <= 6, f"{most} PUBLISH unacknowledged at once (Receive Maximum 6)"
        assert most_resent == 2, f"a resend held {most_resent} of a window of 4"
        assert gw.stop() == 0
        worker.close()
    finally:
        tap.close()
        cloud.stop()
