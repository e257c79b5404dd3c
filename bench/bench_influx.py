#!/usr/bin/env python
"""Benchmark of the influx sink: `gateway run` draining a full log into real servers.

1. drain v2: N buffered readings (3 metrics each) in the log, `gateway run` with only the
   influx sink (api v2) into VictoriaMetrics: readings/s from start to depth 0 (target
   >= 150k/s), and the peak RSS of the gateway.
2. baseline: influxdb-client's own batching WriteApi (its background thread, batch 5000)
   writing the same points (lines from the same log) into a fresh VictoriaMetrics, in
   this process: readings/s, so figure 1 is read as a ratio.
3. drain v1: the same log into InfluxDB 1.x (influxd, api v1).
4. both sinks: uplink (cloud Mosquitto) and influx (v2) draining the same log at once:
   peak RSS of the gateway (target <= 80 MB).
5. paced 5k readings/s for some seconds through the site broker: gateway CPU with the
   influx sink minus the same run without it, per reading (target <= 5 µs).
6. encode in-process, CPU µs per reading from the log to line protocol: the sink's path
   (LogReader.read_run, one orjson call per run, ReadingEncoder.encode_text a column at a
   time) against the per-reading path it replaced (LogReader.read, encode per reading),
   in the same run.

    python bench/bench_influx.py                   # N = 1,000,000 (several minutes)
    python bench/bench_influx.py --readings 200000 # a quicker run
    python bench/bench_influx.py --only 1,6        # some parts only
    python bench/bench_influx.py --only 1 --before main  # part 1 also for git ref main,
                                                   # alternating with this tree, same log
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from influxdb_client import InfluxDBClient  # noqa: E402
from influxdb_client.client.write_api import WriteOptions  # noqa: E402

from bench.harness.accounting import rss_bytes  # noqa: E402
from bench.harness.children import CTX  # noqa: E402
from bench.harness.gateway import GATEWAY_ID, BenchGateway, checkout  # noqa: E402
from bench.harness.mqtt import paho_client  # noqa: E402
from gateway.config import LogSection  # noqa: E402
from gateway.events import render  # noqa: E402
from gateway.influx.lineproto import Precision  # noqa: E402
from gateway.influx.points import ReadingEncoder  # noqa: E402
from gateway.log.reader import LogReader  # noqa: E402
from gateway.log.store import LogStore, Message  # noqa: E402
from gateway.mosquitto import Mosquitto, free_port  # noqa: E402
from tests.tsdb import InfluxD, VictoriaMetrics  # noqa: E402

DEVICES = 100
DB = "fieldgate"


def fill_log(path: Path, n: int) -> float:
    """N readings of 3 metrics, one per message (as sensors send them); returns t0."""
    store = LogStore(LogSection(path=path, max_bytes=8 * 1024**3, synchronous="normal"),
                     GATEWAY_ID, event_body=render)
    t0 = float(int(time.time()) - 3600)
    chunk = 20_000
    for start in range(0, n, chunk):
        store.append([
            Message("sensors/d/telemetry", b"", i,
                    [(f"d{i % DEVICES}", t0 + (i // DEVICES) * 0.001,
                      {"temp": 20 + (i % 97) / 10, "hum": 40.5 + (i % 13), "co2": 400 + i % 50})],
                    t0)
            for i in range(start, min(n, start + chunk))])
    store.close()
    return t0


def launch(work: Path, log: Path, site: Mosquitto, *, root: Path = ROOT,
           **sections: Any) -> BenchGateway:
    """`gateway run` on ``log`` (8 GiB cap, synchronous=normal) with the given sections."""
    return BenchGateway(work, site, None, src=root, name=f"gw-{log.stem}",
                        log={"path": str(log), "max_bytes": "8GiB", "synchronous": "normal"},
                        **sections).launch()


def _metric(gw: BenchGateway, name: str) -> float | None:
    return gw.metric(name, attempts=1, timeout=5)


def wait_depth_zero(gw: BenchGateway, sinks: list[str], timeout: float) -> tuple[float, int]:
    """Seconds from now until every sink's depth is 0, and the gateway's peak RSS sampled
    meanwhile (while draining only: not its start-up or shutdown)."""
    start = time.monotonic()
    peak = 0
    while time.monotonic() - start < timeout:
        peak = max(peak, rss_bytes(gw.pid))
        depths = [_metric(gw, f'fieldgate_log_undelivered_readings{{sink="{s}"}}')
                  for s in sinks]
        if all(d == 0 for d in depths):
            return time.monotonic() - start, peak
        if gw.proc is not None and gw.proc.poll() is not None:
            raise RuntimeError(gw.log())
        time.sleep(0.05)
    raise RuntimeError(f"not drained in {timeout} s: {gw.log()[-2000:]}")


def drain(work: Path, master: Path, site: Mosquitto, name: str, sinks: list[str],
          root: Path = ROOT, **sections: Any) -> tuple[float, int, BenchGateway]:
    """Seconds for a gateway on a copy of ``master`` to drain it, its peak RSS meanwhile."""
    log = work / f"{name}.db"
    shutil.copy(master, log)
    gw = launch(work, log, site, root=root, **sections)
    # Depth is only on /metrics once the gateway is wired; time from the process start.
    started = time.monotonic()
    while _metric(gw, 'fieldgate_link_connected{link="site"}') is None:
        time.sleep(0.02)
    _, peak_rss = wait_depth_zero(gw, sinks, timeout=1800)
    seconds = time.monotonic() - started
    gw.stop(timeout=30)
    return seconds, peak_rss, gw


def baseline(master: Path, n: int, vm: VictoriaMetrics) -> float:
    """influxdb-client's batching WriteApi writing the same points; readings/s."""
    encoder = ReadingEncoder(measurement_name="telemetry", gateway=GATEWAY_ID, site=GATEWAY_ID,
                             device_labels={}, precision=Precision.MS)
    reader = LogReader(master)
    client = InfluxDBClient(url=vm.url, token="", org="bench")
    api = client.write_api(write_options=WriteOptions(batch_size=5000, flush_interval=1000))
    start = time.monotonic()
    seq = 1
    while True:
        rows = reader.read(seq, max_readings=5000, max_bytes=1 << 20)
        if not rows:
            break
        lines = [encoder.encode(r) for r in
                 orjson.loads(b"[" + b",".join(r.body for r in rows) + b"]")]
        api.write(bucket="b", org="bench", record=lines)
        seq = rows[-1].seq + rows[-1].n
    api.close()  # flushes and waits for the background writes
    seconds = time.monotonic() - start
    client.close()
    got = vm.samples('{__name__="telemetry_temp"}')
    if got != n:
        print(f"  baseline: VictoriaMetrics holds {got} of {n} points")
    return n / seconds


