"""Rules in the running gateway, with real Mosquitto: a threshold crossed gives an alert
event at the cloud broker and a signed command on the site broker; alert state survives a
restart; a broken rule file on reload keeps the running rules."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson

from gateway.commands import device_key, signature
from tests.conftest import ROOT
from tests.mqtt_helpers import CloudCollector, Publisher, client, subscribe_and_wait

RULES = """\
groups:
  - name: house
    match: {device: "gh-*"}
    rules:
      - alert: Hot
        expr: last(temp, 3s) > 30
        clear: last(temp, 3s) < 25
        severity: critical
        message: "{device} is at {value:.1f}"
        actions:
          - on: fire
            command: {device: "{device}", action: fan, params: {state: "on"}}
          - on: resolve
            command: {device: "{device}", action: fan, params: {state: "off"}}
"""


class Events:
    def __init__(self, port: int, gateway_id: str) -> None:
        self.got: list[tuple[str, dict]] = []
        self.c = client(port)
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, orjson.loads(m.payload)))
        subscribe_and_wait(self.c, [(f"fieldgate/{gateway_id}/events/#", 1),
                                    ("devices/+/cmd", 1)])

    def types(self) -> list[str]:
        return [body.get("type", topic) for topic, body in self.got]


def test_threshold_gives_alert_event_and_signed_command(site, cloud, make_gateway, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "house.yaml").write_text(RULES)
    (tmp_path / "cmd.key").write_text("k3y")
    (tmp_path / "cmd.key").chmod(0o600)  # a key every user can read is refused
    gw = make_gateway(site, cloud, rules=[str(rules / "*.yaml")],
                      engine={"tick": "100ms", "offline_after": None},
                      commands={"key_file": str(tmp_path / "cmd.key")})
    gw.expect_error("Rule reload failed, keeping the running rules")  # the broken file below
    gw.start()
    at_cloud = Events(cloud.port, gw.gateway_id)
    at_site = Events(site.port, gw.gateway_id)
    pub = Publisher(site.port)
    pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": 21.0}))
    pub.wait()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == 1.0, 30)
    pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": 35.5}))
    pub.wait()
    assert CloudCollector.wait_for(lambda: "io.fieldgate.alert.fired" in at_cloud.types(), 10), \
        gw.log()
    fired = next(b for t, b in at_cloud.got if b.get("type") == "io.fieldgate.alert.fired")
    assert fired["subject"] == "gh-1"
    assert fired["data"]["rule"] == "Hot" and fired["data"]["severity"] == "critical"
    assert fired["data"]["message"] == "gh-1 is at 35.5"
    assert CloudCollector.wait_for(lambda: any(t == "devices/gh-1/cmd" for t, _ in at_site.got),
                                   10)
    sealed = next(b for t, b in at_site.got if t == "devices/gh-1/cmd")
    cmd = sealed["cmd"]
    assert cmd["action"] == "fan" and cmd["params"] == {"state": "on"}
    # Signed with gh-1's key over the body's bytes (orjson writes them as the gateway did).
    assert sealed["sig"] == signature(device_key(b"k3y", "gh-1"), "devices/gh-1/cmd",
                                      orjson.dumps(cmd))
    assert CloudCollector.wait_for(
        lambda: "io.fieldgate.command.issued" in at_cloud.types(), 10)
    order = [t for t in at_cloud.types() if t.startswith("io.fieldgate.")]
    assert order.index("io.fieldgate.alert.fired") < order.index("io.fieldgate.command.issued")

    # Restart while firing: no second "fired".
    assert gw.stop() == 0
    gw.start()
    pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": 36.0}))
    pub.wait()
    time.sleep(1.0)
    assert at_cloud.types().count("io.fieldgate.alert.fired") == 1
    # Cool down: resolved, and the fan goes off.
    pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": 20.0}))
    pub.wait()
    assert CloudCollector.wait_for(
        lambda: "io.fieldgate.alert.resolved" in at_cloud.types(), 10), gw.log()
    assert CloudCollector.wait_for(
        lambda: sum(1 for t, _ in at_site.got if t == "devices/gh-1/cmd") == 2, 10)

    # `gateway rules reload` checks first and refuses a broken file; a SIGHUP that meets one
    # is logged and the running rules stay.
    (rules / "house.yaml").write_text("groups: [{name: x, rules: [{alert: A, expr: 'avg(('}]}]")
    refused = subprocess.run([sys.executable, "-m", "gateway", "rules", "reload", "-c",
                              str(gw.config)], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "house.yaml" in refused.stderr
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    assert CloudCollector.wait_for(lambda: "Rule reload failed" in gw.log(), 5)
    (rules / "house.yaml").write_text(RULES)
    sent = subprocess.run([sys.executable, "-m", "gateway", "rules", "reload", "-c",
                           str(gw.config)], cwd=ROOT, capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    assert CloudCollector.wait_for(lambda: "Rules reloaded" in gw.log(), 5)
    pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": 40.0}))
    pub.close()
    assert CloudCollector.wait_for(
        lambda: at_cloud.types().count("io.fieldgate.alert.fired") == 2, 10), gw.log()
    assert gw.stop() == 0
