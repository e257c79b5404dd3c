"""1. The baseline: a bare paho subscriber on the site broker, the publisher at full speed."""

from __future__ import annotations

from typing import Any

from bench.harness.run import Run
from bench.harness.table import Table
from bench.path.driver import Bench
from bench.path.subscriber import Subscriber, wait_arrivals

NAME = "1_bare"


def measure(b: Bench, run: Run) -> dict[str, Any]:
    n = b.n_single
    site = run.broker("site")
    sub = run.child(Subscriber(site.port, "sensors/#", "bare"))
    pub = run.child(b.publisher(site.port, kind="single", n_msgs=n, per_msg=1, rate=0,
                                max_seconds=b.full_cap))
    sub.expect("connecting", 15)
    sub.expect("ready", 15)
    pub.expect("ready", 15)
    cpu0 = sub.cpu()
    pub.go()
    pres, why = wait_arrivals(sub, pub, n, timeout=b.full_cap + 30)
    cpu1 = sub.cpu()
    return b.throughput(sub, pub, pres, why, cpu1 - cpu0, None)


def rows(r: dict[str, Any], t: Table) -> None:
    s1 = r.get(NAME, {})
    if s1:
        t.row("1 bare paho sub, QoS1 full speed", s1.get("rate"), "msg/s")
        t.row("1 bare sub CPU", s1.get("cpu_us"), "us/msg")
        t.row("  publisher offered rate", s1.get("offered_rate"), "msg/s")
