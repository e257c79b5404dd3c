"""Emulator load: how many messages a second one `devices simulate` process keeps up with.

Runs `devices simulate --devices 2000 --rate R` against a local Mosquitto for a few seconds
at increasing R (QoS 0 and 1) and reports the achieved rate and lateness, next to a bare
paho-mqtt publisher (pre-built payloads, same client settings) measured in the same run.

    python bench/bench_devices.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gateway.mosquitto import Mosquitto  # noqa: E402

_SENT = re.compile(r"sent (\d+) messages in ([\d.]+) s")
_LATE = re.compile(r"(\d+) messages went out more than 1 s late")


def bare_publisher(port: int, qos: int, seconds: float) -> float:
    """Messages/s of a plain paho publisher with no simulation work."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = b'{"ts":1800000000.123,"temp":21.37,"hum":45.12}'
    sent = 0
    window = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(1000):
            window.append(client.publish(f"sensors/dev-{sent % 2000}/telemetry", payload, qos=qos))
            sent += 1
        if len(window) >= 5000:
            for info in window:
                info.wait_for_publish(30)
            window.clear()
    for info in window:
        info.wait_for_publish(30)
    rate = sent / (time.monotonic() - start)
    client.disconnect()
    client.loop_stop()
    return rate


def emulator(url: str, rate: int, qos: int, seconds: float) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-m", "devices", "simulate", "--broker", url, "--devices", "2000",
         "--rate", str(rate), "--qos", str(qos), "--duration", f"{seconds}s"],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds * 10 + 60, check=True)
    sent = _SENT.search(out.stdout)
    late = _LATE.search(out.stderr)
    assert sent is not None, out.stdout + out.stderr
    return int(sent.group(1)) / float(sent.group(2)), int(late.group(1)) if late else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp), "site").start()
        try:
            rows = []
            for qos in (0, 1):
                bare = bare_publisher(broker.port, qos, args.seconds)
                for rate in (5_000, 20_000, 50_000):
                    achieved, late = emulator(broker.url, rate, qos, args.seconds)
                    rows.append((qos, rate, achieved, late, bare))
        finally:
            broker.stop()
    print(f"{'qos':>3} {'asked/s':>8} {'achieved/s':>10} {'late msgs':>9} "
          f"{'bare paho/s':>11} {'ratio':>6}  target 50,000/s")
    for qos, rate, achieved, late, bare in rows:
        print(f"{qos:>3} {rate:>8,} {achieved:>10,.0f} {late:>9,} {bare:>11,.0f} "
              f"{achieved / bare:>6.2f}")


if __name__ == "__main__":
    main()
