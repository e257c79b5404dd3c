"""`gateway demo`: the whole loop on one machine, with nothing to configure.

Starts a site and a cloud Mosquitto on free loopback ports, the gateway (durable log in a
temporary directory, the demo greenhouse rules, a site master key for commands), the
emulated greenhouse fleet (`devices simulate`, a separate process that knows the gateway
only through MQTT)
and a cloud-side consumer that counts readings and events; prints one line a second.
The heat fault on gh-1 fires TooHot, the gateway sends a fan command signed with gh-1's key
(derived from the master key, which the emulator holds since it plays every device), the
device verifies it and answers, signed, the gateway believes the answer, the temperature
falls and the alert resolves.
``--cut-cloud`` stops the cloud broker for a while to show the log buffering, then draining.
"""

from __future__ import annotations

import logging
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from types import FrameType

import click
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.mosquitto import Mosquitto

# When the cloud is cut, after this many seconds of normal flow.
_CUT_AFTER = 5.0
# Simulated seconds per wall second for the fleet: the heat fault takes minutes of
# simulated time, the demo a few seconds.
_RATE_SCALE = 6


class _CloudConsumer:
    """What a cloud application sees: readings (de-duplicated by seq) and events by type."""

    def __init__(self, port: int, gateway_id: str) -> None:
        self.readings: set[int] = set()
        self.events: Counter[str] = Counter()
        self._seen_events: set[str] = set()
        self._lock = threading.Lock()
        self._client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id="demo-cloud-consumer", protocol=paho.MQTTv5)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_connect = lambda c, *_: c.subscribe(f"fieldgate/{gateway_id}/#", qos=1)
        self._client.on_message = self._on_message
        # A persistent session, as a real cloud consumer has: what the gateway delivers while
        # this consumer reconnects is queued for it, not lost.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self._client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        with self._lock:
            if msg.topic.endswith("/telemetry"):
                self.readings.update(r["seq"] for r in body["readings"])
            elif "/events/" in msg.topic and body["id"] not in self._seen_events:
                self._seen_events.add(body["id"])
                self.events[body["type"].removeprefix("io.fieldgate.")] += 1

    def snapshot(self) -> tuple[int, Counter[str]]:
        with self._lock:
            return len(self.readings), Counter(self.events)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class _View:
    """One line a second, or a live table when the output is a terminal (rich)."""

    def __init__(self, *, live: bool) -> None:
        self._live: Live | None = None
        self._header = False
        if live:
            # Warnings (the cut cloud link) would tear the live table; the table shows them.
            logging.getLogger("gateway").setLevel(logging.ERROR)
            self._live = Live(Text("starting..."), refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, row: dict[str, str]) -> None:
        if self._live is not None:
            table = Table(title="Fieldgate demo")
            table.add_column("")
            table.add_column("")
            for name, value in row.items():
                style = "bold red" if value == "CUT" or (name == "firing" and value) else ""
                table.add_row(name, value, style=style)
            self._live.update(table)
            return
        if not self._header:
            click.echo("  ".join(f"{name:>8}" for name in row if name != "firing"))
            self._header = True
        click.echo("  ".join(f"{value:>8}" for name, value in row.items() if name != "firing"))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def _fleet_file() -> Path:
    return Path(str(resources.files("devices") / "fleets" / "greenhouse.yaml"))


def _rules_file() -> Path:
    return Path(str(resources.files("gateway") / "demo_files" / "rules.yaml"))


