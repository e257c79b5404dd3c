"""The `gateway` command as a user runs it: exit codes, one-line errors, log tools."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import orjson
import pytest
import yaml
from click.testing import CliRunner

from tests.mqtt_helpers import CloudCollector, Publisher
from tests.tools import gateway

ROOT = Path(__file__).resolve().parents[1]


def _leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            found += _leaf_commands(cmd, (*path, name))
        else:
            found.append((*path, name))
    return found


@pytest.mark.parametrize("cli", ["gateway", "devices"])
def test_every_command_has_help_with_an_example(cli):
    """Walks the whole command tree, so a new command cannot ship without its --help."""
    module = importlib.import_module(f"{cli}.cli")
    commands = _leaf_commands(module.main)
    assert len(commands) >= (11 if cli == "gateway" else 2)
    runner = CliRunner()
    for args in commands:
        out = runner.invoke(module.main, [*args, "--help"])
        assert out.exit_code == 0, (args, out.output)
        assert "Example" in out.output, f"{cli} {' '.join(args)} --help has no example"


def test_a_second_gateway_on_the_same_log_is_refused(site, make_gateway):
    first = make_gateway(site, None).start()
    second = make_gateway(site, None)
    second.config = first.config
    second.launch()
    assert second.proc is not None
    assert second.proc.wait(60) == 1
    lines = [ln for ln in second.log().splitlines() if "in use by gateway pid" in ln]
    assert lines == [f"error: Log {str(first.config.parent / 'log.db')!r} is in use by "
                     f"gateway pid {first.proc.pid}; stop it first, or give this one another "
                     "log.path"]
    assert first.proc.poll() is None, "the running gateway is untouched"
    assert first.stop() == 0


def test_check_ok_and_problems(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")}}))
    out = gateway("check", "-c", str(good))
    assert (out.returncode, out.stdout.strip()) == (0, "ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway_id: g\nuplink: {batch_max_readings: 0}\nlog: {max_age: forever}\n")
    out = gateway("check", "-c", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith(f"{bad}: uplink.batch_max_readings:") for line in lines)
    assert f"{bad}: log.max_age: 'forever' is not a duration; write e.g. 500ms, 30s, 5m, 1h, 7d" \
        in lines
    assert "Traceback" not in out.stderr


def test_secret_value_never_printed(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2-very-secret")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway_id": "g", "log": {"path": str(tmp_path / "missing" / "l.db")},
        "cloud": {"url": "mqtts://h", "password_file": str(pw)}}))
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "hunter2" not in out.stdout + out.stderr


def test_corrupt_log_is_one_clear_line(tmp_path):
    db = tmp_path / "log.db"
    db.write_bytes(b"garbage" * 1000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(db)},
                                   "metrics": {"listen": None}}))
    out = gateway("run", "-c", str(cfg))
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert str(db) in out.stderr and "move it aside" in out.stderr


def test_dlq_listing_and_replay_after_a_fix(site, cloud, make_gateway, tmp_path):
    gw = make_gateway(site, cloud, ingest={"max_payload": "1KiB"}).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    big = orjson.dumps({"i": 1} | {f"metric_with_a_long_name_{k:02d}": k * 1.25 for k in range(40)})
    assert 1024 < len(big) < 4096
    pub.publish("sensors/d/telemetry", big)
    pub.publish("sensors/d/telemetry", orjson.dumps({"i": 0}))
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) == 1, 10)
    assert gw.stop() == 0

    listing = gateway("log", "dlq", "-c", str(gw.config))
    assert listing.returncode == 0
    assert "too_large" in listing.stdout and "sensors/d/telemetry" in listing.stdout
    stats = gateway("log", "stats", "-c", str(gw.config), "--json")
    assert orjson.loads(stats.stdout)["dead_letters"] == {"too_large": 1}

    # The fix: allow larger payloads. Restart, replay, and the reading arrives.
    cfg = yaml.safe_load(gw.config.read_text())
    cfg["ingest"]["max_payload"] = "8KiB"
    gw.config.write_text(yaml.safe_dump(cfg))
    gw.start()
    out = gateway("log", "replay", "-c", str(gw.config), "--reason", "too_large")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "replayed 1 of 1"
    assert sink.wait_for(lambda: len(sink.unique()) == 2, 10), gw.log()
    assert {r["i"] for r in sink.unique().values()} == {0, 1}
    again = gateway("log", "replay", "-c", str(gw.config), "--reason", "too_large")
    assert again.stdout.strip() == "replayed 0 of 0"  # replayed entries are not sent twice
    assert gw.stop() == 0
    sink.close()


def test_log_stats_shows_depth_per_sink(site, cloud, make_gateway):
    cloud.stop()
    gw = make_gateway(site, cloud).start()
    pub = Publisher(site.port)
    for i in range(50):
        pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
    pub.close()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == 50, 10)
    assert gw.stop() == 0
    out = gateway("log", "stats", "-c", str(gw.config))
    assert out.returncode == 0, out.stderr
    assert "uplink: 50 undelivered" in out.stdout
    data = orjson.loads(gateway("log", "stats", "-c", str(gw.config), "--json").stdout)
    assert data["readings"] == 50
    assert data["sinks"]["uplink"]["undelivered"] == 50


def test_demo_closes_the_loop_and_survives_a_cloud_cut():
    """Heat rises on gh-1, TooHot fires, the signed fan command is verified and acknowledged
    by the emulated device, the temperature falls and the alert resolves; meanwhile the
    cloud link is cut and every reading still arrives. With influxd installed the same
    readings and alerts land in InfluxDB, and the demo ends with what `gateway query`
    says about them."""
    out = subprocess.run([sys.executable, "-m", "gateway", "demo", "--duration", "20s",
                          "--cut-cloud", "3s"], cwd=ROOT, text=True, capture_output=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CUT" in out.stdout
    lines = out.stdout.strip().splitlines()
    last = next(line for line in lines if line.startswith("done:"))
    assert " 0 missing;" in last, last
    numbers = dict(re.findall(r"(fired|resolved) (\d+)", last))
    numbers.update((word, n) for n, word in re.findall(r"(\d+) (acknowledged|rejected)", last))
    assert int(numbers["fired"]) >= 1
    assert int(numbers["resolved"]) >= 1
    assert int(numbers["acknowledged"]) >= 1
    assert int(numbers["rejected"]) == 0
    # Every answer was signed by the device and matched a command that waited for it.
    assert " 0 not believed, 0 timed out" in last, last
    # The operator's command from the cloud was signed, allowed, and answered by gh-2.
    cloud = next(line for line in lines if line.startswith("cloud: "))
    assert cloud.endswith("to gh-2: ok (signed, allowed, acknowledged by the device)"), cloud

    after = lines[lines.index(last) + 1:]
    if shutil.which("influxd") is None and shutil.which("influxd", path="/usr/bin") is None:
        assert any("sudo apt-get install -y influxdb" in line for line in lines), lines
        return
    # `gateway query last`: a row per metric of each device, gh-1's temperature among them.
    start = after.index(next(line for line in after if line.startswith("$ gateway query last")))
    table = after[start + 1:after.index(next(line for line in after
                                              if line.startswith("$ gateway query alerts")))]
    assert table[0].split() == ["gateway", "device", "metric", "value", "time", "age"]
    rows = [line.split() for line in table[2:]]
    assert {(r[0], r[1], r[2]) for r in rows} >= {("demo", f"gh-{n}", m) for n in range(1, 5)
                                                  for m in ("temp", "hum", "soil")}
    # `gateway query alerts`: InfluxDB holds the alerts the cloud consumer counted.
    influx = next(line for line in after if line.startswith("influxdb:"))
    fired, resolved = map(int, re.findall(r"(\d+) alerts fired, (\d+) resolved", influx)[0])
    assert (fired, resolved) == (int(numbers["fired"]), int(numbers["resolved"])), influx
    assert sum(" alert.fired " in line for line in after) == fired


def test_metrics_port_in_use_is_one_clear_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                                       "metrics": {"listen": f"127.0.0.1:{port}"}}))
        out = gateway("run", "-c", str(cfg))
    assert out.returncode == 1
    assert f"metrics.listen '127.0.0.1:{port}'" in out.stderr
    assert "Traceback" not in out.stderr
