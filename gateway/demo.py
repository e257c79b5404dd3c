"""`gateway demo`: the whole data path on one machine, with nothing to configure.

Starts a site and a cloud Mosquitto on free loopback ports, the gateway with a log in a
temporary directory, simulated sensors (`devices simulate`, a separate process that knows
the gateway only through MQTT) and a cloud-side subscriber that counts what arrives; prints
one line a second. ``--cut-cloud`` stops the cloud broker for a while to show the log
buffering and then draining.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import click
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.mosquitto import Mosquitto

# When the cloud is cut, after this many seconds of normal flow.
_CUT_AFTER = 5.0


class _CloudCounter:
    def __init__(self, port: int, gateway_id: str) -> None:
        self.readings: set[int] = set()
        self._lock = threading.Lock()
        self._client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id="demo-cloud-consumer", protocol=paho.MQTTv5)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_connect = lambda c, *_: c.subscribe(
            f"fieldgate/{gateway_id}/telemetry", qos=1)
        self._client.on_message = self._on_message
        # A persistent session, as a real cloud consumer has: what the gateway delivers while
        # this consumer reconnects is queued for it, not lost.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self._client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        seqs = [r["seq"] for r in orjson.loads(msg.payload)["readings"]]
        with self._lock:
            self.readings.update(seqs)  # de-duplicate by seq, as a cloud consumer does

    def count(self) -> int:
        with self._lock:
            return len(self.readings)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run_demo(duration: float, cut_cloud: float, rate: float, devices: int) -> int:
    with tempfile.TemporaryDirectory(prefix="fieldgate-demo-") as tmp:
        work = Path(tmp)
        site = Mosquitto(work, "site").start()
        cloud = Mosquitto(work, "cloud").start()
        sim: subprocess.Popen[bytes] | None = None
        counter: _CloudCounter | None = None
        gw: Gateway | None = None
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
                "metrics": {"listen": None},
            })
            gw = Gateway(cfg)
            gateway_thread = threading.Thread(target=gw.run, name="gateway", daemon=True)
            gateway_thread.start()
            counter = _CloudCounter(cloud.port, cfg.gateway_id)
            time.sleep(0.5)
            sim = subprocess.Popen(
                [sys.executable, "-m", "devices", "simulate", "--broker", site.url,
                 "--devices", str(devices), "--rate", str(rate), "--duration", str(duration)],
                stdout=subprocess.DEVNULL,
            )
            click.echo(f"site broker {site.url}, cloud broker {cloud.url}, log {work}/log.db")
            click.echo(f"{'time':>5}  {'logged':>8}  {'at cloud':>8}  {'in log':>7}  cloud")
            start = time.monotonic()
            cut_at = _CUT_AFTER if cut_cloud > 0 else float("inf")
            cloud_up = True
            while not stop.wait(1.0):
                elapsed = time.monotonic() - start
                if cloud_up and elapsed >= cut_at:
                    cloud.stop()
                    cloud_up = False
                    cut_at = float("inf")
                elif not cloud_up and elapsed >= _CUT_AFTER + cut_cloud:
                    cloud.start()
                    cloud_up = True
                logged = gw.store.next_seq - 1
                arrived = counter.count()
                click.echo(f"{elapsed:4.0f}s  {logged:8d}  {arrived:8d}  {logged - arrived:7d}  "
                           f"{'up' if cloud_up else 'CUT'}")
                if sim.poll() is not None and cloud_up and arrived >= logged:
                    break
                if elapsed > duration + cut_cloud + 30:
                    break
            logged = gw.store.next_seq - 1
            arrived = counter.count()
            click.echo(f"done: {logged} readings logged, {arrived} arrived at the cloud, "
                       f"{logged - arrived} missing")
            return 0 if arrived == logged and logged > 0 else 1
        finally:
            if sim is not None and sim.poll() is None:
                sim.terminate()
                sim.wait(5)
            if gw is not None:
                gw.request_stop()
                time.sleep(0.1)
            if counter is not None:
                counter.close()
            site.stop()
            cloud.stop()
