"""The counting side: a paho-mqtt v5 subscriber process that counts messages ("bare", the
baseline) or the readings of uplink batches ("cloud"), with latency samples, and the
driver's wait for the arrivals."""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any

import orjson

from bench.harness.children import CTX, Child
from bench.harness.mqtt import connect_retry, paho_client
from bench.path.publisher import Publisher

# Shared counters a subscriber process updates on every message (read by the driver without
# disturbing the subscriber).
S_COUNT, S_FIRST, S_LAST, S_MAXSEQ, S_DUPS, S_MSGS, S_FIRSTSEQ, S_MAXGAP = range(8)
S_SIZE = 8


class _SubState:
    __slots__ = ("count", "dups", "last", "maxgap", "maxseq", "msgs", "next_sample", "samples",
                 "shared", "step")

    def __init__(self, shared: Any, step: float) -> None:
        self.shared = shared
        self.step = step
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.dups = 0
        self.last = 0.0
        self.maxgap = 0.0
        self.maxseq = 0
        self.msgs = 0
        self.next_sample = 0.0
        self.samples: list[float] = []
        for i in range(S_SIZE):
            self.shared[i] = 0.0

    def on_bare(self, _c: Any, _u: Any, msg: Any) -> None:
        """The baseline's trivial callback: count, timestamp, now and then a latency sample."""
        now = time.time()
        self.count += 1
        sh = self.shared
        if self.count > 1 and now - self.last > self.maxgap:
            self.maxgap = sh[S_MAXGAP] = now - self.last
        self.last = now
        sh[S_COUNT] = self.count
        sh[S_LAST] = now
        if now >= self.next_sample:
            if self.count == 1:
                sh[S_FIRST] = now
            self.next_sample = now + self.step
            self.samples.append(now - orjson.loads(msg.payload)["pt"])

    def on_cloud(self, _c: Any, _u: Any, msg: Any) -> None:
        """Counts readings in uplink batches; de-duplicates by the seq range properties."""
        now = time.time()
        payload = msg.payload
        props = dict(getattr(msg.properties, "UserProperty", None) or ())
        first = int(props.get("seq_first", 0))
        last = int(props.get("seq_last", -1))
        n = payload.count(b'"seq":')
        sh = self.shared
        self.msgs += 1
        if self.msgs > 1 and now - self.last > self.maxgap:
            self.maxgap = sh[S_MAXGAP] = now - self.last
        self.last = now
        if self.msgs == 1:
            sh[S_FIRST] = now
            sh[S_FIRSTSEQ] = first
        if first and first <= self.maxseq:
            dup = min(last, self.maxseq) - first + 1
            self.dups += dup
            n -= dup
            sh[S_DUPS] = self.dups
        if last > self.maxseq:
            self.maxseq = last
            sh[S_MAXSEQ] = last
        self.count += n
        sh[S_COUNT] = self.count
        sh[S_LAST] = now
        sh[S_MSGS] = self.msgs
        if now >= self.next_sample:
            self.next_sample = now + self.step
            readings = orjson.loads(payload)["readings"]
            stride = max(1, len(readings) // 50)
            self.samples.extend(now - r["pt"] for r in readings[::stride] if "pt" in r)


def subscriber_main(conn: Any, port: int, topic: str, mode: str, shared: Any,
                    connect_timeout: float) -> None:
    """A QoS 1 subscriber on a network thread; mode 'bare' counts messages, 'cloud' readings."""
    try:
        client = paho_client(f"bench-{mode}-{os.getpid()}")
        state = _SubState(shared, 0.002 if mode == "bare" else 0.02)
        client.on_message = state.on_bare if mode == "bare" else state.on_cloud
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        conn.send(("connecting", None))
        connect_retry(client, port, time.time() + connect_timeout)
        client.subscribe(topic, qos=1)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("subscriber: no SUBACK")
        conn.send(("ready", None))
        while True:
            cmd = conn.recv()
            if cmd == "reset":
                state.reset()
                conn.send(("ok", None))
            elif cmd == "final":
                conn.send(("final", {"count": state.count, "dups": state.dups,
                                     "maxgap": state.maxgap,
                                     "msgs": state.msgs, "maxseq": state.maxseq,
                                     "samples": state.samples}))
            else:
                break
        client.disconnect()
        client.loop_stop()
    except Exception:
        conn.send(("error", traceback.format_exc()))


class Subscriber(Child):
    def __init__(self, port: int, topic: str, mode: str, connect_timeout: float = 10) -> None:
        self.shared = CTX.RawArray("d", S_SIZE)
        super().__init__(subscriber_main, port, topic, mode, self.shared, connect_timeout)

    def reset(self) -> None:
        self.conn.send("reset")
        self.expect("ok", 5)

    def final(self) -> dict[str, Any]:
        self.conn.send("final")
        return dict(self.expect("final", 10))

    @property
    def count(self) -> int:
        return int(self.shared[S_COUNT])


def wait_arrivals(sub: Subscriber, pub: Publisher, expected: int, *, timeout: float,
                  stall: float = 25.0) -> tuple[dict[str, Any] | None, str]:
    """Wait until the subscriber counted `expected` (fewer if the publisher stopped early).

    Returns the publisher's result and "" or a reason ("timeout", "stalled").
    """
    deadline = time.time() + timeout
    result = None
    last_count, last_change = -1, time.time()
    while True:
        if result is None:
            result = pub.result(0)
            if result is not None:
                expected = min(expected, result["sent"] * pub.spec.get("per_msg", 1))
        count = sub.count
        now = time.time()
        if count != last_count:
            last_count, last_change = count, now
        if result is not None and count >= expected:
            return result, ""
        if now > deadline:
            return result or pub.result(1), "timeout"
        if result is not None and now - last_change > stall:
            return result, "stalled"
        time.sleep(0.01)
