"""2. The gateway at full speed, one reading per message (target >= 0.85 x the bare
subscriber); also the measure of 3, arrays."""

from __future__ import annotations

from typing import Any

from bench.harness.gateway import GATEWAY_ID, BenchGateway
from bench.harness.run import Run
from bench.harness.table import Table, ms
from bench.path.driver import Bench
from bench.path.publisher import ARRAY
from bench.path.subscriber import Subscriber, wait_arrivals

NAME = "2_gw_single"


def measure(b: Bench, run: Run) -> dict[str, Any]:
    return gateway_full(b, run, "single", b.n_single)


def gateway_full(b: Bench, run: Run, kind: str, n_readings: int) -> dict[str, Any]:
    per = ARRAY if kind == "array" else 1
    site = run.broker("site")
    cloud = run.broker("cloud")
    gw = b.gateway(run, site, cloud)
    sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry", "cloud"))
    pub = run.child(b.publisher(site.port, kind=kind, n_msgs=n_readings // per, per_msg=per,
                                rate=0, max_seconds=b.full_cap))
    gw.start_connected(cloud=True)
    sub.expect("connecting", 15)
    sub.expect("ready", 15)
    pub.expect("ready", 15)
    rss0 = gw.peak_rss()
    site0 = gw.metric("fieldgate_site_messages_total") or 0.0
    sys0, cpu0 = gw.sys_cpu(), gw.cpu()
    pub.go()
    pres, why = wait_arrivals(sub, pub, n_readings, timeout=b.full_cap + 60)
    sys1, cpu1 = gw.sys_cpu(), gw.cpu()
    out = b.throughput(sub, pub, pres, why, cpu1 - cpu0, gw)
    out["cpu_sys_share"] = (sys1 - sys0) / (cpu1 - cpu0) if cpu1 > cpu0 else None
    out["rss_idle_mb"] = rss0 / 2**20
    _site_copies(b, gw, site0, pres, out)
    gw.stop()
    if gw.ru_maxrss_kib:
        out["ru_maxrss_mb"] = gw.ru_maxrss_kib / 1024
    if gw.vm_hwm_kib:
        out["vm_hwm_mb"] = gw.vm_hwm_kib / 1024
    out["gateway_exit"] = gw.exit_code
    return out


def _site_copies(b: Bench, gw: BenchGateway, site0: float, pres: dict[str, Any] | None,
                 out: dict[str, Any]) -> None:
    """Site messages the gateway handled per message published (1.0 unless it is sent
    copies, e.g. for overlapping subscriptions)."""
    site1 = gw.metric("fieldgate_site_messages_total")
    if site1 is not None and pres and pres["sent"]:
        out["site_msgs_per_pub"] = (site1 - site0) / pres["sent"]
        if out["site_msgs_per_pub"] > 1.05:
            b.notes.append(f"gateway handled {out['site_msgs_per_pub']:.2f} site messages "
                           "per message published (overlapping subscriptions deliver "
                           "copies)")


def rows(r: dict[str, Any], t: Table) -> None:
    s1, s2 = r.get("1_bare", {}), r.get(NAME, {})
    bare_rate = s1.get("rate")
    if s2:
        v = s2.get("rate")
        ratio = v / bare_rate if v and bare_rate else None
        t.row("2 gateway, single readings", v, "rdg/s", bare_rate, ">= 0.85 x",
              None if ratio is None else ratio >= 0.85 and not s2.get("incomplete"), ratio)
        t.row("2 gateway CPU", s2.get("cpu_us"), "us/rdg", s1.get("cpu_us"))
        t.row("2 gateway RSS peak (sampled)", s2.get("rss_peak_mb"), "MB")
        t.row("2 gateway ru_maxrss", s2.get("ru_maxrss_mb"), "MB")
        t.row("2 latency p50 pub->cloud", ms(s2.get("lat_p50")), "ms", ms(s1.get("lat_p50")))
        t.row("2 latency p99 pub->cloud", ms(s2.get("lat_p99")), "ms", ms(s1.get("lat_p99")))
        t.row("2 longest pause in arrivals", ms(s2.get("max_gap_s")), "ms",
              ms(s1.get("max_gap_s")))
