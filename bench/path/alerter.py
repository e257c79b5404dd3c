"""Scenario 6's alarms: a process that publishes one alarm reading per device at random
moments against the rule tick and times each alert event at the cloud."""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
from datetime import datetime
from typing import Any

import orjson

from bench.harness.children import Child
from bench.harness.gateway import GATEWAY_ID
from bench.harness.mqtt import connect_retry, paho_client

FIRED = "io.fieldgate.alert.fired"
# The rule the alert latency scenario loads: each alarm-* device fires once, at its first
# reading (for: 0s), and stays firing for the rest of the run.
ALERT_RULES = """\
groups:
  - name: bench
    match: {device: "alarm-*"}
    rules:
      - alert: Tripped
        expr: last(trip, 60s) > 0
        for: 0s
        severity: critical
"""


def alerter_main(conn: Any, site_port: int, cloud_port: int, spec: dict[str, Any]) -> None:
    """Publish one alarm reading per alarm-NNN device at random moments (so that they fall
    anywhere between two rule ticks) and time each io.fieldgate.alert.fired event at the cloud:
    from the reading's publish to the event's arrival, and from the tick that fired it (the
    event's time) to its arrival."""
    try:
        arrived: dict[str, tuple[float, float]] = {}
        lock = threading.Lock()

        def on_event(_c: Any, _u: Any, msg: Any) -> None:
            now = time.time()
            body = orjson.loads(msg.payload)
            fired = datetime.fromisoformat(body["time"].replace("Z", "+00:00")).timestamp()
            with lock:
                arrived.setdefault(body["subject"], (now, fired))

        sub = paho_client(f"bench-events-{os.getpid()}")
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_message = on_event
        connect_retry(sub, cloud_port, time.time() + 10)
        sub.subscribe(f"fieldgate/{GATEWAY_ID}/events/{FIRED}", qos=1)
        sub.loop_start()
        pub = paho_client(f"bench-alarms-{os.getpid()}")
        connect_retry(pub, site_port, time.time() + 10)
        pub.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("alerter: no SUBACK")
        conn.send(("ready", None))
        if conn.recv() != "go":
            return
        rng = random.Random(spec["seed"])
        sent: dict[str, float] = {}
        for k in range(spec["n"]):
            time.sleep(rng.uniform(*spec["gap"]))
            device = f"alarm-{k:03d}"
            sent[device] = pt = time.time()
            pub.publish(f"sensors/{device}/telemetry", orjson.dumps({"trip": 1, "pt": pt}),
                        qos=1)
        deadline = time.time() + spec["wait"]
        while time.time() < deadline:
            with lock:
                if len(arrived) >= len(sent):
                    break
            time.sleep(0.02)
        with lock:
            got = {d: arrived[d] for d in sent if d in arrived}
        conn.send(("done", {
            "latency": [got[d][0] - sent[d] for d in got],
            "tick_to_cloud": [at - fired for at, fired in got.values()],
            "reading_to_tick": [got[d][1] - sent[d] for d in got],
            "missing": len(sent) - len(got),
        }))
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()
    except Exception:
        conn.send(("error", traceback.format_exc()))


class Alerter(Child):
    def __init__(self, site_port: int, cloud_port: int, **spec: Any) -> None:
        super().__init__(alerter_main, site_port, cloud_port, spec)

    def go(self) -> None:
        self.conn.send("go")
