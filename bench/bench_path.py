#!/usr/bin/env python
"""Benchmark of the real data path: site Mosquitto -> `gateway run` -> cloud Mosquitto.

Every figure is printed next to a baseline measured in the same run (a bare paho-mqtt
subscriber fed by the same publisher), because these machines are noisy. Everything runs on
127.0.0.1 as separate processes: Mosquitto brokers (gateway.mosquitto), the gateway, one
publisher process and one subscriber process per scenario.

    python bench/bench_path.py            # full run, about 3-5 minutes
    python bench/bench_path.py --quick    # about a minute
    python bench/bench_path.py --json out.json --scenarios 2,5
    python bench/bench_path.py --quick --scenarios 6 --baseline-src /tmp/fieldgate-old
        # latency: the defaults against the old ones (and against an older checkout)
    python bench/bench_path.py --scenarios 4,6 --sweep ingest.commit_interval=50ms,100ms
        # a trade-off curve: one gateway per value, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness.table import Table  # noqa: E402
from bench.path import (  # noqa: E402
    s1_bare,
    s2_single,
    s3_array,
    s4_paced,
    s5_drain,
    s6_latency,
)
from bench.path.driver import Bench  # noqa: E402
from bench.path.publisher import PUB_INFLIGHT, WINDOW  # noqa: E402

# --scenarios key -> the scenario's module (NAME, measure, rows), in the summary's order.
SCENARIOS = {"1": s1_bare, "2": s2_single, "3": s3_array, "4": s4_paced, "5": s5_drain,
             "6": s6_latency}


def summary(bench: Bench) -> Table:
    table = Table()
    for scenario in SCENARIOS.values():
        scenario.rows(bench.results, table)
    for name, res in bench.results.items():
        if "error" in res:
            table.row(f"{name} FAILED", None, "", target=res["error"].splitlines()[0][:60],
                      ok=False)
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    ap.add_argument("--json", type=Path, help="write results as JSON to this path")
    ap.add_argument("--scenarios", default="1,2,3,4,5,6", help="comma-separated subset of 1-6")
    ap.add_argument("--batch-delay", default="50ms", help="uplink.batch_max_delay (default 50ms)")
    ap.add_argument("--pub-inflight", type=int, default=PUB_INFLIGHT,
                    help="publisher's paho max_inflight_messages (0 = no paho limit)")
    ap.add_argument("--pub-window", type=int, default=WINDOW,
                    help="publisher's bound on unacknowledged publishes (<= 20000)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                    help="extra gateway config (YAML value), e.g. "
                    "--set ingest.commit_interval=20ms")
    ap.add_argument("--sweep", default="", metavar="SECTION.OPTION=V1,V2,...",
                    help="scenarios 4 and 6 run one gateway per value, interleaved in the "
                    "same run, e.g. --sweep ingest.commit_interval=50ms,75ms,100ms")
    ap.add_argument("--n", type=int, default=0, help="messages in scenarios 1 and 2")
    ap.add_argument("--paced-seconds", type=float, default=0.0,
                    help="seconds each paced rate runs in scenarios 4 and 6 (default 10, "
                    "3 with --quick); longer evens out a noisy machine")
    ap.add_argument("--paced-rates", default="1000,5000",
                    help="scenario 4's paced rates, readings/s (default 1000,5000)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="scenario 6 also runs the gateway from this checkout (e.g. "
                    "`git archive <commit> | tar -x -C DIR`) with its own defaults")
    args = ap.parse_args()
    bench = Bench(args)
    started = time.time()
    print(f"Fieldgate data-path bench ({'quick' if args.quick else 'full'}): "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"batch_max_delay {args.batch_delay}, gateway overrides {bench.overrides or '-'}, "
          f"sweep {args.sweep or '-'}, "
          f"work dir {bench.root}", flush=True)
    try:
        for key in args.scenarios.split(","):
            scenario = SCENARIOS[key.strip()]
            bench.say(f"- scenario {scenario.NAME}")
            bench.run_scenario(scenario.NAME,
                               lambda run, s=scenario: s.measure(bench, run))
    except KeyboardInterrupt:
        bench.notes.append("interrupted")
    finally:
        shutil.rmtree(bench.root, ignore_errors=True)
    table = summary(bench)
    print()
    print(f"Summary ({time.time() - started:.0f} s; rdg = readings; baseline = bare paho "
          "subscriber in the same run, for scenario 3 the publisher's offered rate)")
    table.print()
    if bench.notes:
        print("\nNotes:")
        for note in dict.fromkeys(bench.notes):
            print(f"  {note}")
    if args.json:
        args.json.write_text(json.dumps({
            "quick": args.quick, "cpus": os.cpu_count(), "batch_max_delay": args.batch_delay,
            "overrides": bench.overrides, "sweep": args.sweep,
            "rows": table.rows, "results": bench.results, "notes": bench.notes,
            "seconds": time.time() - started,
        }, indent=2, default=str))
    return 1 if table.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
