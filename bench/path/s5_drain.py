"""5. Drain: the cloud broker down while N readings reach the log, then started; readings/s
from the first to the last arrival (target >= 50k/s)."""

from __future__ import annotations

import time
from typing import Any

from bench.harness.gateway import GATEWAY_ID
from bench.harness.run import Run
from bench.harness.table import Table
from bench.path.driver import Bench
from bench.path.publisher import ARRAY
from bench.path.subscriber import S_COUNT, S_FIRST, S_FIRSTSEQ, S_LAST, S_MAXSEQ, Subscriber

NAME = "5_drain"


def measure(b: Bench, run: Run) -> dict[str, Any]:
    n = b.n_drain
    site = run.broker("site")
    cloud = run.broker("cloud", start=False)
    gw = b.gateway(run, site, cloud)
    gw.start_connected(cloud=False)
    pub = run.child(b.publisher(site.port, kind="array", n_msgs=n // ARRAY, per_msg=ARRAY,
                                rate=0, max_seconds=b.full_cap))
    pub.expect("ready", 15)
    t0 = time.time()
    pub.go()
    deadline = t0 + b.full_cap + 120
    logged = 0.0
    pres = None
    while time.time() < deadline:
        if pres is None:
            pres = pub.result(0)
        logged = gw.metric("fieldgate_readings_total") or 0.0
        if logged >= n:
            break
        time.sleep(0.2)
    t_logged = time.time()
    out: dict[str, Any] = {"logged": int(logged),
                           "ingest_rate_offline": logged / (t_logged - t0)}
    if logged < n:
        out["incomplete"] = "log did not reach the count"
        b.notes.append(f"drain: only {int(logged)} of {n} readings reached the log")
    # The counting subscriber retries its connect every 5 ms, so it is subscribed within a
    # few ms of the broker coming up, before the gateway's next reconnect attempt.
    sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry", "cloud",
                               connect_timeout=30))
    sub.expect("connecting", 15)
    time.sleep(0.2)
    cpu0 = gw.cpu()
    t_up = time.time()
    cloud.start()
    sub.expect("ready", 15)
    target = int(logged)
    deadline = time.time() + (60 if b.quick else 150)
    last, last_change = -1.0, time.time()
    why = ""
    sh = sub.shared
    while True:
        maxseq = int(sh[S_MAXSEQ])
        if maxseq >= target:
            break
        if sh[S_COUNT] != last:
            last, last_change = sh[S_COUNT], time.time()
        if time.time() > deadline:
            why = "timeout"
            break
        if sh[S_COUNT] and time.time() - last_change > 10:
            why = "stalled"
            break
        time.sleep(0.01)
    cpu1 = gw.cpu()
    fin = sub.final()
    span = sh[S_LAST] - sh[S_FIRST]
    out.update({
        "received": fin["count"],
        "rate": fin["count"] / span if span > 0 else 0.0,
        "reconnect_s": sh[S_FIRST] - t_up if sh[S_FIRST] else None,
        "first_seq": int(sh[S_FIRSTSEQ]),
        "cpu_us": (cpu1 - cpu0) / max(1, fin["count"]) * 1e6,
        "rss_peak_mb": gw.peak_rss() / 2**20,
    })
    if fin["dups"]:
        out["duplicates"] = fin["dups"]
    if int(sh[S_FIRSTSEQ]) > 1:
        b.notes.append(f"drain: subscriber missed seq 1..{int(sh[S_FIRSTSEQ]) - 1} "
                       "(gateway reconnected before the subscription)")
    if why:
        out["incomplete"] = why
        b.notes.append(f"drain {why}: {fin['count']} of {target} arrived, "
                       f"max seq {fin['maxseq']}")
    return out


def rows(r: dict[str, Any], t: Table) -> None:
    s5 = r.get(NAME, {})
    if s5:
        v = s5.get("rate")
        t.row(f"5 drain {s5.get('logged', 0):,} after outage", v, "rdg/s", None, ">= 50000",
              None if v is None else v >= 50_000 and not s5.get("incomplete"))
        t.row("5 drain CPU", s5.get("cpu_us"), "us/rdg")
        t.row("5 ingest into log, cloud down", s5.get("ingest_rate_offline"), "rdg/s")
