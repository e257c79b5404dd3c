"""A rule command's device becomes a topic level (`devices/<id>/cmd`): `gateway rules check`
and `gateway check` refuse a device template that does not render to a device id (ingest's
rule), and the running gateway logs a command it cannot send as refused instead of dying in
the MQTT client ("Publish topic cannot contain wildcards")."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml

from gateway.commands import CommandDeviceError, CommandSender
from gateway.config import LogSection
from tests.mqtt_helpers import CloudCollector, Publisher
from tests.test_rules_check_hostile import one_problem
from tests.test_rules_cli import gateway
from tests.test_rules_e2e import Events
from tests.tools import open_log

RULES = """\
groups:
  - name: house
    match: {{device: "gh-*"}}
    rules:
      - alert: Hot
        expr: last(temp, 30s) > 30
        actions:
          - on: fire
            command:
              device: "{device}"
              action: fan
"""


@pytest.mark.parametrize("device", ["+", "#", "{device}/#", "x/../{device}/#", "a b",
                                    "fan-{device}" + "x" * 200])
def test_rules_check_refuses_a_command_device_that_is_no_device_id(tmp_path, device):
    path = tmp_path / "r.yaml"
    path.write_text(RULES.format(device=device))
    line = one_problem(path)
    assert line.startswith(f"{path}:10: rule Hot: ")
    assert "command.device" in line and "does not make a device id" in line


@pytest.mark.parametrize("device", ["{device}", "fan-{device}", "fan:1", "{alert}.{device}"])
def test_rules_check_accepts_templates_that_make_device_ids(tmp_path, device):
    path = tmp_path / "r.yaml"
    path.write_text(RULES.format(device=device))
    out = gateway("rules", "check", str(path))
    assert out.returncode == 0, out.stderr


def test_gateway_check_refuses_a_wildcard_command_device(tmp_path):
    (tmp_path / "r.yaml").write_text(RULES.format(device="+"))
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                                   "rules": [str(tmp_path / "r.yaml")]}))
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "r.yaml:10: rule Hot:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("device", ["+", "gh-1/#", "a/b", "", "x" * 129])
def test_prepare_refuses_a_device_that_is_no_device_id(tmp_path: Path, device):
    store = open_log(LogSection(path=tmp_path / "log.db"), "gw")
    sender = CommandSender("gw", None, None, store)  # type: ignore[arg-type] - never publishes
    with pytest.raises(CommandDeviceError) as err:
        sender.prepare(device, "fan", {})
    assert err.value.reason
    assert sender.pending == {}
    store.close()


def test_a_command_that_renders_to_no_device_id_is_logged_and_the_gateway_runs_on(
        site, cloud, make_gateway, tmp_path):
    # `{device}-{device}` passes the check, but for a 100-character id it makes 201
    # characters, more than ingest.max_device_id (128): known only when the rule fires.
    (tmp_path / "r.yaml").write_text(RULES.format(device="{device}-{device}"))
    gw = make_gateway(site, cloud, rules=[str(tmp_path / "r.yaml")],
                      engine={"tick": "100ms", "offline_after": None})
    gw.start()
    at_cloud = Events(cloud.port, gw.gateway_id)
    long_id = "gh-" + "a" * 97
    pub = Publisher(site.port)
    pub.publish(f"sensors/{long_id}/telemetry", orjson.dumps({"temp": 35.0}))
    pub.wait()
    assert CloudCollector.wait_for(
        lambda: "io.fieldgate.command.rejected" in at_cloud.types(), 30), gw.log()
    refused = next(b for _, b in at_cloud.got if b.get("type") == "io.fieldgate.command.rejected")
    assert refused["subject"] == long_id
    assert refused["data"]["device"] == f"{long_id}-{long_id}"
    assert "ingest.max_device_id" in refused["data"]["reason"]
    assert refused["data"]["cause"]["rule"] == "Hot"
    # Still running: a short id's command goes out as usual.
    pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": 35.0}))
    pub.close()
    assert CloudCollector.wait_for(
        lambda: "io.fieldgate.command.issued" in at_cloud.types(), 30), gw.log()
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.stop() == 0
