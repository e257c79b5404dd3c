"""The `devices` command: simulated sensors publishing to an MQTT broker.

This first version drives a simple fleet (temperature and humidity random walks); fleet
files, actuators and fault injection come with the emulator issue.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from types import FrameType
from urllib.parse import urlsplit

import click
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices import __version__

# Unacknowledged QoS 1 publishes allowed at once: paho stalls near 65k outstanding message
# ids, and a larger window only adds memory once the broker keeps up.
_WINDOW = 1000


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="devices")
def main() -> None:
    """Fieldgate device emulator: simulated sensors talking MQTT."""


@main.command()
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="Site broker URL (mqtt://host:port).")
@click.option("--devices", "count", default=10, show_default=True, help="Number of devices.")
@click.option("--rate", default=10.0, show_default=True,
              help="Messages per second, all devices together.")
@click.option("--duration", default=0.0, help="Seconds to run; 0 runs until Ctrl-C.")
@click.option("--format", "fmt", type=click.Choice(["json", "number"]), default="json",
              show_default=True, help="JSON object on sensors/<id>/telemetry, or a bare number "
              "per metric on sensors/<id>/<metric>.")
@click.option("--qos", type=click.IntRange(0, 1), default=1, show_default=True)
@click.option("--seed", default=1, show_default=True, help="Same seed, same series.")
@click.option("--prefix", default="dev", show_default=True, help="Device id prefix.")
def simulate(broker: str, count: int, rate: float, duration: float, fmt: str, qos: int,
             seed: int, prefix: str) -> None:
    """Publish temperature and humidity readings from COUNT simulated devices.

    \b
    Example:
      devices simulate --broker mqtt://127.0.0.1:1883 --devices 50 --rate 200 --duration 60
    """
    url = urlsplit(broker)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise click.BadParameter(f"{broker!r}: write mqtt://host:port", param_hint="--broker")
    if rate <= 0 or count <= 0:
        raise click.BadParameter("--rate and --devices must be positive")
    rng = random.Random(seed)
    temp = [20.0 + rng.uniform(-2, 2) for _ in range(count)]
    hum = [45.0 + rng.uniform(-5, 5) for _ in range(count)]
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if url.scheme == "mqtts":
        client.tls_set()
    try:
        client.connect(url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883))
    except OSError as err:
        click.echo(f"error: cannot reach broker {broker!r}: {err}", err=True)
        sys.exit(1)
    client.loop_start()
    stop = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    start = time.monotonic()
    sent = 0
    late = 0
    window: list[paho.MQTTMessageInfo] = []
    while not stop and (duration <= 0 or time.monotonic() - start < duration):
        due = start + sent / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > 1.0:
            late += 1
        d = sent % count
        temp[d] += rng.gauss(0, 0.1)
        hum[d] = min(100.0, max(0.0, hum[d] + rng.gauss(0, 0.3)))
        device = f"{prefix}-{d}"
        if fmt == "json":
            payload = json.dumps({"ts": round(time.time(), 3), "temp": round(temp[d], 2),
                                  "hum": round(hum[d], 2)})
            window.append(client.publish(f"sensors/{device}/telemetry", payload, qos=qos))
        else:
            window.append(client.publish(f"sensors/{device}/temp", f"{temp[d]:.2f}", qos=qos))
        sent += 1
        if len(window) >= _WINDOW:
            for info in window:
                info.wait_for_publish(10)
            window.clear()
    for info in window:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    elapsed = time.monotonic() - start
    click.echo(f"sent {sent} messages in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):.0f}/s)"
               + (f"; fell behind the requested rate {late} times" if late else ""))
