"""Emulator load: how many messages a second one `devices simulate` process publishes.

Runs `devices simulate --devices 2000 --rate R` against a local Mosquitto for a few seconds,
paced (5k, 20k, 50k/s) and at full speed (a rate no machine keeps), at QoS 0 and QoS 1, and
reports the achieved rate and lateness next to a bare publisher measured in the same run
against the same broker: fieldmqtt's MqttSession alone, publishing pre-built payloads with
an in-flight window of 10,000 — the ceiling of this broker and this MQTT layer. The ratio
of the full-speed row is the emulator's share of that ceiling. Beside it: the fleet model
alone (making the same messages, no broker, in this process) and the CPU time per message
of the emulator process and of the bare publisher, which the machine's other load moves
less than the rates.

    python bench/bench_devices.py [--seconds 8] [--full-only]
"""

from __future__ import annotations

import argparse
import re
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness.accounting import rusage_cpu as _cpu  # noqa: E402
from devices.cli import _builtin_fleet  # noqa: E402
from devices.generator import FleetModel  # noqa: E402
from fieldmqtt import MqttSession, Published, SessionConfig  # noqa: E402
from gateway.mosquitto import Mosquitto  # noqa: E402

_SENT = re.compile(r"sent (\d+) messages in ([\d.]+) s")
_LATE = re.compile(r"(\d+) messages went out more than 1 s late")
# Far beyond what one process publishes: the emulator runs flat out, everything is late.
FULL_SPEED = 10_000_000
BARE_WINDOW = 10_000


def model_only(qos: int, seconds: float) -> float:
    """Messages/s the fleet model makes with nothing to send them to (CPU time)."""
    model = FleetModel(_builtin_fleet(2000, FULL_SPEED, "json", qos), start=time.time())
    made = 0
    start = _cpu(resource.RUSAGE_SELF)
    while _cpu(resource.RUSAGE_SELF) - start < seconds:
        made += len(model.due(1e12, 2000))
    return made / (_cpu(resource.RUSAGE_SELF) - start)


def bare_publisher(port: int, qos: int, seconds: float) -> tuple[float, float]:
    """Messages/s of an MqttSession publishing pre-built payloads, with nothing else to
    do, and its CPU µs per message."""
    session = MqttSession(SessionConfig(host="127.0.0.1", port=port, client_id="bench-bare",
                                        max_inflight=BARE_WINDOW))
    session.connect()
    session.run_until(lambda: session.connected, 10)
    payload = b'{"ts":1800000000.123,"temp":21.37,"hum":45.12}'
    topics = [f"sensors/dev-{n}/telemetry" for n in range(1, 2001)]
    sent = acked = 0
    cpu = _cpu(resource.RUSAGE_SELF)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not session.wants_write():  # as the emulator: a batch once the last one is out
            for _ in range(2000):
                if qos and not session.can_publish():
                    break
                session.publish(topics[sent % 2000], payload, qos=qos)
                sent += 1
        select.select([session], [session] if session.wants_write() else [], [],
                      0 if session.can_publish() and not session.wants_write() else 0.05)
        acked += sum(1 for e in session.step() if type(e) is Published)
    while qos and acked < sent:
        acked += sum(1 for e in session.run_once(1.0) if type(e) is Published)
    rate = sent / (time.monotonic() - start)
    cpu = _cpu(resource.RUSAGE_SELF) - cpu
    session.disconnect()
    return rate, cpu / sent * 1e6


def emulator(url: str, rate: int, qos: int, seconds: float) -> tuple[float, int, float]:
    """Achieved messages/s, late messages, CPU µs per message (start-up included)."""
    cpu = _cpu(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, "-m", "devices", "simulate", "--broker", url, "--devices", "2000",
         "--rate", str(rate), "--qos", str(qos), "--duration", f"{seconds}s"],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds * 10 + 60, check=True)
    sent = _SENT.search(out.stdout)
    late = _LATE.search(out.stderr)
    assert sent is not None, out.stdout + out.stderr
    cpu = _cpu(resource.RUSAGE_CHILDREN) - cpu
    return (int(sent.group(1)) / float(sent.group(2)), int(late.group(1)) if late else 0,
            cpu / int(sent.group(1)) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--full-only", action="store_true",
                        help="Only the full-speed rows (and the bare publisher).")
    args = parser.parse_args()
    rates = [FULL_SPEED] if args.full_only else [5_000, 20_000, 50_000, FULL_SPEED]
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp), "site").start()
        try:
            rows = []
            for qos in (0, 1):
                bare, bare_us = bare_publisher(broker.port, qos, args.seconds)
                model = model_only(qos, min(args.seconds, 3.0))
                for rate in rates:
                    achieved, late, us = emulator(broker.url, rate, qos, args.seconds)
                    rows.append((qos, rate, achieved, late, us, bare, bare_us, model))
        finally:
            broker.stop()
    print(f"{'qos':>3} {'asked/s':>8} {'achieved/s':>10} {'late msgs':>9} {'µs/msg':>6} "
          f"{'bare/s':>8} {'µs/msg':>6} {'ratio':>6} {'model/s':>8}"
          f"   (bare: MqttSession, window {BARE_WINDOW:,}; model: no broker)")
    for qos, rate, achieved, late, us, bare, bare_us, model in rows:
        asked = "full" if rate == FULL_SPEED else f"{rate:,}"
        print(f"{qos:>3} {asked:>8} {achieved:>10,.0f} {late:>9,} {us:>6.1f} {bare:>8,.0f} "
              f"{bare_us:>6.1f} {achieved / bare:>6.2f} {model:>8,.0f}")


if __name__ == "__main__":
    main()
