"""The data-path bench's driver: sizes from the command line, the gateway each scenario
starts, running a scenario in its own ``Run``, and the throughput figures scenarios share."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.harness.accounting import pct
from bench.harness.gateway import BenchGateway
from bench.harness.run import Run
from bench.path.publisher import Publisher
from bench.path.subscriber import S_LAST, Subscriber
from gateway.mosquitto import Mosquitto
from tests.tools import ROOT, merge_sections


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"uplink.batching": "delay", "rules": […]}`` as config sections."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        section, _, option = key.partition(".")
        merge_sections(out, {section: {option: value}} if option else {section: value})
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.root = Path(tempfile.mkdtemp(prefix="fieldgate-bench-", dir="/tmp"))
        self.results: dict[str, Any] = {}
        # --set section.option=value, values in YAML
        self.overrides = {k: yaml.safe_load(v) for k, _, v in
                          (item.partition("=") for item in args.set)}
        # --sweep section.option=v1,v2,…: scenarios 4 and 6 run one gateway per value,
        # interleaved, as (label, dotted config) in the order given.
        self.sweep: list[tuple[str, dict[str, Any]]] = []
        if args.sweep:
            key, _, values = args.sweep.partition("=")
            self.sweep = [(v.strip(), {key.strip(): yaml.safe_load(v)})
                          for v in values.split(",") if v.strip()]
        self.notes: list[str] = []
        q = self.quick
        self.n_single = args.n or (40_000 if q else 200_000)
        self.n_array_readings = 200_000 if q else 1_000_000
        self.paced_seconds = args.paced_seconds or (3.0 if q else 10.0)
        self.paced_rates = tuple(int(r) for r in args.paced_rates.split(",") if r.strip())
        self.n_drain = 200_000 if q else 1_000_000
        self.full_cap = 40.0 if q else 90.0   # seconds any one full-speed publish may take

    def publisher(self, port: int, **spec: Any) -> Publisher:
        return Publisher(port, inflight=self.args.pub_inflight,
                         window=min(20_000, self.args.pub_window), **spec)

    def gateway(self, run: Run, site: Mosquitto, cloud: Mosquitto, *,
                batch_delay: str | None = "", config: dict[str, Any] | None = None,
                name: str = "gw", src: Path = ROOT) -> BenchGateway:
        """A gateway between the run's brokers: a cloud that comes back is retried within a
        second; ``batch_delay`` "" is --batch-delay, None the uplink's default; ``config``
        (dotted keys, as --set) is laid over the --set overrides."""
        if batch_delay == "":
            batch_delay = self.args.batch_delay
        uplink = {"backoff_min": "200ms", "backoff_max": "1s"}
        if batch_delay is not None:
            uplink["batch_max_delay"] = batch_delay
        sections = merge_sections({"uplink": uplink},
                                  nested({**self.overrides, **(config or {})}))
        return run.gateway(site, cloud, name=name, src=src, **sections)

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def run_scenario(self, name: str, fn: Callable[[Run], dict[str, Any]]) -> None:
        run = Run(self.root, name)
        t0 = time.time()
        try:
            self.results[name] = fn(run)
        except Exception as err:
            self.results[name] = {"error": str(err)}
            self.notes.append(f"{name} failed: {err}".splitlines()[0])
            traceback.print_exc()
        finally:
            run.close(self.notes)
            shutil.rmtree(run.dir, ignore_errors=True)
        self.say(f"  [{name} took {time.time() - t0:.1f}s] {brief(self.results[name])}")

    def throughput(self, sub: Subscriber, pub: Publisher, pres: dict[str, Any] | None,
                   why: str, cpu: float, gw: BenchGateway | None) -> dict[str, Any]:
        """Rate from first publish to last arrival, CPU µs per arrival, latency samples."""
        fin = sub.final()
        count = fin["count"]
        sh = sub.shared
        out: dict[str, Any] = {"received": count}
        if pres:
            span = sh[S_LAST] - pres["t_first"]
            out["rate"] = count / span if span > 0 else 0.0
            pub_span = pres["t_last"] - pres["t_first"]
            out["offered_rate"] = pres["sent"] * pub.spec["per_msg"] / pub_span if pub_span else 0
            out["sent_msgs"] = pres["sent"]
            out["publisher_cpu_us_per_msg"] = pres["cpu"] / max(1, pres["sent"]) * 1e6
            out["payload_bytes"] = pres["payload_bytes"]
            if pres["unacked"]:
                self.notes.append(f"publisher left {pres['unacked']} publishes unacknowledged")
        out["cpu_us"] = cpu / max(1, count) * 1e6
        out["lat_p50"] = pct(fin["samples"], 0.5)
        out["lat_p99"] = pct(fin["samples"], 0.99)
        out["lat_samples"] = len(fin["samples"])
        out["max_gap_s"] = fin["maxgap"]   # longest pause between two arrivals
        if fin["dups"]:
            out["duplicates"] = fin["dups"]
        if why:
            out["incomplete"] = why
            expected = pres["sent"] * pub.spec["per_msg"] if pres else "?"
            self.notes.append(f"incomplete run ({why}): {count} of {expected} arrived")
        if gw is not None:
            out["rss_peak_mb"] = gw.peak_rss() / 2**20
        return out


def brief(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in r.items() if not isinstance(v, (list, dict)))
