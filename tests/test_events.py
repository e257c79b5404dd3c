"""Events go through the log and out on the uplink as CloudEvents, in log order."""

from __future__ import annotations

import threading
import time

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import GatewayConfig
from gateway.events import Event
from gateway.ingest.redelivery import message_key
from gateway.log.store import Message
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import poll_links
from gateway.sinks.uplink import UplinkSink
from tests.mqtt_helpers import subscribe_and_wait
from tests.tools import open_log


def _msg(i: int) -> Message:
    payload = orjson.dumps({"i": i})
    return Message("sensors/d/telemetry", payload, message_key("sensors/d/telemetry", payload, i),
                   [("d", time.time(), {"i": i})], time.time())


def test_events_are_cloudevents_on_their_topic_in_log_order(cloud, tmp_path):
    cfg = GatewayConfig.model_validate({
        "gateway_id": "gw-ev", "cloud": {"url": cloud.url},
        "log": {"path": str(tmp_path / "log.db")},
        "uplink": {"batch_max_delay": "10ms"}, "metrics": {"listen": None}})
    arrived: list[tuple[str, dict]] = []
    lock = threading.Lock()
    sub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on_message(_c, _u, m):
        with lock:
            arrived.append((m.topic, orjson.loads(m.payload)))

    sub.on_message = on_message
    sub.connect("127.0.0.1", cloud.port)
    sub.loop_start()
    subscribe_and_wait(sub, [("fieldgate/gw-ev/#", 1)])

    store = open_log(cfg.log, cfg.gateway_id, ["uplink"])
    sink = UplinkSink(cfg, store, GatewayMetrics())
    store.append([_msg(i) for i in range(3)])
    seqs = store.append_events([Event("io.fieldgate.alert.fired", "d", 1_800_000_000.5,
                                      {"rule": "TooHot", "value": 31.2})])
    store.append([_msg(i) for i in range(3, 5)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        poll_links([sink.link], 0.02)
        sink.step(time.monotonic())
        with lock:
            if sum(1 for t, _ in arrived if not t.endswith("/status")) >= 3:
                break
    sink.finish()
    sub.disconnect()
    sub.loop_stop()
    data = [(t, body) for t, body in arrived if not t.endswith("/status")]
    assert [t for t, _ in data] == ["fieldgate/gw-ev/telemetry",
                                    "fieldgate/gw-ev/events/io.fieldgate.alert.fired",
                                    "fieldgate/gw-ev/telemetry"]
    assert [r["i"] for r in data[0][1]["readings"]] == [0, 1, 2]
    event = data[1][1]
    assert event["specversion"] == "1.0"
    assert event["id"] == f"gw-ev-{seqs[0]:012d}"
    assert event["source"] == "fieldgate://gw-ev"
    assert event["subject"] == "d"
    assert event["time"] == "2027-01-15T08:00:00.500Z"
    assert event["data"] == {"rule": "TooHot", "value": 31.2}
    assert event["seq"] == 4
    assert [r["seq"] for r in data[2][1]["readings"]] == [5, 6]
    assert store.cursors()["uplink"] == 7
    store.close()
