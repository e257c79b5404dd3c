"""6. Latency with the config defaults against the old defaults (and, with --baseline-src,
an older checkout): publish -> cloud at paced 1k/s and 5k/s, then reading -> alert event at
the cloud while 1k/s of telemetry flows (target: p99 beyond the tick <= 100 ms)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.harness.accounting import pct
from bench.harness.gateway import GATEWAY_ID, BenchGateway
from bench.harness.run import Run
from bench.harness.table import Table, fmt_ms, ms
from bench.path.alerter import ALERT_RULES, Alerter
from bench.path.driver import Bench
from bench.path.subscriber import Subscriber, wait_arrivals
from gateway.mosquitto import Mosquitto
from tests.tools import ROOT

NAME = "6_latency"
RATES = (1000, 5000)


def variants(b: Bench) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, checkout, config) to compare: the old defaults (batching: delay, 200 ms), the
    defaults, and with --baseline-src an older checkout with its own defaults; with --sweep,
    one per value instead (the first is the others' baseline in the summary)."""
    if b.sweep:
        return [(label, ROOT, config) for label, config in b.sweep]
    out: list[tuple[str, Path, dict[str, Any]]] = [
        ("old", ROOT, {"uplink.batching": "delay", "uplink.batch_max_delay": "200ms"}),
        ("new", ROOT, {}),
    ]
    if b.args.baseline_src:
        out.insert(0, ("before", b.args.baseline_src.resolve(),
                       {"uplink.batch_max_delay": "200ms"}))
    return out


def tick_seconds(b: Bench) -> float:
    from fieldkit.units import parse_duration  # noqa: PLC0415
    from gateway.config import EngineSection  # noqa: PLC0415 - the bench's only use

    tick = b.overrides.get("engine.tick", EngineSection.model_fields["tick"].default)
    return parse_duration(tick)


def measure(b: Bench, run: Run) -> dict[str, Any]:
    configs = variants(b)
    secs = b.paced_seconds
    out: dict[str, Any] = {"variants": [name for name, _, _ in configs]}
    topic = f"fieldgate/{GATEWAY_ID}/telemetry"
    # (1) publish -> cloud at paced rates, each configuration on its own brokers;
    # interleaved, so that the machine's load changes hit all of them alike.
    gws: dict[str, tuple[Mosquitto, BenchGateway, Subscriber]] = {}
    for name, src, config in configs:
        site, cloud = run.broker(f"site-{name}"), run.broker(f"cloud-{name}")
        gw = b.gateway(run, site, cloud, batch_delay=None, config=config, name=f"gw-{name}",
                       src=src)
        sub = run.child(Subscriber(cloud.port, topic, "cloud"))
        gw.start_connected(cloud=True)
        sub.expect("connecting", 15)
        sub.expect("ready", 15)
        gws[name] = (site, gw, sub)
    for rate in RATES:
        n = int(rate * secs)
        for name, (site, gw, sub) in gws.items():
            sub.reset()
            pub = run.child(b.publisher(site.port, kind="single", n_msgs=n, per_msg=1,
                                        rate=rate, max_seconds=secs * 3 + 10))
            pub.expect("ready", 15)
            time.sleep(0.5)
            cpu0 = gw.cpu()
            pub.go()
            pres, why = wait_arrivals(sub, pub, n, timeout=secs * 3 + 30)
            cpu1 = gw.cpu()
            r = b.throughput(sub, pub, pres, why, cpu1 - cpu0, None)
            pub.stop()
            run.children.remove(pub)
            for key in ("cpu_us", "lat_p50", "lat_p99", "incomplete"):
                if key in r:
                    out[f"{name}_{rate}_{key}"] = r[key]
            b.say(f"    paced {rate}/s {name}: {r['cpu_us']:.1f} us/reading, "
                  f"p50 {fmt_ms(r['lat_p50'])} ms, p99 {fmt_ms(r['lat_p99'])} ms")
    for _, gw, _ in gws.values():
        gw.stop()
    # (2) alerts (for: 0s) while 1k/s of telemetry flows.
    tick = tick_seconds(b)
    out["tick_s"] = tick
    n_alerts = 20 if b.quick else 50
    gap = (0.1, 0.5)   # seconds between alarms, at random: any phase against the tick
    rules = run.dir / "alert-rules.yaml"
    rules.write_text(ALERT_RULES)
    for name, src, config in configs:
        site, cloud = run.broker(f"site-{name}-a"), run.broker(f"cloud-{name}-a")
        gw = b.gateway(run, site, cloud, batch_delay=None,
                       config={**config, "rules": [str(rules)]}, name=f"gwa-{name}", src=src)
        sub = run.child(Subscriber(cloud.port, topic, "cloud"))
        gw.start_connected(cloud=True)
        sub.expect("connecting", 15)
        sub.expect("ready", 15)
        alerter = run.child(Alerter(site.port, cloud.port, n=n_alerts, gap=gap, seed=6,
                                    wait=tick + 10))
        alerter.expect("ready", 15)
        span = n_alerts * sum(gap) / 2 + tick + 12
        pub = run.child(b.publisher(site.port, kind="single", n_msgs=int(1000 * span),
                                    per_msg=1, rate=1000, max_seconds=span + 5))
        pub.expect("ready", 15)
        pub.go()
        time.sleep(1.0)
        alerter.go()
        res = alerter.expect("done", span + 30)
        pub.proc.terminate()
        pub.stop()
        run.children.remove(pub)
        gw.stop()
        lat = res["latency"]
        # Beyond the evaluation interval: the latency less the wait for the tick that
        # fired the alert, that wait counted up to one interval at most (a reading that
        # missed a tick, e.g. while waiting for its commit, pays the excess).
        beyond = [total - min(wait, tick)
                  for total, wait in zip(lat, res["reading_to_tick"], strict=True)]
        out[f"{name}_alert_p50"] = pct(lat, 0.5)
        out[f"{name}_alert_p99"] = pct(lat, 0.99)
        out[f"{name}_alert_beyond_p50"] = pct(beyond, 0.5)
        out[f"{name}_alert_beyond_p99"] = pct(beyond, 0.99)
        out[f"{name}_alert_tick_p50"] = pct(res["tick_to_cloud"], 0.5)
        out[f"{name}_alert_tick_p99"] = pct(res["tick_to_cloud"], 0.99)
        out[f"{name}_alert_missing"] = res["missing"]
        if res["missing"]:
            b.notes.append(f"alerts ({name}): {res['missing']} of {n_alerts} events "
                           "did not arrive")
        b.say(f"    alerts {name}: reading->cloud p50 {fmt_ms(pct(lat, 0.5))} ms, "
              f"p99 {fmt_ms(pct(lat, 0.99))} ms (tick {tick * 1000:.0f} ms); beyond "
              f"the tick p50 {fmt_ms(pct(beyond, 0.5))} ms, p99 "
              f"{fmt_ms(pct(beyond, 0.99))} ms; tick->cloud p50 "
              f"{fmt_ms(out[f'{name}_alert_tick_p50'])} ms, "
              f"p99 {fmt_ms(out[f'{name}_alert_tick_p99'])} ms")
    return out


