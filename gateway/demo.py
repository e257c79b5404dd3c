"""`gateway demo`: the whole loop on one machine, with nothing to configure.

Starts a site and a cloud Mosquitto on free loopback ports, the gateway (durable log in a
temporary directory, the demo greenhouse rules, a site master key for commands), the
emulated greenhouse fleet (`devices simulate`, a separate process that knows the gateway
only through MQTT)
and a cloud-side consumer that counts readings and events. With influxd installed, an
InfluxDB 1.x on a free port is the second sink, and the demo ends with `gateway query last`
and `gateway query alerts` against it. On a terminal the live view is `gateway status`'s
(gateway/status, fed by the gateway's /metrics and log); otherwise one line a second.
The heat fault on gh-1 fires TooHot, the gateway sends a fan command signed with gh-1's key
(derived from the master key, which the emulator holds since it plays every device), the
device verifies it and answers, signed, the gateway believes the answer, the temperature
falls and the alert resolves. An operator in the "cloud" (gateway.downlink.client, as
`gateway cloud send` uses it) opens gh-2's valve with a command signed by the demo's cloud
key; the gateway checks it against ``downlink:`` and relays the device's answer.
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
from rich.console import Console
from rich.live import Live
from rich.text import Text

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.downlink.client import (
    Broker,
    DownlinkClientError,
    RequestClient,
    command_body,
    command_topic,
    new_request_id,
)
from gateway.downlink.signing import Signer
from gateway.influxd import INSTALL_HINT, InfluxD, find_influxd
from gateway.mosquitto import Mosquitto, free_port
from gateway.query import InfluxQLClient, QueryError, connection_from
from gateway.query.canned import alerts, last
from gateway.query.render import Format
from gateway.query.render import render as render_table
from gateway.status import StatusError, StatusWatcher
from gateway.status.sources import metrics_url, scrape
from gateway.status.state import Tone
from gateway.status.view import render
from gateway.status.watch import links_of

# When the operator's cloud command goes (devices have reported by then).
_OPERATOR_AT = 2.0
# When the cloud is cut, after this many seconds of normal flow.
_CUT_AFTER = 5.0
# Simulated seconds per wall second for the fleet: the heat fault takes minutes of
# simulated time, the demo a few seconds.
_RATE_SCALE = 6
# The database the demo's influx sink writes to.
_INFLUX_DB = "fieldgate"


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


class _LineView:
    """One line a second when the output is not a terminal (a log, a CI job, a test)."""

    def __init__(self) -> None:
        self._header = False

    def update(self, row: dict[str, str]) -> None:
        if not self._header:
            click.echo("  ".join(f"{name:>8}" for name in row))
            self._header = True
        click.echo("  ".join(f"{value:>8}" for value in row.values()))

    def close(self) -> None:
        pass


class _LiveView:
    """The status view of `gateway status` (gateway/status), redrawn in place, with the
    demo's own lines (the cloud consumer's count, the cut) in its header."""

    def __init__(self, watcher: StatusWatcher) -> None:
        # Warnings (the cut cloud link) would tear the live view; the view shows them.
        logging.getLogger("gateway").setLevel(logging.ERROR)
        self._watcher = watcher
        self._console = Console()
        self._live = Live(Text("starting..."), console=self._console, auto_refresh=False,
                          transient=False)
        self._live.start()

    def update(self, row: dict[str, str]) -> None:
        cloud = "[bold red]CUT[/]" if row["cloud"] == "CUT" else "[green]up[/]"
        notes = (("demo", f"{row['time']}   cloud broker {cloud}   the cloud consumer has "
                  f"{row['at cloud']} readings, {row['in log']} still in the gateway's log"),)
        self._live.update(render(self._watcher.snapshot(notes), width=self._console.width,
                                 height=self._console.height - 1), refresh=True)

    def close(self) -> None:
        self._live.stop()


class _Operator:
    """The cloud side's operator: one signed command, sent from a thread, its reply kept."""

    def __init__(self, port: int, signer: Signer, gateway_id: str,
                 watcher: StatusWatcher) -> None:
        self._client = RequestClient(Broker(host="127.0.0.1", port=port), signer)
        self._topic = command_topic(gateway_id, "gh-2")
        self._watcher = watcher
        self._said = "no reply"
        self._thread = threading.Thread(target=self._send, name="operator", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        body = command_body("valve", {"state": "open"}, ttl=30, request_id=new_request_id(),
                            now=time.time())
        try:
            reply = self._client.request(self._topic, body, timeout=30)
        except DownlinkClientError as err:
            self._said = f"failed: {err}"
            return
        reason = reply.body.get("reason")
        self._said = reply.status + (f" ({reason})" if reason else
                                     " (signed, allowed, acknowledged by the device)")
        self._watcher.state.note(time.time(), "operator", f"cloud command to gh-2: valve "
                                 f"open -> {reply.status}",
                                 Tone.GOOD if reply.succeeded else Tone.WARN)

    def result(self) -> str:
        self._thread.join(35)
        return self._said


def _fleet_file() -> Path:
    return Path(str(resources.files("devices") / "fleets" / "greenhouse.yaml"))


def _rules_file() -> Path:
    return Path(str(resources.files("gateway") / "demo_files" / "rules.yaml"))


def _wait_for_metrics(url: str, thread: threading.Thread) -> None:
    """Until the gateway's /metrics answers (it serves them once running)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            scrape(url)
        except StatusError:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def _start_influxd(work: Path) -> InfluxD | None:
    if find_influxd() is None:
        click.echo(f"InfluxDB is not installed, so the demo skips it; to see readings and "
                   f"alerts land there too: {INSTALL_HINT}")
        return None
    server = InfluxD(work).start()
    server.create_database(_INFLUX_DB)
    return server


def _show_influx(server: InfluxD) -> tuple[int, int] | None:
    """Print what `gateway query last` and `gateway query alerts` say; the alerts fired and
    resolved that InfluxDB holds, or None when it could not be asked."""
    client = InfluxQLClient(connection_from({"url": server.url, "api": "v1",
                                             "database": _INFLUX_DB}))
    where = f"--url {server.url} --db {_INFLUX_DB}"
    try:
        click.echo(f"$ gateway query last {where}")
        click.echo(render_table(last(client), Format.TABLE), nl=False)
        click.echo(f"$ gateway query alerts {where} --since 1h")
        table = alerts(client, since=3600, limit=1000)
        click.echo(render_table(table, Format.TABLE), nl=False)
    except QueryError as err:
        click.echo(f"InfluxDB: {err}")
        return None
    kinds = Counter(row[table.columns.index("event")] for row in table.rows)
    fired, resolved = kinds["alert.fired"], kinds["alert.resolved"]
    click.echo(f"influxdb: {fired} alerts fired, {resolved} resolved")
    return fired, resolved


def run_demo(duration: float, cut_cloud: float) -> int:
    with tempfile.TemporaryDirectory(prefix="fieldgate-demo-") as tmp:
        work = Path(tmp)
        site = Mosquitto(work, "site").start()
        cloud = Mosquitto(work, "cloud").start()
        influxd: InfluxD | None = None
        key = work / "command.key"
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        signer = Signer.generate(work / "cloud-signing.key")
        operator: _Operator | None = None
        sim: subprocess.Popen[bytes] | None = None
        consumer: _CloudConsumer | None = None
        gw: Gateway | None = None
        watcher: StatusWatcher | None = None
        gateway_thread: threading.Thread | None = None
        stop = threading.Event()

        def on_signal(_sig: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            influxd = _start_influxd(work)
            metrics = f"127.0.0.1:{free_port()}"
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
                "downlink": {"public_keys": [signer.public_key],
                             "allow": [{"devices": "gh-*", "commands": ["valve"]}]},
                "metrics": {"listen": metrics},
                **({"influx": {"url": influxd.url, "api": "v1", "database": _INFLUX_DB,
                               "batch_max_delay": "200ms", "health_interval": "2s"}}
                   if influxd is not None else {}),
            })
            gw = Gateway(cfg)
            gateway_thread = threading.Thread(target=gw.run, name="gateway", daemon=True)
            gateway_thread.start()
            consumer = _CloudConsumer(cloud.port, cfg.gateway_id)
            _wait_for_metrics(metrics_url(metrics), gateway_thread)
            watcher = StatusWatcher(metrics_url(metrics), cfg.log.path, links_of(cfg))
            sim = subprocess.Popen(
                [sys.executable, "-m", "devices", "simulate", "--fleet", str(_fleet_file()),
                 "--broker", site.url, "--rate-scale", str(_RATE_SCALE),
                 "--key-file", str(key), "--duration", f"{duration}s"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            click.echo(f"site broker {site.url}, cloud broker {cloud.url}, "
                       + (f"InfluxDB {influxd.url}, " if influxd else "")
                       + f"log {work}/log.db, metrics http://{metrics}/metrics")
            view: _LineView | _LiveView = _LiveView(watcher) if sys.stdout.isatty() \
                else _LineView()
            start = time.monotonic()
            cut_at = _CUT_AFTER if cut_cloud > 0 else float("inf")
            cloud_up = True
            events: Counter[str] = Counter()
            last_logged = 0
            try:
                while not stop.wait(1.0):
                    elapsed = time.monotonic() - start
                    if operator is None and elapsed >= _OPERATOR_AT:
                        operator = _Operator(cloud.port, signer, cfg.gateway_id, watcher)
                    if cloud_up and elapsed >= cut_at:
                        cloud.stop()
                        cloud_up = False
                        cut_at = float("inf")
                        watcher.state.note(time.time(), "demo", f"cloud broker stopped for "
                                           f"{cut_cloud:.0f} s", Tone.WARN)
                    elif not cloud_up and elapsed >= _CUT_AFTER + cut_cloud:
                        cloud.start()
                        cloud_up = True
                        watcher.state.note(time.time(), "demo", "cloud broker back",
                                           Tone.GOOD)
                    watcher.poll()
                    logged = gw.store.snapshot.counters["readings"]
                    arrived, events = consumer.snapshot()
                    view.update({
                        "time": f"{elapsed:.0f}s",
                        "readings/s": str(logged - last_logged),
                        "logged": str(logged),
                        "at cloud": str(arrived),
                        "in log": str(logged - arrived),
                        "cloud": "up" if cloud_up else "CUT",
                        "influx": str(gw.store.snapshot.depth("influx"))
                        if influxd else "-",
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
            finally:
                view.close()
            if sim.poll() is None:  # stopped early (Ctrl-C): stop publishing, let the log drain
                sim.terminate()
            deadline = time.monotonic() + 15
            while ((consumer.snapshot()[0] < gw.store.snapshot.counters["readings"]
                    or (influxd is not None and gw.store.snapshot.depth("influx") > 0))
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
            said = operator.result() if operator is not None else "not sent (stopped early)"
            click.echo(f"cloud: the operator's signed command 'valve open' to gh-2: {said}")
            ok = arrived == logged and logged > 0 and said.startswith("ok")
            if influxd is not None:
                owed = gw.store.snapshot.depth("influx")
                if owed:
                    click.echo(f"influxdb: {owed} records not written yet")
                seen = _show_influx(influxd)
                ok = ok and not owed and seen is not None \
                    and seen == (events["alert.fired"], events["alert.resolved"])
            return 0 if ok else 1
        finally:
            if sim is not None and sim.poll() is None:
                sim.terminate()
                try:
                    sim.wait(5)
                except subprocess.TimeoutExpired:
                    sim.kill()
                    sim.wait()
            if watcher is not None:
                watcher.close()
            if gw is not None:
                gw.request_stop()
                if gateway_thread is not None:
                    gateway_thread.join(15)  # its clean stop before the brokers and files go
            if consumer is not None:
                consumer.close()
            site.stop()
            cloud.stop()
            if influxd is not None:
                influxd.stop()
