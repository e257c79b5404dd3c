"""3. The gateway at full speed, arrays of 100 readings per message (target >= 200k/s)."""

from __future__ import annotations

from typing import Any

from bench.harness.run import Run
from bench.harness.table import Table, ms
from bench.path.driver import Bench
from bench.path.s2_single import gateway_full

NAME = "3_gw_array"


def measure(b: Bench, run: Run) -> dict[str, Any]:
    return gateway_full(b, run, "array", b.n_array_readings)


def rows(r: dict[str, Any], t: Table) -> None:
    s3 = r.get(NAME, {})
    if s3:
        v = s3.get("rate")
        t.row("3 gateway, arrays of 100", v, "rdg/s", s3.get("offered_rate"), ">= 200000",
              None if v is None else v >= 200_000 and not s3.get("incomplete"))
        t.row("3 gateway CPU", s3.get("cpu_us"), "us/rdg")
        t.row("3 longest pause in arrivals", ms(s3.get("max_gap_s")), "ms")
        t.row("3 gateway RSS peak (sampled)", s3.get("rss_peak_mb"), "MB")
        t.row("3 gateway ru_maxrss", s3.get("ru_maxrss_mb"), "MB")
