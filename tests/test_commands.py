"""Commands from the gateway to emulated devices: signed, verified, acknowledged, logged."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from devices.commands import canonical as device_canonical
from devices.fleet import parse_fleet
from devices.generator import FleetModel
from devices.simulator import Simulator
from gateway.commands import canonical, sign
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.mqtt.link import poll_links

KEY = "shared-secret-for-tests"


def test_gateway_and_devices_sign_the_same_bytes():
    cmd = {"id": "gw-1", "ts": 1.25, "action": "fan", "params": {"state": "on", "ü": [1, 2]}}
    assert canonical("gh-1", cmd) == device_canonical("gh-1", cmd)


@pytest.mark.parametrize(("device_key", "status", "reason"),
                         [(KEY, "ok", None), ("another-key", "rejected", "bad signature")])
def test_signed_command_reaches_the_device_and_its_answer_is_logged(
        site, tmp_path, device_key, status, reason):
    key_file = tmp_path / "cmd.key"
    key_file.write_text(KEY + "\n")
    cfg = GatewayConfig.model_validate({
        "gateway_id": "gw-cmd", "site": {"url": site.url},
        "log": {"path": str(tmp_path / "log.db")}, "metrics": {"listen": None},
        "commands": {"key_file": str(key_file)}})
    gw = Gateway(cfg)
    fleet = parse_fleet({"types": {"gh": {
        "count": 1, "id": "gh-1", "interval": "200ms", "metrics": {"temp": {"baseline": 30}},
        "actuators": {"fan": {"states": ["off", "on"], "initial": "off"}}}}})
    sim = Simulator(FleetModel(fleet, start=time.time()), broker=site.url,
                    key=device_key.encode(), say=lambda _line: None)
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(30, stop.is_set), daemon=True)
    runner.start()
    links = [gw.ingest.link]

    def turn(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            poll_links(links, 0.02)
            gw.ingest.step(time.monotonic())

    turn(1.0)  # connected, subscribed, readings flowing
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"}, cause={"rule": "TooHot"})
    gw.ingest.link.flush()
    deadline = time.monotonic() + 10
    answers = []
    while time.monotonic() < deadline and not answers:
        turn(0.1)
        answers = [orjson.loads(body) for (body,) in gw.store._conn.execute(
            "SELECT body FROM records WHERE kind = 1 ORDER BY seq")]
        answers = [a for a in answers if a["type"] != "io.fieldgate.command.issued"]
    stop.set()
    runner.join(10)
    gw.ingest.finish()
    events = [orjson.loads(body) for (body,) in gw.store._conn.execute(
        "SELECT body FROM records WHERE kind = 1 ORDER BY seq")]
    gw.store.close()
    issued = [e for e in events if e["type"] == "io.fieldgate.command.issued"]
    assert len(issued) == 1
    assert issued[0]["data"]["id"] == cid and issued[0]["data"]["signed"] is True
    assert issued[0]["data"]["cause"] == {"rule": "TooHot"}
    assert len(answers) == 1
    answer = answers[0]
    assert answer["subject"] == "gh-1"
    assert answer["data"]["id"] == cid
    assert answer["data"]["status"] == status
    assert answer["data"].get("reason") == reason
    expected_type = "acknowledged" if status == "ok" else "rejected"
    assert answer["type"] == f"io.fieldgate.command.{expected_type}"
    assert sim.model.by_id["gh-1"].actuators["fan"] == ("on" if status == "ok" else "off")


def test_the_sig_field_itself_is_not_signed():
    cmd = {"id": "x", "ts": 1.5, "action": "fan", "params": {"state": "on"}}
    assert sign(b"k", "d", cmd) == sign(b"k", "d", {**cmd, "sig": "ignored"})


def test_a_redelivered_acknowledgement_is_logged_once(tmp_path):
    from gateway.commands import CommandSender

    class _NoLink:
        def publish(self, *_a, **_k):
            return 1

    sender = CommandSender("gw", None, _NoLink(), None)  # type: ignore[arg-type]
    ack = orjson.dumps({"id": "gw-1-1", "status": "ok"})
    first = sender.acknowledgement("devices/d/cmd/ack", ack, 1.0)
    assert first is not None and first.type == "io.fieldgate.command.acknowledged"
    assert sender.acknowledgement("devices/d/cmd/ack", ack, 2.0) is None
    other = sender.acknowledgement("devices/e/cmd/ack", ack, 2.0)
    assert other is not None  # same id from another device is another answer
