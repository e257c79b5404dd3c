"""4. Paced 1k/s and 5k/s: gateway CPU per reading (target <= 30 µs) and latency next to the
bare subscriber paced identically; idle CPU and the bytes written to disk per reading.
With --sweep, one gateway per value, each on its own brokers, run in turn after the bare one."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from bench.harness.accounting import write_bytes
from bench.harness.gateway import GATEWAY_ID, BenchGateway
from bench.harness.run import Run
from bench.harness.table import Table, fmt_ms, ms
from bench.path.driver import Bench
from bench.path.publisher import single_payload
from bench.path.subscriber import Subscriber, wait_arrivals

NAME = "4_paced"
RATES = (1000, 5000)


def gateways(b: Bench) -> list[tuple[str, dict[str, Any]]]:
    """(label, dotted config): the one gateway "gw", or one per --sweep value."""
    return [(f"gw@{label}", config) for label, config in b.sweep] or [("gw", {})]


def measure(b: Bench, run: Run) -> dict[str, Any]:
    secs = b.paced_seconds
    site_b = run.broker("site-bare")
    bare = run.child(Subscriber(site_b.port, "sensors/#", "bare"))
    gws: dict[str, tuple[int, BenchGateway, Subscriber]] = {}
    for label, config in gateways(b):
        site_g = run.broker(f"site-{label}")
        cloud = run.broker(f"cloud-{label}")
        gw = b.gateway(run, site_g, cloud, config=config, name=label)
        cloud_sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry",
                                         "cloud"))
        gw.start_connected(cloud=True)
        gws[label] = (site_g.port, gw, cloud_sub)
    for s in (bare, *(sub for _, _, sub in gws.values())):
        s.expect("connecting", 15)
        s.expect("ready", 15)
    out: dict[str, Any] = {"gateways": list(gws), "rates": list(b.paced_rates)}
    # Idle cost (wake-ups with no traffic), which a paced load pays on top of the work.
    idle = 2.0 if b.quick else 5.0
    time.sleep(0.5)
    before = {label: (gw.cpu(), gw.write_bytes()) for label, (_, gw, _) in gws.items()}
    b0 = bare.cpu()
    time.sleep(idle)
    for label, (_, gw, _) in gws.items():
        g0, w0 = before[label]
        out[f"{label}_idle_cpu_ms_per_s"] = (gw.cpu() - g0) / idle * 1000
        out[f"{label}_idle_disk_bytes_per_s"] = (gw.write_bytes() - w0) / idle
        b.say(f"    idle {label}: {out[f'{label}_idle_disk_bytes_per_s']:.0f} bytes/s "
              "written to disk")
    out["bare_idle_cpu_ms_per_s"] = (bare.cpu() - b0) / idle * 1000
    for rate in b.paced_rates:
        n = int(rate * secs)
        # Interleaved: the baseline and the gateways at the same rate one after the other.
        targets: list[tuple[str, Subscriber, int, BenchGateway | None]] = [
            ("bare", bare, site_b.port, None),
            *((label, sub, port, gw) for label, (port, gw, sub) in gws.items())]
        for label, sub, port, gw in targets:
            cpu_of = bare.cpu if gw is None else gw.cpu
            sub.reset()
            pub = run.child(b.publisher(port, kind="single", n_msgs=n, per_msg=1, rate=rate,
                                        max_seconds=secs * 3 + 10))
            pub.expect("ready", 15)
            time.sleep(0.5)   # let the previous run's tail settle
            sys0 = gw.sys_cpu() if gw is not None else 0.0
            wb0 = gw.write_bytes() if gw is not None else 0
            cpu0 = cpu_of()
            pub.go()
            pres, why = wait_arrivals(sub, pub, n, timeout=secs * 3 + 30)
            cpu1 = cpu_of()
            if gw is not None:
                # Flash wear per reading against the bytes the sensors sent: what the
                # gateway wrote, plus the checkpoint of what it left in the WAL (which
                # it would write later), done here and counted in this process.
                payload = len(single_payload(n // 2, time.time()))
                own0 = write_bytes()
                ck = sqlite3.connect(gw.dir / "log.db")
                ck.execute("PRAGMA wal_checkpoint(PASSIVE)")
                ck.close()
                written = (gw.write_bytes() - wb0 + write_bytes() - own0) / n
                out[f"{label}_{rate}_disk_bytes_per_reading"] = written
                out[f"{label}_{rate}_disk_per_payload"] = written / payload
                b.say(f"    paced {rate}/s {label}: {written:.0f} bytes written to disk per "
                      f"reading, {written / payload:.2f}x its {payload}-byte payload")
            r = b.throughput(sub, pub, pres, why, cpu1 - cpu0, None)
            if gw is not None and cpu1 > cpu0:
                r["cpu_sys_share"] = (gw.sys_cpu() - sys0) / (cpu1 - cpu0)
            pub.stop()
            run.children.remove(pub)
            for key in ("cpu_us", "cpu_sys_share", "rate", "offered_rate", "lat_p50",
                        "lat_p99", "incomplete"):
                if key in r:
                    out[f"{label}_{rate}_{key}"] = r[key]
            b.say(f"    paced {rate}/s {label}: {r['cpu_us']:.1f} us/reading, "
                  f"p50 {fmt_ms(r['lat_p50'])} ms, p99 {fmt_ms(r['lat_p99'])} ms")
    out["rss_peak_mb"] = max(gw.peak_rss() for _, gw, _ in gws.values()) / 2**20
    return out


def rows(r: dict[str, Any], t: Table) -> None:
    s4 = r.get(NAME, {})
    if not s4 or "error" in s4:
        return
    for label in s4["gateways"]:
        tag = "" if label == "gw" else f" {label[3:]}"
        for rate in s4.get("rates", RATES):
            v = s4.get(f"{label}_{rate}_cpu_us")
            t.row(f"4 paced {rate}/s{tag} gateway CPU", v, "us/rdg",
                  s4.get(f"bare_{rate}_cpu_us"), "<= 30", None if v is None else v <= 30)
            t.row(f"4 paced {rate}/s{tag} latency p50", ms(s4.get(f"{label}_{rate}_lat_p50")),
                  "ms", ms(s4.get(f"bare_{rate}_lat_p50")))
            t.row(f"4 paced {rate}/s{tag} latency p99", ms(s4.get(f"{label}_{rate}_lat_p99")),
                  "ms", ms(s4.get(f"bare_{rate}_lat_p99")))
        t.row(f"4 idle CPU{tag}, no traffic", s4.get(f"{label}_idle_cpu_ms_per_s"), "ms/s",
              s4.get("bare_idle_cpu_ms_per_s"))
