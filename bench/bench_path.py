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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gateway.mosquitto import Mosquitto, free_port  # noqa: E402

GATEWAY_ID = "bench-gw"
DEVICES = 50
# The publisher keeps at most WINDOW publishes unacknowledged (paho stalls near 65k, see
# MEASURED.md). paho's max_inflight is 0 (no limit of paho's own): with a limit, paho scans its
# whole outgoing queue on every PUBACK (Client._update_inflight), which made the publisher cost
# ~140 us/msg at max_inflight 1000 against ~65 us at 0 and took more than one of the two cores.
WINDOW = 10_000
PUB_INFLIGHT = 0
ARRAY = 100               # readings per message in the array scenarios

# Shared counters a subscriber process updates on every message (read by the driver without
# disturbing the subscriber).
S_COUNT, S_FIRST, S_LAST, S_MAXSEQ, S_DUPS, S_MSGS, S_FIRSTSEQ, S_MAXGAP = range(8)
S_SIZE = 8

TEMPS = [round(20.0 + i / 10, 1) for i in range(40)]


# ----------------------------------------------------------------------------------------------
# Child processes: publisher and subscribers (plain paho-mqtt, MQTT v5)
# ----------------------------------------------------------------------------------------------

def _paho_client(client_id: str) -> Any:
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=paho.MQTTv5)


def _connect_retry(client: Any, port: int, deadline: float) -> None:
    while True:
        try:
            client.connect("127.0.0.1", port, keepalive=60, clean_start=True)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.005)


def _own_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _single_payload(i: int, now: float) -> bytes:
    return orjson.dumps({"ts": now, "temp": TEMPS[i % 40], "hum": 40.2, "volt": 3.31, "i": i,
                         "pt": now})


def _array_payload(i: int, now: float) -> bytes:
    base = i * ARRAY
    return orjson.dumps([{"ts": now, "temp": TEMPS[j % 40], "hum": 40.2, "volt": 3.31,
                          "i": base + j, "pt": now} for j in range(ARRAY)])


def publisher_main(conn: Any, port: int, spec: dict[str, Any]) -> None:
    """Publish spec['n_msgs'] QoS 1 messages, at full speed or paced, on command."""
    try:
        client = _paho_client(f"bench-pub-{os.getpid()}")
        client.max_inflight_messages_set(spec.get("inflight", PUB_INFLIGHT))
        window = spec.get("window", WINDOW)
        connected = threading.Event()
        client.on_connect = lambda *a: connected.set()
        _connect_retry(client, port, time.time() + 10)
        client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("publisher: no CONNACK")
        conn.send(("ready", None))
        if conn.recv() != "go":
            client.disconnect()
            client.loop_stop()
            return
        n = spec["n_msgs"]
        rate = spec.get("rate") or 0.0
        make = _array_payload if spec["kind"] == "array" else _single_payload
        topics = [f"sensors/dev-{d:02d}/telemetry" for d in range(DEVICES)]
        infos: deque[Any] = deque()
        cpu0 = time.process_time()
        t0 = time.time()
        deadline = t0 + spec["max_seconds"]
        sent = 0
        timed_out = False
        tick = 0.01
        while sent < n:
            if rate:
                due = min(n, int((time.time() - t0) * rate) + 1)
                if due <= sent:
                    # sleep to the next 10 ms tick of the schedule
                    nxt = t0 + (int((time.time() - t0) / tick) + 1) * tick
                    time.sleep(max(0.0, nxt - time.time()))
                    continue
            else:
                due = min(n, sent + 256)
            while sent < due:
                infos.append(client.publish(topics[sent % DEVICES], make(sent, time.time()),
                                            qos=1))
                sent += 1
                if len(infos) >= window:
                    infos[0].wait_for_publish(max(0.1, deadline - time.time()))
                    while infos and infos[0].is_published():
                        infos.popleft()
            if time.time() > deadline:
                timed_out = True
                break
        t_last = time.time()
        ack_deadline = time.time() + 30
        while infos and time.time() < ack_deadline:
            infos[0].wait_for_publish(max(0.05, ack_deadline - time.time()))
            while infos and infos[0].is_published():
                infos.popleft()
        t_acked = time.time()
        cpu = time.process_time() - cpu0
        conn.send(("done", {"sent": sent, "unacked": len(infos), "t_first": t0,
                            "t_last": t_last, "t_acked": t_acked, "cpu": cpu,
                            "timed_out": timed_out, "payload_bytes": len(make(0, t0))}))
        client.disconnect()
        client.loop_stop()
    except Exception:  # report and exit; the driver prints it
        conn.send(("error", traceback.format_exc()))


FIRED = "io.fieldgate.alert.fired"
# The rule the alert latency scenario loads: each alarm-* device fires once, at its first
# reading (for: 0s), and stays firing for the rest of the run.
ALERT_RULES = """\
groups:
  - name: bench
    match: {device: "alarm-*"}
    rules:
      - alert: Tripped
        expr: last(trip, 60s) > 0
        for: 0s
        severity: critical
"""


