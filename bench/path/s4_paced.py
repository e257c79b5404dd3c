"""4. Paced 1k/s and 5k/s: gateway CPU per reading (target <= 30 µs) and latency next to the
bare subscriber paced identically; idle CPU and the bytes written to disk per reading."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from bench.harness.accounting import write_bytes
from bench.harness.gateway import GATEWAY_ID
from bench.harness.run import Run
from bench.harness.table import Table, fmt_ms, ms
from bench.path.driver import Bench
from bench.path.publisher import single_payload
from bench.path.subscriber import Subscriber, wait_arrivals

NAME = "4_paced"
RATES = (1000, 5000)


def measure(b: Bench, run: Run) -> dict[str, Any]:
    secs = b.paced_seconds
    site_b = run.broker("site-bare")
    site_g = run.broker("site-gw")
    cloud = run.broker("cloud")
    gw = b.gateway(run, site_g, cloud)
    bare = run.child(Subscriber(site_b.port, "sensors/#", "bare"))
    cloud_sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry", "cloud"))
    gw.start_connected(cloud=True)
    for s in (bare, cloud_sub):
        s.expect("connecting", 15)
        s.expect("ready", 15)
    out: dict[str, Any] = {}
    # Idle cost (wake-ups with no traffic), which a paced load pays on top of the work.
    idle = 2.0 if b.quick else 5.0
    time.sleep(0.5)
    g0, b0, w0 = gw.cpu(), bare.cpu(), gw.write_bytes()
    time.sleep(idle)
    out["gw_idle_cpu_ms_per_s"] = (gw.cpu() - g0) / idle * 1000
    out["gw_idle_disk_bytes_per_s"] = (gw.write_bytes() - w0) / idle
    b.say(f"    idle: {out['gw_idle_disk_bytes_per_s']:.0f} bytes/s written to disk")
    out["bare_idle_cpu_ms_per_s"] = (bare.cpu() - b0) / idle * 1000
    for rate in RATES:
        n = int(rate * secs)
        # Interleaved: the baseline and the gateway at the same rate one after the other.
        for label, sub, port, cpu_of in (("bare", bare, site_b.port, bare.cpu),
                                         ("gw", cloud_sub, site_g.port, gw.cpu)):
            sub.reset()
            pub = run.child(b.publisher(port, kind="single", n_msgs=n, per_msg=1, rate=rate,
                                        max_seconds=secs * 3 + 10))
            pub.expect("ready", 15)
            time.sleep(0.5)   # let the previous run's tail settle
            sys0 = gw.sys_cpu() if label == "gw" else 0.0
            wb0 = gw.write_bytes()
            cpu0 = cpu_of()
            pub.go()
            pres, why = wait_arrivals(sub, pub, n, timeout=secs * 3 + 30)
            cpu1 = cpu_of()
            if label == "gw":
                # Flash wear per reading against the bytes the sensors sent: what the
                # gateway wrote, plus the checkpoint of what it left in the WAL (which
                # it would write later), done here and counted in this process.
                payload = len(single_payload(n // 2, time.time()))
                own0 = write_bytes()
                ck = sqlite3.connect(gw.dir / "log.db")
                ck.execute("PRAGMA wal_checkpoint(PASSIVE)")
                ck.close()
                written = (gw.write_bytes() - wb0 + write_bytes() - own0) / n
                out[f"gw_{rate}_disk_bytes_per_reading"] = written
                out[f"gw_{rate}_disk_per_payload"] = written / payload
                b.say(f"    paced {rate}/s: {written:.0f} bytes written to disk per "
                      f"reading, {written / payload:.2f}x its {payload}-byte payload")
            r = b.throughput(sub, pub, pres, why, cpu1 - cpu0, None)
            if label == "gw" and cpu1 > cpu0:
                r["cpu_sys_share"] = (gw.sys_cpu() - sys0) / (cpu1 - cpu0)
            pub.stop()
            run.children.remove(pub)
            for key in ("cpu_us", "cpu_sys_share", "rate", "offered_rate", "lat_p50",
                        "lat_p99", "incomplete"):
                if key in r:
                    out[f"{label}_{rate}_{key}"] = r[key]
            b.say(f"    paced {rate}/s {label}: {r['cpu_us']:.1f} us/reading, "
                  f"p50 {fmt_ms(r['lat_p50'])} ms, p99 {fmt_ms(r['lat_p99'])} ms")
    out["rss_peak_mb"] = gw.peak_rss() / 2**20
    return out


def rows(r: dict[str, Any], t: Table) -> None:
    s4 = r.get(NAME, {})
    if s4:
        for rate in RATES:
            v = s4.get(f"gw_{rate}_cpu_us")
            t.row(f"4 paced {rate}/s gateway CPU", v, "us/rdg", s4.get(f"bare_{rate}_cpu_us"),
                  "<= 30", None if v is None else v <= 30)
            t.row(f"4 paced {rate}/s latency p50", ms(s4.get(f"gw_{rate}_lat_p50")), "ms",
                  ms(s4.get(f"bare_{rate}_lat_p50")))
            t.row(f"4 paced {rate}/s latency p99", ms(s4.get(f"gw_{rate}_lat_p99")), "ms",
                  ms(s4.get(f"bare_{rate}_lat_p99")))
        t.row("4 idle CPU, no traffic", s4.get("gw_idle_cpu_ms_per_s"), "ms/s",
              s4.get("bare_idle_cpu_ms_per_s"))
