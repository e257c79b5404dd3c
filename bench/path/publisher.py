"""The load: a paho-mqtt v5 publisher process, QoS 1 telemetry at full speed or paced."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from typing import Any

import orjson

from bench.harness.children import Child
from bench.harness.mqtt import connect_retry, paho_client

DEVICES = 50
# The publisher keeps at most WINDOW publishes unacknowledged (paho stalls near 65k, see
# MEASURED.md). paho's max_inflight is 0 (no limit of paho's own): with a limit, paho scans its
# whole outgoing queue on every PUBACK (Client._update_inflight), which made the publisher cost
# ~140 us/msg at max_inflight 1000 against ~65 us at 0 and took more than one of the two cores.
WINDOW = 10_000
PUB_INFLIGHT = 0
ARRAY = 100               # readings per message in the array scenarios

TEMPS = [round(20.0 + i / 10, 1) for i in range(40)]


def single_payload(i: int, now: float) -> bytes:
    return orjson.dumps({"ts": now, "temp": TEMPS[i % 40], "hum": 40.2, "volt": 3.31, "i": i,
                         "pt": now})


def array_payload(i: int, now: float) -> bytes:
    base = i * ARRAY
    return orjson.dumps([{"ts": now, "temp": TEMPS[j % 40], "hum": 40.2, "volt": 3.31,
                          "i": base + j, "pt": now} for j in range(ARRAY)])


def publisher_main(conn: Any, port: int, spec: dict[str, Any]) -> None:
    """Publish spec['n_msgs'] QoS 1 messages, at full speed or paced, on command."""
    try:
        client = paho_client(f"bench-pub-{os.getpid()}")
        client.max_inflight_messages_set(spec.get("inflight", PUB_INFLIGHT))
        window = spec.get("window", WINDOW)
        connected = threading.Event()
        client.on_connect = lambda *a: connected.set()
        connect_retry(client, port, time.time() + 10)
        client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("publisher: no CONNACK")
        conn.send(("ready", None))
        if conn.recv() != "go":
            client.disconnect()
            client.loop_stop()
            return
        n = spec["n_msgs"]
        rate = spec.get("rate") or 0.0
        make = array_payload if spec["kind"] == "array" else single_payload
        topics = [f"sensors/dev-{d:02d}/telemetry" for d in range(DEVICES)]
        infos: deque[Any] = deque()
        cpu0 = time.process_time()
        t0 = time.time()
        deadline = t0 + spec["max_seconds"]
        sent = 0
        timed_out = False
        tick = 0.01
        while sent < n:
            if rate:
                due = min(n, int((time.time() - t0) * rate) + 1)
                if due <= sent:
                    # sleep to the next 10 ms tick of the schedule
                    nxt = t0 + (int((time.time() - t0) / tick) + 1) * tick
                    time.sleep(max(0.0, nxt - time.time()))
                    continue
            else:
                due = min(n, sent + 256)
            while sent < due:
                infos.append(client.publish(topics[sent % DEVICES], make(sent, time.time()),
                                            qos=1))
                sent += 1
                if len(infos) >= window:
                    infos[0].wait_for_publish(max(0.1, deadline - time.time()))
                    while infos and infos[0].is_published():
                        infos.popleft()
            if time.time() > deadline:
                timed_out = True
                break
        t_last = time.time()
        ack_deadline = time.time() + 30
        while infos and time.time() < ack_deadline:
            infos[0].wait_for_publish(max(0.05, ack_deadline - time.time()))
            while infos and infos[0].is_published():
                infos.popleft()
        t_acked = time.time()
        cpu = time.process_time() - cpu0
        conn.send(("done", {"sent": sent, "unacked": len(infos), "t_first": t0,
                            "t_last": t_last, "t_acked": t_acked, "cpu": cpu,
                            "timed_out": timed_out, "payload_bytes": len(make(0, t0))}))
        client.disconnect()
        client.loop_stop()
    except Exception:  # report and exit; the driver prints it
        conn.send(("error", traceback.format_exc()))


class Publisher(Child):
    """Driver side: ``go`` starts the publishing, ``result`` is its ('done', …) report."""

    def __init__(self, port: int, **spec: Any) -> None:
        self.spec = spec
        super().__init__(publisher_main, port, spec)

    def go(self) -> None:
        self.conn.send("go")

    def result(self, timeout: float) -> dict[str, Any] | None:
        if not self.conn.poll(timeout):
            return None
        return dict(self.expect("done", 0))