def alerter_main(conn: Any, site_port: int, cloud_port: int, spec: dict[str, Any]) -> None:
    """Publish one alarm reading per alarm-NNN device at random moments (so that they fall
    anywhere between two rule ticks) and time each io.fieldgate.alert.fired event at the cloud:
    from the reading's publish to the event's arrival, and from the tick that fired it (the
    event's time) to its arrival."""
    try:
        arrived: dict[str, tuple[float, float]] = {}
        lock = threading.Lock()

        def on_event(_c: Any, _u: Any, msg: Any) -> None:
            now = time.time()
            body = orjson.loads(msg.payload)
            fired = datetime.fromisoformat(body["time"].replace("Z", "+00:00")).timestamp()
            with lock:
                arrived.setdefault(body["subject"], (now, fired))

        sub = _paho_client(f"bench-events-{os.getpid()}")
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_message = on_event
        _connect_retry(sub, cloud_port, time.time() + 10)
        sub.subscribe(f"fieldgate/{GATEWAY_ID}/events/{FIRED}", qos=1)
        sub.loop_start()
        pub = _paho_client(f"bench-alarms-{os.getpid()}")
        _connect_retry(pub, site_port, time.time() + 10)
        pub.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("alerter: no SUBACK")
        conn.send(("ready", None))
        if conn.recv() != "go":
            return
        rng = random.Random(spec["seed"])
        sent: dict[str, float] = {}
        for k in range(spec["n"]):
            time.sleep(rng.uniform(*spec["gap"]))
            device = f"alarm-{k:03d}"
            sent[device] = pt = time.time()
            pub.publish(f"sensors/{device}/telemetry", orjson.dumps({"trip": 1, "pt": pt}),
                        qos=1)
        deadline = time.time() + spec["wait"]
        while time.time() < deadline:
            with lock:
                if len(arrived) >= len(sent):
                    break
            time.sleep(0.02)
        with lock:
            got = {d: arrived[d] for d in sent if d in arrived}
        conn.send(("done", {
            "latency": [got[d][0] - sent[d] for d in got],
            "tick_to_cloud": [at - fired for at, fired in got.values()],
            "reading_to_tick": [got[d][1] - sent[d] for d in got],
            "missing": len(sent) - len(got),
        }))
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()
    except Exception:
        conn.send(("error", traceback.format_exc()))