def encode_cpu(master: Path) -> tuple[float, float]:
    """CPU µs per reading, log to lines: the per-reading path, then the sink's column path
    (best of three passes each, so a noisy neighbour costs less)."""
    encoder = ReadingEncoder(measurement_name="telemetry", gateway=GATEWAY_ID, site=GATEWAY_ID,
                             device_labels={}, precision=Precision.MS)
    reader = LogReader(master)

    def per_reading() -> int:
        seq, n = 1, 0
        while rows := reader.read(seq, max_readings=5000, max_bytes=1 << 20):
            lines = [encoder.encode(r) for r in
                     orjson.loads(b"[" + b",".join([r.body for r in rows]) + b"]")]
            "\n".join(lines).encode()
            seq, n = rows[-1].seq + rows[-1].n, n + len(lines)
        return n

    def columns() -> int:
        seq, n = 1, 0
        while run := reader.read_run(seq, max_readings=5000, max_bytes=1 << 20):
            text, readings = encoder.encode_text(
                orjson.loads(b"[" + b",".join(run.bodies) + b"]"))
            text.encode()
            seq, n = run.end, n + len(readings)
        return n

    figures = []
    for path in (per_reading, columns):
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            n = path()
            best = min(best, (time.process_time() - start) / n * 1e6)
        figures.append(best)
    reader.close()
    return figures[0], figures[1]


def _paced(port: int, rate: int, seconds: float, t0: float) -> None:
    c = paho_client()
    c.max_inflight_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    start = time.monotonic()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            d = sent % DEVICES
            c.publish(f"sensors/d{d}/telemetry", orjson.dumps(
                {"ts": t0 + sent * 0.001, "temp": 21.5, "hum": 40.0 + d, "co2": 410}), qos=1)
            sent += 1
        time.sleep(0.01)
    time.sleep(1)
    c.disconnect()
    c.loop_stop()


