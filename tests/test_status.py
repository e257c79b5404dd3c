"""`gateway status`: a running gateway seen through its /metrics and its log, as a person
sees it (a real terminal in tmux) and as a script sees it (--once)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import yaml

from gateway.mosquitto import free_port
from gateway.status.view import SPARKS, sparkline
from tests.mqtt_helpers import CloudCollector, Publisher
from tests.tools import gateway, need

ROOT = Path(__file__).resolve().parents[1]

RULES = """\
groups:
  - name: test
    rules:
      - alert: Hot
        expr: temp > 30
        severity: critical
        message: "{device} is hot"
        actions:
          - on: fire
            command: {device: "{device}", action: fan, params: {state: "on"}}
"""


def _depth(text: str, sink: str) -> int:
    found = re.search(rf"{sink} ([\d,]+) waiting", text)
    assert found, text
    return int(found.group(1).replace(",", ""))


def _log_depth(config: Path, sink: str) -> int:
    out = gateway("log", "stats", "-c", str(config), "--json")
    assert out.returncode == 0, out.stderr
    return int(orjson.loads(out.stdout)["sinks"][sink]["undelivered"])


def test_sparkline_scales_the_window_and_leaves_gaps():
    assert sparkline([1.0, None, 3.0], 3) == f"{SPARKS[0]} {SPARKS[-1]}"
    assert sparkline([5.0, 5.0], 2) == SPARKS[len(SPARKS) // 2] * 2  # flat: mid-height
    assert sparkline([None] * 60, 4) == "    "
    assert len(sparkline([float(i) for i in range(60)], 20)) == 20


def test_once_under_load_shows_the_depths_log_stats_shows(site, cloud, make_gateway):
    cloud.stop()  # the uplink owes everything: its depth only grows
    gw = make_gateway(site, cloud).start()
    pub = Publisher(site.port)
    sent = 0
    done = threading.Event()

    def load() -> None:
        nonlocal sent
        while not done.is_set() and sent < 20000:
            pub.publish("sensors/d1/telemetry", orjson.dumps({"temp": 20 + sent % 7}))
            sent += 1
            if sent % 200 == 0:
                time.sleep(0.01)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        assert CloudCollector.wait_for(lambda: (gw.metric("fieldgate_readings_total") or 0)
                                       > 200, 20)
        before = _log_depth(gw.config, "uplink")
        status = gateway("status", "-c", str(gw.config), "--once")
        after = _log_depth(gw.config, "uplink")
    finally:
        done.set()
        thread.join()
    assert status.returncode == 0, status.stderr
    assert "cloud DOWN" in status.stdout and "site up" in status.stdout
    assert "d1" in status.stdout
    # The log's saved cursors lag the gateway's by up to a second; under load the depth
    # that status shows lies between two `log stats` taken around it.
    assert before <= _depth(status.stdout, "uplink") <= after, (before, status.stdout, after)

    pub.wait()
    pub.close()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == sent, 30)
    # Quiet now: the same number from both, once the cursors are saved (once a second).
    assert CloudCollector.wait_for(lambda: _log_depth(gw.config, "uplink") == sent, 10)
    status = gateway("status", "-c", str(gw.config), "--once")
    assert status.returncode == 0, status.stderr
    assert _depth(status.stdout, "uplink") == sent == _log_depth(gw.config, "uplink")
    assert gw.stop() == 0


def test_live_view_in_a_real_terminal(site, make_gateway, tmp_path):
    need("tmux", "tmux")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gw = make_gateway(site, None, rules=[str(rules)], engine={"tick": "200ms"}).start()
    pub = Publisher(site.port)
    now = time.time() - 10  # own timestamps: readings of one burst are not duplicates
    for i in range(6):
        pub.publish("sensors/d1/telemetry", orjson.dumps({"ts": now + i, "temp": 20 + i,
                                                          "hum": 40}))
        pub.publish("sensors/d2/telemetry", orjson.dumps({"ts": now + i, "temp": 25 - i,
                                                          "hum": 41}))
    pub.publish("sensors/d1/telemetry", orjson.dumps({"ts": now + 7, "temp": 35, "hum": 40}))
    pub.wait()
    session = f"fieldgate-status-{free_port()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40",
                    # The test process's COLUMNS/LINES (80x24) are not this terminal's.
                    f"env -u COLUMNS -u LINES {sys.executable} -m gateway status -c "
                    f"{gw.config}; sleep 30"],
                   cwd=ROOT, check=True)
    screen = ""
    try:
        def shows_everything() -> bool:
            nonlocal screen
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True, check=True).stdout
            return ("FIRED" in screen and "sent to d1" in screen
                    and re.search(r"^ d2 +2\d", screen, re.M) is not None)

        assert CloudCollector.wait_for(shows_everything, 30), screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    pub.close()
    lines = screen.splitlines()
    d1 = next(line for line in lines if line.startswith(" d1 "))
    assert " 35 " in d1 and "Hot" in d1 and "fan on" in d1  # latest value, alert, actuator
    assert any(ch in d1 for ch in SPARKS), d1
    assert "Hot on d1: 35 > 30 (critical)" in screen, screen
    assert "● site up" in screen
    assert gw.stop() == 0


def test_errors_are_one_line(site, make_gateway, tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"gateway_id": "g",
                                       "log": {"path": str(tmp_path / "nope" / "log.db")}}))
    out = gateway("status", "-c", str(missing), "--once")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "does not exist" in out.stderr, out.stderr

    gw = make_gateway(site, None).start()
    # The same log, metrics expected on a port where nothing answers.
    elsewhere = tmp_path / "elsewhere.yaml"
    cfg = yaml.safe_load(gw.config.read_text())
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    elsewhere.write_text(yaml.safe_dump(cfg))
    out = gateway("status", "-c", str(elsewhere), "--once")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "do not answer" in out.stderr, out.stderr
    cfg["metrics"]["listen"] = None
    elsewhere.write_text(yaml.safe_dump(cfg))
    out = gateway("status", "-c", str(elsewhere), "--once")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "metrics.listen is null" in out.stderr, out.stderr

    assert gw.stop() == 0
    out = gateway("status", "-c", str(gw.config), "--once")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no gateway is running" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