def run_demo(duration: float, cut_cloud: float) -> int:
    with tempfile.TemporaryDirectory(prefix="fieldgate-demo-") as tmp:
        work = Path(tmp)
        site = Mosquitto(work, "site").start()
        cloud = Mosquitto(work, "cloud").start()
        key = work / "command.key"
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        sim: subprocess.Popen[bytes] | None = None
        consumer: _CloudConsumer | None = None
        gw: Gateway | None = None
        gateway_thread: threading.Thread | None = None
        stop = threading.Event()

        def on_signal(_sig: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            cfg = GatewayConfig.model_validate({
                "gateway_id": "demo",
                "site": {"url": site.url},
                "cloud": {"url": cloud.url},
                "log": {"path": str(work / "log.db"), "synchronous": "normal"},
                "uplink": {"backoff_min": "500ms", "backoff_max": "2s"},
                "rules": [str(_rules_file())],
                "engine": {"tick": "500ms", "offline_after": None},
                "device_labels": {"gh-*": {"zone": "north"}},
                "commands": {"key_file": str(key)},
                "metrics": {"listen": None},
            })
            gw = Gateway(cfg)
            gateway_thread = threading.Thread(target=gw.run, name="gateway", daemon=True)
            gateway_thread.start()
            consumer = _CloudConsumer(cloud.port, cfg.gateway_id)
            time.sleep(0.5)
            sim = subprocess.Popen(
                [sys.executable, "-m", "devices", "simulate", "--fleet", str(_fleet_file()),
                 "--broker", site.url, "--rate-scale", str(_RATE_SCALE),
                 "--key-file", str(key), "--duration", f"{duration}s"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            click.echo(f"site broker {site.url}, cloud broker {cloud.url}, log {work}/log.db")
            view = _View(live=sys.stdout.isatty())
            start = time.monotonic()
            cut_at = _CUT_AFTER if cut_cloud > 0 else float("inf")
            cloud_up = True
            events: Counter[str] = Counter()
            last_logged = 0
            while not stop.wait(1.0):
                elapsed = time.monotonic() - start
                if cloud_up and elapsed >= cut_at:
                    cloud.stop()
                    cloud_up = False
                    cut_at = float("inf")
                elif not cloud_up and elapsed >= _CUT_AFTER + cut_cloud:
                    cloud.start()
                    cloud_up = True
                logged = gw.store.snapshot.counters["readings"]
                arrived, events = consumer.snapshot()
                engine = gw.rules.engine if gw.rules else None
                view.update({
                    "time": f"{elapsed:.0f}s",
                    "readings/s": str(logged - last_logged),
                    "devices": str(len(engine.devices) if engine else 0),
                    "logged": str(logged),
                    "at cloud": str(arrived),
                    "in log": str(logged - arrived),
                    "cloud": "up" if cloud_up else "CUT",
                    "firing": ", ".join(f"{r.split('/')[-1]}@{d}" for r, d in engine.firing())
                    if engine else "",
                    "fired": str(events["alert.fired"]),
                    "resolved": str(events["alert.resolved"]),
                    "cmds": str(events["command.issued"]),
                    "acked": str(events["command.acknowledged"]),
                })
                last_logged = logged
                if sim.poll() is not None and cloud_up and arrived >= logged:
                    break
                if elapsed > duration + cut_cloud + 30:
                    break
            view.close()
            if sim.poll() is None:  # stopped early (Ctrl-C): stop publishing, let the log drain
                sim.terminate()
            deadline = time.monotonic() + 5
            while (consumer.snapshot()[0] < gw.store.snapshot.counters["readings"]
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            logged = gw.store.snapshot.counters["readings"]
            arrived, events = consumer.snapshot()
            click.echo(f"done: {logged} readings logged, {arrived} arrived at the cloud, "
                       f"{logged - arrived} missing; alerts fired {events['alert.fired']}, "
                       f"resolved {events['alert.resolved']}; commands "
                       f"{events['command.issued']} sent, "
                       f"{events['command.acknowledged']} acknowledged, "
                       f"{events['command.rejected']} rejected, "
                       f"{events['command.ack_rejected']} not believed, "
                       f"{events['command.timed_out']} timed out")
            return 0 if arrived == logged and logged > 0 else 1
        finally:
            if sim is not None and sim.poll() is None:
                sim.terminate()
                try:
                    sim.wait(5)
                except subprocess.TimeoutExpired:
                    sim.kill()
                    sim.wait()
            if gw is not None:
                gw.request_stop()
                if gateway_thread is not None:
                    gateway_thread.join(15)  # its clean stop before the brokers and files go
            if consumer is not None:
                consumer.close()
            site.stop()
            cloud.stop()