def rows(r: dict[str, Any], t: Table) -> None:
    """The defaults ("new") with the old defaults in the same run as the baseline, and an
    older checkout ("before") when one was given."""
    s6 = r.get(NAME, {})
    if not s6 or "error" in s6:
        return
    if "new" not in s6["variants"]:
        sweep_rows(s6, t)
        return
    bases = [base for base in ("old", "before") if base in s6["variants"]]
    for base in bases:
        tag = "old defaults" if base == "old" else "before"
        t.row(f"6 baseline: {tag}", None, "")
        for rate in RATES:
            t.row(f"6 paced {rate}/s CPU", s6.get(f"new_{rate}_cpu_us"), "us/rdg",
                  s6.get(f"{base}_{rate}_cpu_us"))
            t.row(f"6 paced {rate}/s pub->cloud p50", ms(s6.get(f"new_{rate}_lat_p50")), "ms",
                  ms(s6.get(f"{base}_{rate}_lat_p50")))
            t.row(f"6 paced {rate}/s pub->cloud p99", ms(s6.get(f"new_{rate}_lat_p99")), "ms",
                  ms(s6.get(f"{base}_{rate}_lat_p99")))
        t.row("6 alert reading->cloud p50", ms(s6.get("new_alert_p50")), "ms",
              ms(s6.get(f"{base}_alert_p50")))
        t.row("6 alert reading->cloud p99", ms(s6.get("new_alert_p99")), "ms",
              ms(s6.get(f"{base}_alert_p99")))
        t.row("6 alert beyond the tick p50", ms(s6.get("new_alert_beyond_p50")), "ms",
              ms(s6.get(f"{base}_alert_beyond_p50")))
        beyond = s6.get("new_alert_beyond_p99")
        t.row("6 alert beyond the tick p99", ms(beyond), "ms",
              ms(s6.get(f"{base}_alert_beyond_p99")), "<= 100",
              None if beyond is None else beyond <= 0.1 and not s6.get("new_alert_missing"))
        t.row("6 alert tick->cloud p50", ms(s6.get("new_alert_tick_p50")), "ms",
              ms(s6.get(f"{base}_alert_tick_p50")))
        t.row("6 alert tick->cloud p99", ms(s6.get("new_alert_tick_p99")), "ms",
              ms(s6.get(f"{base}_alert_tick_p99")))


def sweep_rows(s6: dict[str, Any], t: Table) -> None:
    """--sweep: each value's figures, the first value's as the baseline."""
    first = s6["variants"][0]
    for name in s6["variants"]:
        def row(label: str, key: str, unit: str = "ms", target: str = "",
                ok: bool | None = None, name: str = name) -> None:
            scale = ms if unit == "ms" else (lambda x: x)
            t.row(f"6 {name} {label}", scale(s6.get(f"{name}_{key}")), unit,
                  scale(s6.get(f"{first}_{key}")), target, ok)
        for rate in RATES:
            row(f"paced {rate}/s CPU", f"{rate}_cpu_us", "us/rdg")
            row(f"{rate}/s pub->cloud p50", f"{rate}_lat_p50")
            row(f"{rate}/s pub->cloud p99", f"{rate}_lat_p99")
        row("alert reading->cloud p99", "alert_p99")
        row("alert beyond the tick p50", "alert_beyond_p50")
        beyond = s6.get(f"{name}_alert_beyond_p99")
        row("alert beyond the tick p99", "alert_beyond_p99", "ms", "<= 100",
            None if beyond is None else beyond <= 0.1 and not s6.get(f"{name}_alert_missing"))