def paced_cpu(work: Path, site: Mosquitto, rate: int, seconds: float,
              **sections: Any) -> float:
    """Gateway CPU seconds for `rate` readings/s over `seconds`, idle start excluded."""
    log = work / f"paced-{free_port()}.db"
    gw = launch(work, log, site, **sections)
    gw.wait_links("site", timeout=30)
    time.sleep(1.0)
    before = gw.cpu()
    pub = CTX.Process(target=_paced, args=(site.port, rate, seconds,
                                                              time.time() - 60))
    pub.start()
    pub.join()
    if sections.get("influx"):
        wait_depth_zero(gw, ["influx"], 60)
    after = gw.cpu()
    readings = _metric(gw, "fieldgate_readings_total")
    gw.stop(timeout=30)
    if readings != rate * seconds:
        print(f"  paced: gateway logged {readings} of {rate * seconds} readings")
    return after - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--paced-seconds", type=float, default=10.0)
    ap.add_argument("--only", default="1,2,3,4,5,6", help="parts to run, e.g. 1,6")
    ap.add_argument("--before", metavar="REF", help="part 1 also with the gateway of git ref "
                    "REF (twice each, alternating), for a before/after in one run")
    args = ap.parse_args()
    n = args.readings
    only = {int(part) for part in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="bench-influx-"))
    ok = True
    try:
        master = work / "master.db"
        t = time.monotonic()
        fill_log(master, n)
        print(f"log: {n:,} readings x 3 metrics buffered in {time.monotonic() - t:.1f} s")
        site = Mosquitto(work, "site").start()
        influx_v2: dict[str, Any] = {"api": "v2", "org": "bench", "bucket": "b",
                                     "health_interval": "1h"}
        rate_v2 = 0.0
        if 1 in only:
            roots = [("", ROOT)]
            if args.before:
                before = checkout(args.before, work)
                roots = [(f" [{args.before}]", before), (" [this tree]", ROOT)] * 2
            for number, (label, root) in enumerate(roots):
                vm = VictoriaMetrics(work / f"vm1-{number}").start()
                secs, rss, _ = drain(work, master, site, f"v2-{number}", ["influx"], root,
                                     influx={"url": vm.url, **influx_v2})
                got = vm.samples('{__name__="telemetry_temp"}')
                vm.stop()
                if root == ROOT:
                    rate_v2 = n / secs
                    ok &= rate_v2 >= 150_000 and got == n
                print(f"1 drain v2 -> VictoriaMetrics{label}: {n / secs:,.0f} readings/s "
                      f"({secs:.1f} s, {got:,} points of {n:,}), peak RSS "
                      f"{rss / 2**20:.0f} MB  [target >= 150k/s]")

        if 2 in only:
            vm = VictoriaMetrics(work / "vm2").start()
            base = baseline(master, n, vm)
            vm.stop()
            ratio = f"; sink / baseline = {rate_v2 / base:.2f}" if rate_v2 else ""
            print(f"2 baseline: influxdb-client batching WriteApi: {base:,.0f} readings/s"
                  f"{ratio}")

        if 3 in only:
            influx = InfluxD(work / "influxd").start()
            influx.create_database(DB)
            secs, rss, _ = drain(work, master, site, "v1", ["influx"], influx={
                "url": influx.url, "api": "v1", "database": DB, "health_interval": "1h"})
            got = influx.count(DB, field="temp")
            influx.stop()
            print(f"3 drain v1 -> InfluxDB 1.x: {n / secs:,.0f} readings/s ({secs:.1f} s, "
                  f"{got:,} points of {n:,}), peak RSS {rss / 2**20:.0f} MB")
            ok &= got == n

        if 4 in only:
            cloud = Mosquitto(work, "cloud").start()
            vm = VictoriaMetrics(work / "vm3").start()
            secs, rss, _ = drain(work, master, site, "both", ["influx", "uplink"],
                                 influx={"url": vm.url, **influx_v2}, cloud={"url": cloud.url})
            vm.stop()
            cloud.stop()
            ok &= rss <= 80 * 2**20
            print(f"4 both sinks (uplink + influx v2) draining: {n / secs:,.0f} readings/s, "
                  f"peak RSS {rss / 2**20:.0f} MB  [target <= 80 MB]")

        if 5 in only:
            rate, seconds = 5000, args.paced_seconds
            vm = VictoriaMetrics(work / "vm4").start()
            without = paced_cpu(work, site, rate, seconds)
            with_sink = paced_cpu(work, site, rate, seconds,
                                  influx={"url": vm.url, **influx_v2})
            vm.stop()
            total = rate * seconds
            per = (with_sink - without) / total * 1e6
            ok &= per <= 5
            print(f"5 paced {rate}/s for {seconds:.0f} s: gateway CPU "
                  f"{without / total * 1e6:.1f} µs/reading without the sink, "
                  f"{with_sink / total * 1e6:.1f} with it: {per:.1f} µs/reading added  "
                  "[target <= 5]")
        site.stop()

        if 6 in only:
            before, after = encode_cpu(master)
            print(f"6 encode in-process, log to line protocol: {before:.2f} µs/reading per "
                  f"reading (read, encode), {after:.2f} by columns (read_run, encode_text):"
                  f" {before / after:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
