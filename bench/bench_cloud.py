#!/usr/bin/env python
"""Benchmark of `gateway cloud ingest` (issue 12): readings/s from the cloud broker into
VictoriaMetrics with 1, 2 and 4 workers on one shared subscription, CPU µs per reading per
worker (target <= 10), next to a baseline in the same run: a bare paho subscriber on the
same kind of shared subscription that only counts.

Each phase: a publisher process sends M uplink batches (100 readings each, 20 gateways, the
real format) at full speed to a fresh share group whose members are subscribed (READY); the
time runs from the first publish to the last message acknowledged (workers: after
VictoriaMetrics accepted its points; baseline: received). CPU is user+sys of each worker
process over the phase, divided by the readings it acknowledged.

    python bench/bench_cloud.py                    # 3,000 batches = 300,000 readings a phase
    python bench/bench_cloud.py --batches 1000     # a quicker run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
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
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from gateway.mosquitto import Mosquitto  # noqa: E402
from tests.cloud_helpers import IngestProcess, readings, write_config  # noqa: E402
from tests.tsdb import VictoriaMetrics  # noqa: E402

GATEWAYS = 20
PER_BATCH = 100


def _publish(port: int, batches: int, start: Any) -> None:
    """A publisher process: pre-built payloads, QoS 1, a window of 1000 in flight."""
    msgs = []
    seqs = dict.fromkeys(range(GATEWAYS), 1)
    for n in range(batches):
        g = n % GATEWAYS
        gw = f"bench-gw-{g:02d}"
        rows = readings(gw, seqs[g], PER_BATCH, devices=10)
        seqs[g] += PER_BATCH
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.UserProperty = [("seq_first", str(rows[0]["seq"])),
                              ("seq_last", str(rows[-1]["seq"]))]
        msgs.append((f"fieldgate/{gw}/telemetry",
                     orjson.dumps({"gateway": gw, "readings": rows}), props))
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    start.wait()
    infos = [c.publish(topic, payload, qos=1, properties=props)
             for topic, payload, props in msgs]
    for info in infos:
        info.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


def _publisher(port: int, batches: int) -> tuple[Any, Any]:
    start = mp.Event()
    proc = mp.Process(target=_publish, args=(port, batches, start))
    proc.start()
    return proc, start


def _baseline(broker: Mosquitto, batches: int) -> tuple[float, float]:
    """A bare paho subscriber on $share/<group>/fieldgate/+/telemetry that only counts:
    readings/s and CPU µs per reading of this process (its network thread)."""
    count = 0
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal count
        count += 1
        if count == batches:
            done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                    client_id="bare-0")
    c.on_message = on_message
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.subscribe("$share/bare/fieldgate/+/telemetry", qos=1)
    subscribed.wait(30)
    proc, start = _publisher(broker.port, batches)
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    t0 = time.perf_counter()
    start.set()
    done.wait(600)
    elapsed = time.perf_counter() - t0
    cpu = sum(me.cpu_times()[:2]) - cpu0
    proc.join()
    c.disconnect()
    c.loop_stop()
    readings_total = batches * PER_BATCH
    return readings_total / elapsed, cpu / readings_total * 1e6


def _workers(broker: Mosquitto, victoria: VictoriaMetrics, work: Path, n: int,
             batches: int) -> tuple[float, list[float], list[int]]:
    phase = work / f"w{n}"
    phase.mkdir()
    config = write_config(phase / "cloud.yaml", broker_url=broker.url,
                          influx={"url": victoria.url, "api": "v2", "org": "bench",
                                  "bucket": "bench", "batch_max_points": 20000},
                          state=phase / "ingest.db", group=f"bench-{n}", session_expiry=0)
    workers = [IngestProcess(config, f"bench-{n}-{i}", phase).start() for i in range(n)]
    procs = [psutil.Process(w.proc.pid) for w in workers if w.proc is not None]
    proc, start = _publisher(broker.port, batches)
    cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
    t0 = time.perf_counter()
    start.set()
    while True:
        acked = [int(w.metric("fieldgate_ingest_acked_total")) for w in workers]
        if sum(acked) >= batches:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0, strict=True)]
    proc.join()
    for w in workers:
        w.stop(signal.SIGTERM)
    per_reading = [c / max(1, a * PER_BATCH) * 1e6 for c, a in zip(cpu, acked, strict=True)]
    return batches * PER_BATCH / elapsed, per_reading, acked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work, "cloud").start()
        victoria = VictoriaMetrics(work).start()
        try:
            rate, cpu = _baseline(broker, args.batches)
            print(f"readings per phase: {args.batches * PER_BATCH:,} ({args.batches} batches "
                  f"of {PER_BATCH}, {GATEWAYS} gateways); {psutil.cpu_count()} cores")
            print(f"{'bare paho subscriber':24} {rate:12,.0f} readings/s   "
                  f"CPU {cpu:5.2f} µs/reading")
            worst = 0.0
            phases = 0
            for n in (int(x) for x in args.workers.split(",")):
                rate_n, per, acked = _workers(broker, victoria, work, n, args.batches)
                worst = max(worst, *per)
                phases += 1
                print(f"{f'{n} worker(s)':24} {rate_n:12,.0f} readings/s   CPU "
                      + ", ".join(f"{p:5.2f}" for p in per) + " µs/reading per worker   "
                      f"shares {acked}   ratio to bare {rate_n / rate:.2f}")
            stored = victoria.samples('{__name__="telemetry_temp"}')
            # VictoriaMetrics keeps every write's samples (no dedup flag): each phase adds
            # its readings, so exactly-once per phase shows as phases x readings.
            expected = phases * args.batches * PER_BATCH
            print(f"VictoriaMetrics telemetry_temp samples: {stored:,} (expected {expected:,}: "
                  f"{'every reading exactly once' if stored == expected else 'MISMATCH'})")
            print(f"target CPU <= 10 µs/reading per worker: "
                  f"{'met' if worst <= 10 else 'NOT met'} (worst {worst:.2f})")
        finally:
            victoria.stop()
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