class _SubState:
    __slots__ = ("count", "dups", "last", "maxgap", "maxseq", "msgs", "next_sample", "samples",
                 "shared", "step")

    def __init__(self, shared: Any, step: float) -> None:
        self.shared = shared
        self.step = step
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.dups = 0
        self.last = 0.0
        self.maxgap = 0.0
        self.maxseq = 0
        self.msgs = 0
        self.next_sample = 0.0
        self.samples: list[float] = []
        for i in range(S_SIZE):
            self.shared[i] = 0.0

    def on_bare(self, _c: Any, _u: Any, msg: Any) -> None:
        """The baseline's trivial callback: count, timestamp, now and then a latency sample."""
        now = time.time()
        self.count += 1
        sh = self.shared
        if self.count > 1 and now - self.last > self.maxgap:
            self.maxgap = sh[S_MAXGAP] = now - self.last
        self.last = now
        sh[S_COUNT] = self.count
        sh[S_LAST] = now
        if now >= self.next_sample:
            if self.count == 1:
                sh[S_FIRST] = now
            self.next_sample = now + self.step
            self.samples.append(now - orjson.loads(msg.payload)["pt"])

    def on_cloud(self, _c: Any, _u: Any, msg: Any) -> None:
        """Counts readings in uplink batches; de-duplicates by the seq range properties."""
        now = time.time()
        payload = msg.payload
        props = dict(getattr(msg.properties, "UserProperty", None) or ())
        first = int(props.get("seq_first", 0))
        last = int(props.get("seq_last", -1))
        n = payload.count(b'"seq":')
        sh = self.shared
        self.msgs += 1
        if self.msgs > 1 and now - self.last > self.maxgap:
            self.maxgap = sh[S_MAXGAP] = now - self.last
        self.last = now
        if self.msgs == 1:
            sh[S_FIRST] = now
            sh[S_FIRSTSEQ] = first
        if first and first <= self.maxseq:
            dup = min(last, self.maxseq) - first + 1
            self.dups += dup
            n -= dup
            sh[S_DUPS] = self.dups
        if last > self.maxseq:
            self.maxseq = last
            sh[S_MAXSEQ] = last
        self.count += n
        sh[S_COUNT] = self.count
        sh[S_LAST] = now
        sh[S_MSGS] = self.msgs
        if now >= self.next_sample:
            self.next_sample = now + self.step
            readings = orjson.loads(payload)["readings"]
            stride = max(1, len(readings) // 50)
            self.samples.extend(now - r["pt"] for r in readings[::stride] if "pt" in r)


def subscriber_main(conn: Any, port: int, topic: str, mode: str, shared: Any,
                    connect_timeout: float) -> None:
    """A QoS 1 subscriber on a network thread; mode 'bare' counts messages, 'cloud' readings."""
    try:
        client = _paho_client(f"bench-{mode}-{os.getpid()}")
        state = _SubState(shared, 0.002 if mode == "bare" else 0.02)
        client.on_message = state.on_bare if mode == "bare" else state.on_cloud
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        conn.send(("connecting", None))
        _connect_retry(client, port, time.time() + connect_timeout)
        client.subscribe(topic, qos=1)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("subscriber: no SUBACK")
        conn.send(("ready", None))
        while True:
            cmd = conn.recv()
            if cmd == "reset":
                state.reset()
                conn.send(("ok", None))
            elif cmd == "final":
                conn.send(("final", {"count": state.count, "dups": state.dups,
                                     "maxgap": state.maxgap,
                                     "msgs": state.msgs, "maxseq": state.maxseq,
                                     "samples": state.samples}))
            else:
                break
        client.disconnect()
        client.loop_stop()
    except Exception:
        conn.send(("error", traceback.format_exc()))


# ----------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------

CTX = mp.get_context("spawn")


class Child:
    """A spawned helper process with a pipe; expects a ('ready', ...) message."""

    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child_conn = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child_conn, *args), daemon=True)
        self.proc.start()
        self.pid = self.proc.pid
        self.ps = psutil.Process(self.pid)

    def expect(self, what: str, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"helper {self.pid}: no {what!r} within {timeout}s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"helper {self.pid} exited (code {self.proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"helper {self.pid} failed:\n{value}")
        if kind != what:
            raise RuntimeError(f"helper {self.pid}: got {kind!r}, wanted {what!r}")
        return value

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                with contextlib.suppress(OSError):
                    self.conn.send("stop")
                self.proc.join(3)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(3)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(3)
        finally:
            self.conn.close()


class Subscriber(Child):
    def __init__(self, port: int, topic: str, mode: str, connect_timeout: float = 10) -> None:
        self.shared = CTX.RawArray("d", S_SIZE)
        super().__init__(subscriber_main, port, topic, mode, self.shared, connect_timeout)

    def reset(self) -> None:
        self.conn.send("reset")
        self.expect("ok", 5)

    def final(self) -> dict[str, Any]:
        self.conn.send("final")
        return dict(self.expect("final", 10))

    @property
    def count(self) -> int:
        return int(self.shared[S_COUNT])


class Publisher(Child):
    def __init__(self, port: int, **spec: Any) -> None:
        self.spec = spec
        super().__init__(publisher_main, port, spec)

    def go(self) -> None:
        self.conn.send("go")

    def result(self, timeout: float) -> dict[str, Any] | None:
        if not self.conn.poll(timeout):
            return None
        return dict(self.expect("done", 0))


class Alerter(Child):
    def __init__(self, site_port: int, cloud_port: int, **spec: Any) -> None:
        super().__init__(alerter_main, site_port, cloud_port, spec)

    def go(self) -> None:
        self.conn.send("go")


class RssSampler:
    """Peak RSS of a process, sampled every 100 ms on a thread of the driver."""

    def __init__(self, pid: int) -> None:
        self.ps = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(1)
        return self.peak


class GatewayProc:
    """`python -m gateway run -c CONFIG` as a real process."""

    def __init__(self, workdir: Path, site: Mosquitto, cloud: Mosquitto, batch_delay: str | None,
                 overrides: dict[str, Any] | None = None, src: Path = ROOT) -> None:
        """``batch_delay`` None: the uplink's default; ``src``: the checkout to run."""
        self.dir = workdir
        self.src = src
        self.metrics_port = free_port()
        cfg: dict[str, Any] = {
            "gateway_id": GATEWAY_ID,
            "site": {"url": site.url},
            "cloud": {"url": cloud.url},
            "log": {"path": str(workdir / "log.db")},
            "uplink": {"backoff_min": "200ms", "backoff_max": "1s"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        if batch_delay is not None:
            cfg["uplink"]["batch_max_delay"] = batch_delay
        for key, value in (overrides or {}).items():   # --set section.option=value
            section, _, option = key.partition(".")
            if option:
                cfg.setdefault(section, {})[option] = value
            else:
                cfg[section] = value
        self.config = workdir / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.stderr_path = workdir / "gateway.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.rss: RssSampler | None = None
        self.ru_maxrss_kib: int | None = None
        self.vm_hwm_kib: int | None = None
        self.exit_code: int | None = None

    def start(self, *, want_cloud: bool) -> GatewayProc:
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
                cwd=self.src, stdout=subprocess.DEVNULL, stderr=err,
            )
        self.ps = psutil.Process(self.proc.pid)
        self.rss = RssSampler(self.proc.pid)
        deadline = time.monotonic() + 20
        wanted = ['fieldgate_link_connected{link="site"} 1.0']
        if want_cloud:
            wanted.append('fieldgate_link_connected{link="cloud"} 1.0')
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.stderr()}")
            text = self.metrics_text()
            if text and all(w in text for w in wanted):
                time.sleep(0.3)
                return self
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in 20 s:\n{self.stderr()}")

    def metrics_text(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    def metric(self, name: str) -> float | None:
        for line in self.metrics_text().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def cpu(self) -> float:
        assert self.ps is not None
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def write_bytes(self) -> int:
        """Bytes this process sent to storage (/proc/<pid>/io): the log's flash wear."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def sys_cpu(self) -> float:
        assert self.ps is not None
        return float(self.ps.cpu_times().system)

    def peak_rss(self) -> int:
        return self.rss.peak if self.rss else 0

    def read_hwm(self) -> None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()  # type: ignore[union-attr]
            m = re.search(r"VmHWM:\s+(\d+) kB", status)
            self.vm_hwm_kib = int(m.group(1)) if m else None
        except OSError:
            pass

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None and self.proc.poll() is None:
            self.read_hwm()
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    self.proc.returncode = os.waitstatus_to_exitcode(status)
                    self.ru_maxrss_kib = usage.ru_maxrss
                    break
                time.sleep(0.05)
            else:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = -9
        if self.exit_code is None:
            self.exit_code = self.proc.returncode
        if self.rss:
            self.rss.stop()


class Run:
    """Everything a scenario started, so that `finally` can stop it all."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        self.children: list[Child] = []
        self.brokers: list[Mosquitto] = []
        self.gateways: list[GatewayProc] = []

    def broker(self, name: str, start: bool = True) -> Mosquitto:
        b = Mosquitto(self.dir, name)
        self.brokers.append(b)
        return b.start() if start else b

    def child(self, c: Child) -> Any:
        self.children.append(c)
        return c

    def gateway(self, site: Mosquitto, cloud: Mosquitto, batch_delay: str | None,
                overrides: dict[str, Any] | None = None, *, name: str = "gw",
                src: Path = ROOT) -> GatewayProc:
        gdir = self.dir / name
        gdir.mkdir()
        g = GatewayProc(gdir, site, cloud, batch_delay, overrides, src)
        self.gateways.append(g)
        return g

    def close(self, notes: list[str]) -> None:
        for c in self.children:
            try:
                c.stop()
            except Exception as err:  # keep stopping the rest
                notes.append(f"stopping helper {c.pid}: {err}")
        for g in self.gateways:
            try:
                g.stop()
            except Exception as err:
                notes.append(f"stopping gateway: {err}")
            _gateway_notes(g, notes)
        for b in self.brokers:
            b.stop()
            log = b.dir / "mosquitto.log"
            if log.exists():
                for line in log.read_text(errors="replace").splitlines():
                    if re.search(r"warning|error|drop", line, re.I):
                        notes.append(f"{b.dir.name} mosquitto: {line.strip()[:160]}")


def _gateway_notes(g: GatewayProc, notes: list[str]) -> None:
    lines = [ln for ln in g.stderr().splitlines()
             if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback|Error:", ln)]
    if g.exit_code not in (0, None):
        notes.append(f"gateway ({g.dir.parent.name}) exit code {g.exit_code}")
    seen: dict[str, int] = {}
    for ln in lines:
        key = re.sub(r"^\S+ \S+ ", "", ln)       # without the timestamp
        key = re.sub(r"\d+", "N", key)[:140]
        seen[key] = seen.get(key, 0) + 1
    for key, n in seen.items():
        notes.append(f"gateway ({g.dir.parent.name}) stderr x{n}: {key}")


def pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def wait_arrivals(sub: Subscriber, pub: Publisher, expected: int, *, timeout: float,
                  stall: float = 25.0) -> tuple[dict[str, Any] | None, str]:
    """Wait until the subscriber counted `expected` (fewer if the publisher stopped early).

    Returns the publisher's result and "" or a reason ("timeout", "stalled").
    """
    deadline = time.time() + timeout
    result = None
    last_count, last_change = -1, time.time()
    while True:
        if result is None:
            result = pub.result(0)
            if result is not None:
                expected = min(expected, result["sent"] * pub.spec.get("per_msg", 1))
        count = sub.count
        now = time.time()
        if count != last_count:
            last_count, last_change = count, now
        if result is not None and count >= expected:
            return result, ""
        if now > deadline:
            return result or pub.result(1), "timeout"
        if result is not None and now - last_change > stall:
            return result, "stalled"
        time.sleep(0.01)


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


# ----------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.root = Path(tempfile.mkdtemp(prefix="fieldgate-bench-", dir="/tmp"))
        self.results: dict[str, Any] = {}
        self.overrides = {k: yaml.safe_load(v) for k, _, v in
                          (item.partition("=") for item in args.set)}
        self.notes: list[str] = []
        q = self.quick
        self.n_single = args.n or (40_000 if q else 200_000)
        self.n_array_readings = 200_000 if q else 1_000_000
        self.paced_seconds = 3.0 if q else 10.0
        self.n_drain = 200_000 if q else 1_000_000
        self.full_cap = 40.0 if q else 90.0   # seconds any one full-speed publish may take

    def publisher(self, port: int, **spec: Any) -> Publisher:
        return Publisher(port, inflight=self.args.pub_inflight,
                         window=min(20_000, self.args.pub_window), **spec)

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def run_scenario(self, name: str, fn: Any) -> None:
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
        self.say(f"  [{name} took {time.time() - t0:.1f}s] {self._brief(self.results[name])}")

    @staticmethod
    def _brief(r: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if not isinstance(v, (list, dict)))

    # -- 1. bare paho subscriber at full speed ---------------------------------------------------

    def s1_bare(self, run: Run) -> dict[str, Any]:
        n = self.n_single
        site = run.broker("site")
        sub = run.child(Subscriber(site.port, "sensors/#", "bare"))
        pub = run.child(self.publisher(site.port, kind="single", n_msgs=n, per_msg=1, rate=0,
                                  max_seconds=self.full_cap))
        sub.expect("connecting", 15)
        sub.expect("ready", 15)
        pub.expect("ready", 15)
        cpu0 = sub.cpu()
        pub.go()
        pres, why = wait_arrivals(sub, pub, n, timeout=self.full_cap + 30)
        cpu1 = sub.cpu()
        return self._throughput(sub, pub, pres, why, cpu1 - cpu0, None)

    def _throughput(self, sub: Subscriber, pub: Publisher, pres: dict[str, Any] | None,
                    why: str, cpu: float, gw: GatewayProc | None) -> dict[str, Any]:
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

    # -- 2./3. gateway at full speed -------------------------------------------------------------

    def _gateway_full(self, run: Run, kind: str, n_readings: int) -> dict[str, Any]:
        per = ARRAY if kind == "array" else 1
        site = run.broker("site")
        cloud = run.broker("cloud")
        gw = run.gateway(site, cloud, self.args.batch_delay, self.overrides)
        sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry", "cloud"))
        pub = run.child(self.publisher(site.port, kind=kind, n_msgs=n_readings // per, per_msg=per,
                                  rate=0, max_seconds=self.full_cap))
        gw.start(want_cloud=True)
        sub.expect("connecting", 15)
        sub.expect("ready", 15)
        pub.expect("ready", 15)
        rss0 = gw.peak_rss()
        site0 = gw.metric("fieldgate_site_messages_total") or 0.0
        sys0, cpu0 = gw.sys_cpu(), gw.cpu()
        pub.go()
        pres, why = wait_arrivals(sub, pub, n_readings, timeout=self.full_cap + 60)
        sys1, cpu1 = gw.sys_cpu(), gw.cpu()
        out = self._throughput(sub, pub, pres, why, cpu1 - cpu0, gw)
        out["cpu_sys_share"] = (sys1 - sys0) / (cpu1 - cpu0) if cpu1 > cpu0 else None
        out["rss_idle_mb"] = rss0 / 2**20
        self._site_copies(gw, site0, pres, out)
        gw.stop()
        if gw.ru_maxrss_kib:
            out["ru_maxrss_mb"] = gw.ru_maxrss_kib / 1024
        if gw.vm_hwm_kib:
            out["vm_hwm_mb"] = gw.vm_hwm_kib / 1024
        out["gateway_exit"] = gw.exit_code
        return out

    def _site_copies(self, gw: GatewayProc, site0: float, pres: dict[str, Any] | None,
                     out: dict[str, Any]) -> None:
        """Site messages the gateway handled per message published (1.0 unless it is sent
        copies, e.g. for overlapping subscriptions)."""
        site1 = gw.metric("fieldgate_site_messages_total")
        if site1 is not None and pres and pres["sent"]:
            out["site_msgs_per_pub"] = (site1 - site0) / pres["sent"]
            if out["site_msgs_per_pub"] > 1.05:
                self.notes.append(f"gateway handled {out['site_msgs_per_pub']:.2f} site messages "
                                  "per message published (overlapping subscriptions deliver "
                                  "copies)")

    def s2_gateway_single(self, run: Run) -> dict[str, Any]:
        return self._gateway_full(run, "single", self.n_single)

    def s3_gateway_array(self, run: Run) -> dict[str, Any]:
        return self._gateway_full(run, "array", self.n_array_readings)

    # -- 4. paced load ---------------------------------------------------------------------------

    def s4_paced(self, run: Run) -> dict[str, Any]:
        rates = [1000, 5000]
        secs = self.paced_seconds
        site_b = run.broker("site-bare")
        site_g = run.broker("site-gw")
        cloud = run.broker("cloud")
        gw = run.gateway(site_g, cloud, self.args.batch_delay, self.overrides)
        bare = run.child(Subscriber(site_b.port, "sensors/#", "bare"))
        cloud_sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry", "cloud"))
        gw.start(want_cloud=True)
        for s in (bare, cloud_sub):
            s.expect("connecting", 15)
            s.expect("ready", 15)
        out: dict[str, Any] = {}
        # Idle cost (wake-ups with no traffic), which a paced load pays on top of the work.
        idle = 2.0 if self.quick else 5.0
        time.sleep(0.5)
        g0, b0, w0 = gw.cpu(), bare.cpu(), gw.write_bytes()
        time.sleep(idle)
        out["gw_idle_cpu_ms_per_s"] = (gw.cpu() - g0) / idle * 1000
        out["gw_idle_disk_bytes_per_s"] = (gw.write_bytes() - w0) / idle
        self.say(f"    idle: {out['gw_idle_disk_bytes_per_s']:.0f} bytes/s written to disk")
        out["bare_idle_cpu_ms_per_s"] = (bare.cpu() - b0) / idle * 1000
        for rate in rates:
            n = int(rate * secs)
            # Interleaved: the baseline and the gateway at the same rate one after the other.
            for label, sub, port, cpu_of in (("bare", bare, site_b.port, bare.cpu),
                                             ("gw", cloud_sub, site_g.port, gw.cpu)):
                sub.reset()
                pub = run.child(self.publisher(port, kind="single", n_msgs=n, per_msg=1, rate=rate,
                                          max_seconds=secs * 3 + 10))
                pub.expect("ready", 15)
                time.sleep(0.5)   # let the previous run's tail settle
                sys0 = gw.sys_cpu() if label == "gw" else 0.0
                wb0 = gw.write_bytes()
                cpu0 = cpu_of()
                pub.go()
                pres, why = wait_arrivals(sub, pub, n, timeout=secs * 3 + 30)
                cpu1 = cpu_of()
                if label == "gw":
                    # Flash wear per reading against the bytes the sensors sent: what the
                    # gateway wrote, plus the checkpoint of what it left in the WAL (which
                    # it would write later), done here and counted in this process.
                    payload = len(_single_payload(n // 2, time.time()))
                    own0 = _own_write_bytes()
                    ck = sqlite3.connect(gw.dir / "log.db")
                    ck.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    ck.close()
                    written = (gw.write_bytes() - wb0 + _own_write_bytes() - own0) / n
                    out[f"gw_{rate}_disk_bytes_per_reading"] = written
                    out[f"gw_{rate}_disk_per_payload"] = written / payload
                    self.say(f"    paced {rate}/s: {written:.0f} bytes written to disk per "
                             f"reading, {written / payload:.2f}x its {payload}-byte payload")
                r = self._throughput(sub, pub, pres, why, cpu1 - cpu0, None)
                if label == "gw" and cpu1 > cpu0:
                    r["cpu_sys_share"] = (gw.sys_cpu() - sys0) / (cpu1 - cpu0)
                pub.stop()
                run.children.remove(pub)
                for key in ("cpu_us", "cpu_sys_share", "rate", "offered_rate", "lat_p50",
                            "lat_p99", "incomplete"):
                    if key in r:
                        out[f"{label}_{rate}_{key}"] = r[key]
                self.say(f"    paced {rate}/s {label}: {r['cpu_us']:.1f} us/reading, "
                         f"p50 {_fmt_ms(r['lat_p50'])} ms, p99 {_fmt_ms(r['lat_p99'])} ms")
        out["rss_peak_mb"] = gw.peak_rss() / 2**20
        return out

    # -- 5. drain after an outage ----------------------------------------------------------------

    def s5_drain(self, run: Run) -> dict[str, Any]:
        n = self.n_drain
        site = run.broker("site")
        cloud = run.broker("cloud", start=False)
        gw = run.gateway(site, cloud, self.args.batch_delay, self.overrides)
        gw.start(want_cloud=False)
        pub = run.child(self.publisher(site.port, kind="array", n_msgs=n // ARRAY, per_msg=ARRAY,
                                  rate=0, max_seconds=self.full_cap))
        pub.expect("ready", 15)
        t0 = time.time()
        pub.go()
        deadline = t0 + self.full_cap + 120
        logged = 0.0
        pres = None
        while time.time() < deadline:
            if pres is None:
                pres = pub.result(0)
            logged = gw.metric("fieldgate_readings_total") or 0.0
            if logged >= n:
                break
            time.sleep(0.2)
        t_logged = time.time()
        out: dict[str, Any] = {"logged": int(logged),
                               "ingest_rate_offline": logged / (t_logged - t0)}
        if logged < n:
            out["incomplete"] = "log did not reach the count"
            self.notes.append(f"drain: only {int(logged)} of {n} readings reached the log")
        # The counting subscriber retries its connect every 5 ms, so it is subscribed within a
        # few ms of the broker coming up, before the gateway's next reconnect attempt.
        sub = run.child(Subscriber(cloud.port, f"fieldgate/{GATEWAY_ID}/telemetry", "cloud",
                                   connect_timeout=30))
        sub.expect("connecting", 15)
        time.sleep(0.2)
        cpu0 = gw.cpu()
        t_up = time.time()
        cloud.start()
        sub.expect("ready", 15)
        target = int(logged)
        deadline = time.time() + (60 if self.quick else 150)
        last, last_change = -1, time.time()
        why = ""
        sh = sub.shared
        while True:
            maxseq = int(sh[S_MAXSEQ])
            if maxseq >= target:
                break
            if sh[S_COUNT] != last:
                last, last_change = sh[S_COUNT], time.time()
            if time.time() > deadline:
                why = "timeout"
                break
            if sh[S_COUNT] and time.time() - last_change > 10:
                why = "stalled"
                break
            time.sleep(0.01)
        cpu1 = gw.cpu()
        fin = sub.final()
        span = sh[S_LAST] - sh[S_FIRST]
        out.update({
            "received": fin["count"],
            "rate": fin["count"] / span if span > 0 else 0.0,
            "reconnect_s": sh[S_FIRST] - t_up if sh[S_FIRST] else None,
            "first_seq": int(sh[S_FIRSTSEQ]),
            "cpu_us": (cpu1 - cpu0) / max(1, fin["count"]) * 1e6,
            "rss_peak_mb": gw.peak_rss() / 2**20,
        })
        if fin["dups"]:
            out["duplicates"] = fin["dups"]
        if int(sh[S_FIRSTSEQ]) > 1:
            self.notes.append(f"drain: subscriber missed seq 1..{int(sh[S_FIRSTSEQ]) - 1} "
                              "(gateway reconnected before the subscription)")
        if why:
            out["incomplete"] = why
            self.notes.append(f"drain {why}: {fin['count']} of {target} arrived, "
                              f"max seq {fin['maxseq']}")
        return out

    # -- 6. latency: telemetry and alerts with the defaults, against the old defaults ----------

    def _latency_variants(self) -> list[tuple[str, Path, dict[str, Any]]]:
        """(name, checkout, config) to compare: the old defaults (batching: delay, 200 ms), the
        defaults, and with --baseline-src an older checkout with its own defaults."""
        variants: list[tuple[str, Path, dict[str, Any]]] = [
            ("old", ROOT, {"uplink.batching": "delay", "uplink.batch_max_delay": "200ms"}),
            ("new", ROOT, {}),
        ]
        if self.args.baseline_src:
            variants.insert(0, ("before", self.args.baseline_src.resolve(),
                                {"uplink.batch_max_delay": "200ms"}))
        return variants

    def _tick(self) -> float:
        from fieldkit.units import parse_duration  # noqa: PLC0415
        from gateway.config import EngineSection  # noqa: PLC0415 - the bench's only use

        tick = self.overrides.get("engine.tick", EngineSection.model_fields["tick"].default)
        return parse_duration(tick)

    def s6_latency(self, run: Run) -> dict[str, Any]:
        variants = self._latency_variants()
        secs = self.paced_seconds
        out: dict[str, Any] = {"variants": [name for name, _, _ in variants]}
        topic = f"fieldgate/{GATEWAY_ID}/telemetry"
        # (1) publish -> cloud at paced rates, each configuration on its own brokers;
        # interleaved, so that the machine's load changes hit all of them alike.
        gws: dict[str, tuple[Mosquitto, GatewayProc, Subscriber]] = {}
        for name, src, config in variants:
            site, cloud = run.broker(f"site-{name}"), run.broker(f"cloud-{name}")
            gw = run.gateway(site, cloud, None, {**self.overrides, **config},
                             name=f"gw-{name}", src=src)
            sub = run.child(Subscriber(cloud.port, topic, "cloud"))
            gw.start(want_cloud=True)
            sub.expect("connecting", 15)
            sub.expect("ready", 15)
            gws[name] = (site, gw, sub)
        for rate in (1000, 5000):
            n = int(rate * secs)
            for name, (site, gw, sub) in gws.items():
                sub.reset()
                pub = run.child(self.publisher(site.port, kind="single", n_msgs=n, per_msg=1,
                                               rate=rate, max_seconds=secs * 3 + 10))
                pub.expect("ready", 15)
                time.sleep(0.5)
                cpu0 = gw.cpu()
                pub.go()
                pres, why = wait_arrivals(sub, pub, n, timeout=secs * 3 + 30)
                cpu1 = gw.cpu()
                r = self._throughput(sub, pub, pres, why, cpu1 - cpu0, None)
                pub.stop()
                run.children.remove(pub)
                for key in ("cpu_us", "lat_p50", "lat_p99", "incomplete"):
                    if key in r:
                        out[f"{name}_{rate}_{key}"] = r[key]
                self.say(f"    paced {rate}/s {name}: {r['cpu_us']:.1f} us/reading, "
                         f"p50 {_fmt_ms(r['lat_p50'])} ms, p99 {_fmt_ms(r['lat_p99'])} ms")
        for _, gw, _ in gws.values():
            gw.stop()
        # (2) alerts (for: 0s) while 1k/s of telemetry flows.
        tick = self._tick()
        out["tick_s"] = tick
        n_alerts = 20 if self.quick else 50
        gap = (0.1, 0.5)   # seconds between alarms, at random: any phase against the tick
        rules = run.dir / "alert-rules.yaml"
        rules.write_text(ALERT_RULES)
        for name, src, config in variants:
            site, cloud = run.broker(f"site-{name}-a"), run.broker(f"cloud-{name}-a")
            gw = run.gateway(site, cloud, None,
                             {**self.overrides, **config, "rules": [str(rules)]},
                             name=f"gwa-{name}", src=src)
            sub = run.child(Subscriber(cloud.port, topic, "cloud"))
            gw.start(want_cloud=True)
            sub.expect("connecting", 15)
            sub.expect("ready", 15)
            alerter = run.child(Alerter(site.port, cloud.port, n=n_alerts, gap=gap, seed=6,
                                        wait=tick + 10))
            alerter.expect("ready", 15)
            span = n_alerts * sum(gap) / 2 + tick + 12
            pub = run.child(self.publisher(site.port, kind="single", n_msgs=int(1000 * span),
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
                self.notes.append(f"alerts ({name}): {res['missing']} of {n_alerts} events "
                                  "did not arrive")
            self.say(f"    alerts {name}: reading->cloud p50 {_fmt_ms(pct(lat, 0.5))} ms, "
                     f"p99 {_fmt_ms(pct(lat, 0.99))} ms (tick {tick * 1000:.0f} ms); beyond "
                     f"the tick p50 {_fmt_ms(pct(beyond, 0.5))} ms, p99 "
                     f"{_fmt_ms(pct(beyond, 0.99))} ms; tick->cloud p50 "
                     f"{_fmt_ms(out[f'{name}_alert_tick_p50'])} ms, "
                     f"p99 {_fmt_ms(out[f'{name}_alert_tick_p99'])} ms")
        return out

    # -- summary ---------------------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        r = self.results
        rows: list[dict[str, Any]] = []

        def row(scenario: str, value: Any, unit: str, base: Any = None, target: str = "",
                ok: bool | None = None, ratio: float | None = None) -> None:
            if ratio is None and isinstance(value, (int, float)) and \
                    isinstance(base, (int, float)) and base:
                ratio = value / base
            rows.append({"scenario": scenario, "value": value, "unit": unit, "baseline": base,
                         "ratio": ratio, "target": target,
                         "pass": None if ok is None else bool(ok)})

        s1 = r.get("1_bare", {})
        s2 = r.get("2_gw_single", {})
        s3 = r.get("3_gw_array", {})
        s4 = r.get("4_paced", {})
        s5 = r.get("5_drain", {})
        s6 = r.get("6_latency", {})
        bare_rate = s1.get("rate")
        if s1:
            row("1 bare paho sub, QoS1 full speed", bare_rate, "msg/s")
            row("1 bare sub CPU", s1.get("cpu_us"), "us/msg")
            row("  publisher offered rate", s1.get("offered_rate"), "msg/s")
        if s2:
            v = s2.get("rate")
            ratio = v / bare_rate if v and bare_rate else None
            row("2 gateway, single readings", v, "rdg/s", bare_rate, ">= 0.85 x",
                None if ratio is None else ratio >= 0.85 and not s2.get("incomplete"), ratio)
            row("2 gateway CPU", s2.get("cpu_us"), "us/rdg", s1.get("cpu_us"))
            row("2 gateway RSS peak (sampled)", s2.get("rss_peak_mb"), "MB")
            row("2 gateway ru_maxrss", s2.get("ru_maxrss_mb"), "MB")
            row("2 latency p50 pub->cloud", _ms(s2.get("lat_p50")), "ms", _ms(s1.get("lat_p50")))
            row("2 latency p99 pub->cloud", _ms(s2.get("lat_p99")), "ms", _ms(s1.get("lat_p99")))
            row("2 longest pause in arrivals", _ms(s2.get("max_gap_s")), "ms",
                _ms(s1.get("max_gap_s")))
        if s3:
            v = s3.get("rate")
            row("3 gateway, arrays of 100", v, "rdg/s", s3.get("offered_rate"), ">= 200000",
                None if v is None else v >= 200_000 and not s3.get("incomplete"))
            row("3 gateway CPU", s3.get("cpu_us"), "us/rdg")
            row("3 longest pause in arrivals", _ms(s3.get("max_gap_s")), "ms")
            row("3 gateway RSS peak (sampled)", s3.get("rss_peak_mb"), "MB")
            row("3 gateway ru_maxrss", s3.get("ru_maxrss_mb"), "MB")
        if s4:
            for rate in (1000, 5000):
                v = s4.get(f"gw_{rate}_cpu_us")
                row(f"4 paced {rate}/s gateway CPU", v, "us/rdg", s4.get(f"bare_{rate}_cpu_us"),
                    "<= 30", None if v is None else v <= 30)
                row(f"4 paced {rate}/s latency p50", _ms(s4.get(f"gw_{rate}_lat_p50")), "ms",
                    _ms(s4.get(f"bare_{rate}_lat_p50")))
                row(f"4 paced {rate}/s latency p99", _ms(s4.get(f"gw_{rate}_lat_p99")), "ms",
                    _ms(s4.get(f"bare_{rate}_lat_p99")))
        if s4:
            row("4 idle CPU, no traffic", s4.get("gw_idle_cpu_ms_per_s"), "ms/s",
                s4.get("bare_idle_cpu_ms_per_s"))
        if s5:
            v = s5.get("rate")
            row(f"5 drain {s5.get('logged', 0):,} after outage", v, "rdg/s", None, ">= 50000",
                None if v is None else v >= 50_000 and not s5.get("incomplete"))
            row("5 drain CPU", s5.get("cpu_us"), "us/rdg")
            row("5 ingest into log, cloud down", s5.get("ingest_rate_offline"), "rdg/s")
        if s6 and "error" not in s6:
            self._latency_rows(s6, row)
        for name, res in r.items():
            if "error" in res:
                row(f"{name} FAILED", None, "", target=res["error"].splitlines()[0][:60],
                    ok=False)
        return rows

    @staticmethod
    def _latency_rows(s6: dict[str, Any], row: Any) -> None:
        """Scenario 6: the defaults ("new") with the old defaults in the same run as the
        baseline, and an older checkout ("before") when one was given."""
        bases = [b for b in ("old", "before") if b in s6["variants"]]
        for base in bases:
            tag = "old defaults" if base == "old" else "before"
            row(f"6 baseline: {tag}", None, "")
            for rate in (1000, 5000):
                row(f"6 paced {rate}/s CPU", s6.get(f"new_{rate}_cpu_us"), "us/rdg",
                    s6.get(f"{base}_{rate}_cpu_us"))
                row(f"6 paced {rate}/s pub->cloud p50", _ms(s6.get(f"new_{rate}_lat_p50")), "ms",
                    _ms(s6.get(f"{base}_{rate}_lat_p50")))
                row(f"6 paced {rate}/s pub->cloud p99", _ms(s6.get(f"new_{rate}_lat_p99")), "ms",
                    _ms(s6.get(f"{base}_{rate}_lat_p99")))
            row("6 alert reading->cloud p50", _ms(s6.get("new_alert_p50")), "ms",
                _ms(s6.get(f"{base}_alert_p50")))
            row("6 alert reading->cloud p99", _ms(s6.get("new_alert_p99")), "ms",
                _ms(s6.get(f"{base}_alert_p99")))
            row("6 alert beyond the tick p50", _ms(s6.get("new_alert_beyond_p50")), "ms",
                _ms(s6.get(f"{base}_alert_beyond_p50")))
            beyond = s6.get("new_alert_beyond_p99")
            row("6 alert beyond the tick p99", _ms(beyond), "ms",
                _ms(s6.get(f"{base}_alert_beyond_p99")), "<= 100",
                None if beyond is None else beyond <= 0.1 and not s6.get("new_alert_missing"))
            row("6 alert tick->cloud p50", _ms(s6.get("new_alert_tick_p50")), "ms",
                _ms(s6.get(f"{base}_alert_tick_p50")))
            row("6 alert tick->cloud p99", _ms(s6.get("new_alert_tick_p99")), "ms",
                _ms(s6.get(f"{base}_alert_tick_p99")))

    def print_table(self, rows: list[dict[str, Any]]) -> None:
        def num(x: Any) -> str:
            if x is None:
                return "-"
            if isinstance(x, float):
                return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"
            return str(x)

        head = f"{'scenario':<34} {'value':>10} {'unit':<6} {'baseline':>10} {'ratio':>6} " \
               f"{'target':<10} {'result':<6}"
        print(head)
        print("-" * len(head))
        for rw in rows:
            res = "" if rw["pass"] is None else ("PASS" if rw["pass"] else "FAIL")
            ratio = "-" if rw["ratio"] is None else f"{rw['ratio']:.2f}"
            print(f"{rw['scenario']:<34} {num(rw['value']):>10} {rw['unit']:<6} "
                  f"{num(rw['baseline']):>10} {ratio:>6} {rw['target']:<10} {res:<6}")


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


SCENARIOS = {
    "1": ("1_bare", Bench.s1_bare),
    "2": ("2_gw_single", Bench.s2_gateway_single),
    "3": ("3_gw_array", Bench.s3_gateway_array),
    "4": ("4_paced", Bench.s4_paced),
    "5": ("5_drain", Bench.s5_drain),
    "6": ("6_latency", Bench.s6_latency),
}


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
    ap.add_argument("--n", type=int, default=0, help="messages in scenarios 1 and 2")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="scenario 6 also runs the gateway from this checkout (e.g. "
                    "`git archive <commit> | tar -x -C DIR`) with its own defaults")
    args = ap.parse_args()
    bench = Bench(args)
    started = time.time()
    print(f"Fieldgate data-path bench ({'quick' if args.quick else 'full'}): "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"batch_max_delay {args.batch_delay}, gateway overrides {bench.overrides or '-'}, "
          f"work dir {bench.root}", flush=True)
    try:
        for key in args.scenarios.split(","):
            name, fn = SCENARIOS[key.strip()]
            bench.say(f"- scenario {name}")
            bench.run_scenario(name, lambda run, fn=fn: fn(bench, run))
    except KeyboardInterrupt:
        bench.notes.append("interrupted")
    finally:
        shutil.rmtree(bench.root, ignore_errors=True)
    rows = bench.table()
    print()
    print(f"Summary ({time.time() - started:.0f} s; rdg = readings; baseline = bare paho "
          "subscriber in the same run, for scenario 3 the publisher's offered rate)")
    bench.print_table(rows)
    if bench.notes:
        print("\nNotes:")
        for note in dict.fromkeys(bench.notes):
            print(f"  {note}")
    if args.json:
        args.json.write_text(json.dumps({
            "quick": args.quick, "cpus": os.cpu_count(), "batch_max_delay": args.batch_delay,
            "overrides": bench.overrides,
            "rows": rows, "results": bench.results, "notes": bench.notes,
            "seconds": time.time() - started,
        }, indent=2, default=str))
    failed = any(rw["pass"] is False for rw in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
