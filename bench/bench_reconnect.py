#!/usr/bin/env python
"""How soon readings flow again after a cloud outage (issue 10: goal <= 2 s).

A `gateway run` process with the default reconnect policy forwards a paced stream
(100 readings/s) from a site Mosquitto to a cloud Mosquitto. The cloud broker is stopped
for --outage seconds (20, as in the issue's comparison) and started again on the same
port; from the moment it accepts connections we measure:

- gateway link up: until `fieldgate_link_connected{link="cloud"}` says 1 (polled every 10 ms);
- gateway first reading: until the first telemetry batch arrives at a subscriber that
  connected right after the restart (its own connect + SUBACK, printed too, is the floor;
  a batch sent before that SUBACK is missed and the next one, <= batch_max_delay later,
  counts);
- baseline: a bare paho-mqtt publisher on the cloud broker, reconnect delay fixed at 1 s
  (the "probe about once a second" of the issue), publishing every 10 ms during the same
  outage: until its first message arrives at the same subscriber.

    python bench/bench_reconnect.py                  # 3 runs of a 20 s outage, ~80 s
    python bench/bench_reconnect.py --runs 1 --outage 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402

from bench.harness.gateway import BenchGateway  # noqa: E402
from bench.harness.mqtt import paho_client  # noqa: E402
from gateway.mosquitto import Mosquitto  # noqa: E402

GATEWAY_ID = "bench-reconnect"
PACE = 0.01   # one reading (and one baseline message) every 10 ms
POLL = 0.01   # how often the metrics endpoint is read after the restart


class Paced(threading.Thread):
    """Publishes a message every PACE seconds on its own client until stopped."""

    def __init__(self, c: Any, topic: str) -> None:
        super().__init__(daemon=True)
        self.c, self.topic, self.stop = c, topic, threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.wait(PACE):
            self.c.publish(self.topic, orjson.dumps({"i": i, "pt": time.time()}), qos=1)
            i += 1


class Watcher:
    """A fresh subscriber on the cloud broker: first arrival time of each topic."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.first: dict[str, float] = {}
        self.c = paho_client()
        self.c.on_message = self._on_message
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *_: subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe([(t, 1) for t in topics])
        if not subscribed.wait(10):
            raise RuntimeError("watcher got no SUBACK")
        self.subscribed_at = time.monotonic()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.first.setdefault(msg.topic, time.monotonic())

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def run(outage: float, runs: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reconnect-"))
    site = Mosquitto(tmp, "site").start()
    cloud = Mosquitto(tmp, "cloud").start()
    # The gateway's defaults: the reconnect policy is what is measured.
    gw = BenchGateway(tmp, site, cloud, gateway_id=GATEWAY_ID)
    pubs: list[Paced] = []
    try:
        gw.start()
        site_pub = paho_client()
        site_pub.connect("127.0.0.1", site.port)
        site_pub.loop_start()
        base_pub = paho_client("baseline-1s")
        base_pub.reconnect_delay_set(min_delay=1, max_delay=1)
        base_pub.connect("127.0.0.1", cloud.port)
        base_pub.loop_start()
        pubs = [Paced(site_pub, "sensors/b1/telemetry"), Paced(base_pub, "bench/baseline")]
        for p in pubs:
            p.start()
        telemetry = f"fieldgate/{GATEWAY_ID}/telemetry"
        rows = []
        for n in range(1, runs + 1):
            time.sleep(3)  # steady flow before the cut
            cloud.stop()
            time.sleep(outage)
            cloud.start()
            t0 = time.monotonic()   # the broker accepts connections
            watcher = Watcher(cloud.port, [telemetry, "bench/baseline"])
            link_up = None
            limit = t0 + 120
            while time.monotonic() < limit and (
                    link_up is None or len(watcher.first) < 2):
                if link_up is None and gw.metric(
                        'fieldgate_link_connected{link="cloud"}', attempts=1, timeout=2) == 1.0:
                    link_up = time.monotonic() - t0
                time.sleep(POLL)
            first = {t: at - t0 for t, at in watcher.first.items()}
            rows.append((n, watcher.subscribed_at - t0, link_up, first.get(telemetry),
                         first.get("bench/baseline")))
            watcher.close()
        print(f"Cloud outage of {outage:.0f} s, then the broker restarted on the same port; "
              "seconds from the broker accepting connections:")
        print(f"{'run':>3}  {'watcher SUBACK':>14}  {'gateway link up':>15}  "
              f"{'gateway 1st reading':>19}  {'baseline paho 1 s':>17}")

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        for n, sub, up, reading, base in rows:
            print(f"{n:>3}  {fmt(sub):>14}  {fmt(up):>15}  {fmt(reading):>19}  {fmt(base):>17}")
        readings = [r[3] for r in rows if r[3] is not None]
        bases = [r[4] for r in rows if r[4] is not None]
        if readings and bases:
            # The baseline's delay is uniform in [0, 1] s (where in its 1 s cycle the broker
            # came back), so compare medians and maxima, not run by run.
            print(f"gateway first reading: median {statistics.median(readings):.2f} s, "
                  f"max {max(readings):.2f} s (issue 10 goal: <= 2 s); baseline median "
                  f"{statistics.median(bases):.2f} s, max {max(bases):.2f} s; ratio of maxima "
                  f"{max(readings) / max(*bases, 0.01):.1f}x")
        return 0 if readings and len(readings) == len(rows) and max(readings) <= 2.0 else 1
    finally:
        for p in pubs:
            p.stop.set()
        if gw.proc is not None:
            gw.stop(timeout=15)
        cloud.stop()
        site.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage", type=float, default=20.0, help="seconds the cloud is down")
    ap.add_argument("--runs", type=int, default=3, help="outages in a row")
    args = ap.parse_args()
    return run(args.outage, args.runs)


if __name__ == "__main__":
    sys.exit(main())
