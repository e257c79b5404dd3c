"""Commands from the cloud (issue 13, docs/downlink.md), end to end on real Mosquitto with the
emulator as the device: signed by the cloud key, checked, allowed, sent signed with the
device key, and answered; everything else refused with a reason, the device never touched.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.fleet import parse_fleet
from devices.generator import FleetModel
from devices.simulator import Simulator
from gateway.downlink.signing import Signer
from gateway.mosquitto import Mosquitto
from tests.mqtt_helpers import SLACK, CloudCollector, subscribe_and_wait
from tests.tools import GatewayProcess
from tests.tools import gateway as gateway_cli

MASTER = "site-master-key-for-downlink-tests"
GW = "gw-test"
DEVICE = "gh-1"


class Operator:
    """The cloud side as a test writes it: a plain paho v5 client that signs requests (or
    not), publishes them with a Response Topic and Correlation Data, and collects replies."""

    def __init__(self, port: int, signer: Signer | None) -> None:
        self.signer = signer
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.on_default: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []   # what the uplink published on events/...
        self._cond = threading.Condition()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=paho.MQTTv5, client_id=f"operator-{uuid.uuid4().hex[:8]}")
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.reply_topic = f"ops/replies/{uuid.uuid4().hex[:8]}"
        subscribe_and_wait(self.c, [(self.reply_topic, 1), (f"fieldgate/{GW}/cmd/+/reply", 1),
                                    (f"fieldgate/{GW}/rules/reply", 1),
                                    (f"fieldgate/{GW}/events/#", 1)])

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        corr = getattr(msg.properties, "CorrelationData", None)
        with self._cond:
            if "/events/" in msg.topic:
                self.events.append(body)
            elif corr is not None:
                self.replies[bytes(corr)] = body
            else:
                self.on_default.append((msg.topic, body))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, *, sign: bool = True,
                signature: str | None = None, retain: bool = False,
                response: bool = True) -> bytes:
        props = Properties(PacketTypes.PUBLISH)
        corr = uuid.uuid4().bytes
        if response:
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = corr
        if signature is None and sign and self.signer is not None:
            signature = self.signer.sign(topic, payload)
        if signature is not None:
            props.UserProperty = [("signature", signature)]
        self.c.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(30)
        return corr

    def command(self, body: dict[str, Any], device: str = DEVICE, **kw: Any) -> bytes:
        body = {"id": uuid.uuid4().hex, "ts": time.time(), **body}
        return self.publish(f"fieldgate/{GW}/cmd/{device}", orjson.dumps(body), **kw)

    def reply(self, corr: bytes, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout * SLACK
        with self._cond:
            while corr not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no reply; replies so far: {self.replies}")
                self._cond.wait(left)
            return self.replies[corr]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Device:
    """The emulator as the device gh-1 with a fan, in a thread of the test."""

    def __init__(self, site: Mosquitto, key: str = MASTER) -> None:
        fleet = parse_fleet({"types": {"gh": {
            "count": 1, "id": DEVICE, "interval": "200ms",
            "metrics": {"temp": {"baseline": 30}},
            "actuators": {"fan": {"states": ["off", "on"], "initial": "off"}}}}})
        self.sim = Simulator(FleetModel(fleet, start=time.time()), broker=site.url,
                             key=key.encode(), say=lambda _line: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.sim.run, args=(600, self._stop.is_set),
                                        daemon=True)
        self._thread.start()

    @property
    def fan(self) -> str:
        return str(self.sim.model.by_id[DEVICE].actuators["fan"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(20)


SIGNER_FILE: list[Path] = []


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    path = tmp_path_factory.mktemp("keys") / "cloud.key"
    SIGNER_FILE[:] = [path]
    return Signer.generate(path)


def _gateway(make_gateway: Any, site: Mosquitto, cloud: Mosquitto, tmp_path: Path,
             signer: Signer, **downlink: Any) -> GatewayProcess:
    key = tmp_path / "master.key"
    key.write_text(MASTER + "\n")
    key.chmod(0o600)
    return make_gateway(site, cloud, commands={"key_file": str(key)}, downlink={
        "public_keys": [signer.public_key],
        "allow": [{"devices": "gh-*", "commands": ["fan"]}], **downlink})


def _events(gw: GatewayProcess) -> list[dict[str, Any]]:
    """The events in the gateway's log, in order (read beside the running gateway)."""
    conn = sqlite3.connect(f"file:{gw.dir / 'log.db'}?mode=ro", uri=True)
    try:
        return [orjson.loads(body) for (body,) in conn.execute(
            "SELECT body FROM records WHERE kind = 1 ORDER BY seq")]
    finally:
        conn.close()


def _barrier(op: Operator) -> None:
    """Until the gateway has read everything the operator published so far: a resend
    request (answered by every gateway with a cloud link) goes after them, in order."""
    corr = op.publish(f"fieldgate/{GW}/resend",
                      orjson.dumps({"request_id": "barrier", "from": 1, "to": 1}), sign=False)
    op.reply(corr)


@pytest.fixture
def rig(site: Mosquitto, cloud: Mosquitto, make_gateway: Any, tmp_path: Path,
        signer: Signer) -> Iterator[tuple[GatewayProcess, Device, Operator, CloudCollector]]:
    gw = _gateway(make_gateway, site, cloud, tmp_path, signer).start()
    collector = CloudCollector(cloud.port, GW)
    device = Device(site)
    op = Operator(cloud.port, signer)
    # The device is known once a reading of it reached the cloud (it is durable by then).
    assert collector.wait_for(lambda: any(r["device"] == DEVICE for r in collector.readings),
                              60)
    yield gw, device, op, collector
    op.close()
    device.close()
    collector.close()


def test_a_cloud_command_reaches_the_device_and_the_answer_comes_back(rig):
    gw, device, op, _ = rig
    assert device.fan == "off"
    corr = op.command({"action": "fan", "params": {"state": "on"}})
    reply = op.reply(corr)
    assert reply["status"] == "ok", reply
    assert reply["device"] == DEVICE
    assert device.fan == "on"
    # Every step is also on the cloud's events/... topics, in order.
    steps = ["received", "issued", "sent", "acknowledged"]
    assert CloudCollector.wait_for(lambda: [
        e["type"].rsplit(".", 1)[1] for e in list(op.events)
        if e["type"].startswith("io.fieldgate.command.")] == steps, 60)
    assert gw.stop() == 0
    kinds = [e["type"].rsplit(".", 1)[1] for e in _events(gw)
             if e["type"].startswith("io.fieldgate.command.")]
    assert kinds == ["received", "issued", "sent", "acknowledged"]
    issued = next(e for e in _events(gw) if e["type"].endswith(".issued"))
    assert issued["data"]["cause"]["origin"] == "cloud"
    assert issued["data"]["signed"] is True


def test_without_a_response_topic_the_reply_goes_to_the_default_topic(rig):
    _, device, op, _ = rig
    op.command({"action": "fan", "params": {"state": "on"}}, response=False)
    assert CloudCollector.wait_for(lambda: op.on_default, 60)
    topic, body = op.on_default[0]
    assert topic == f"fieldgate/{GW}/cmd/{DEVICE}/reply"
    assert body["status"] == "ok"
    assert device.fan == "on"


def test_refusals_have_a_reason_and_an_event_and_never_touch_the_device(rig, tmp_path):
    gw, device, op, _ = rig
    other = Signer.generate(tmp_path / "other.key")
    good = {"action": "fan", "params": {"state": "on"}}

    def signed_body(body: dict[str, Any]) -> bytes:
        return orjson.dumps({"id": uuid.uuid4().hex, "ts": time.time(), **body})

    topic = f"fieldgate/{GW}/cmd/{DEVICE}"
    tampered = signed_body(good)
    tampered_sig = op.signer.sign(topic, tampered)  # type: ignore[union-attr]
    replayed = signed_body({"action": "fan", "params": {"state": "off"}})
    cases: dict[str, bytes] = {
        "unsigned": op.command(good, sign=False),
        "bad signature": op.command(good, signature=other.sign(topic, signed_body(good))),
        "bad signature ": op.publish(topic, tampered.replace(b'"on"', b'"no"'),
                                     signature=tampered_sig),
        "stale": op.command({**good, "ts": time.time() - 3600}),
        "from the future": op.command({**good, "ts": time.time() + 3600}),
        "not allowed": op.command({"action": "reboot", "params": {}}),
        "unknown device": op.command(good, device="gh-404"),
        "too large": op.command({**good, "params": {"pad": "x" * 20_000}}),
        "malformed": op.publish(topic, b"{not json"),
        "malformed ": op.command({"action": "fan", "params": "on"}),
        "retained": op.command(good, retain=True),
    }
    first = op.publish(topic, replayed)
    assert op.reply(first)["status"] == "ok"   # taken once (the fan stays off)...
    cases["replayed"] = op.publish(topic, replayed)  # ...and never again
    for reason, corr in cases.items():
        reply = op.reply(corr)
        assert reply["status"] == "refused", (reason, reply)
        assert reply["reason"].startswith(reason.strip()), (reason, reply)
    assert device.fan == "off"
    assert device.sim.stats.commands_refused == 0   # nothing forged reached it
    assert gw.stop() == 0
    events = _events(gw)
    refused = [e["data"]["reason"] for e in events if e["type"] == "io.fieldgate.command.refused"]
    assert len(refused) == len(cases)
    issued = [e for e in events if e["type"] == "io.fieldgate.command.issued"]
    assert len(issued) == 1   # the one good command


def test_a_flood_of_forged_requests_is_counted_not_logged_one_by_one(rig):
    gw, device, op, _ = rig
    flood = 500
    topic = f"fieldgate/{GW}/cmd/{DEVICE}"
    for i in range(flood):
        op.c.publish(topic, orjson.dumps({"id": f"f{i}", "ts": time.time(), "action": "fan",
                                          "params": {"state": "on"}}), qos=1)
    # Read in order: once a good command after them is answered, all were judged.
    assert op.reply(op.command({"action": "fan", "params": {"state": "off"}}))["status"] == "ok"
    assert gw.metric('fieldgate_downlink_refused_total{reason="unsigned"}') == flood
    assert device.fan == "off"
    assert gw.stop() == 0
    refused = [e for e in _events(gw) if e["type"] == "io.fieldgate.command.refused"]
    assert 1 <= len(refused) < flood / 2   # within the budget (10 a second), not 500


def test_a_huge_request_never_reaches_the_gateway(rig):
    gw, device, op, _ = rig
    # The cloud link announces a Maximum Packet Size a little above downlink's limits: the
    # broker drops this one instead of making the gateway read 8 MiB.
    op.c.publish(f"fieldgate/{GW}/cmd/{DEVICE}", b"x" * (8 * 1024 * 1024), qos=1)
    assert op.reply(op.command({"action": "fan", "params": {"state": "on"}}))["status"] == "ok"
    assert device.fan == "on"
    assert gw.metric('fieldgate_link_connected{link="cloud"}') == 1.0
    assert gw.metric('fieldgate_downlink_refused_total{reason="too_large"}') is None


def test_a_replayed_request_is_refused_after_a_restart_too(rig):
    gw, _, op, _ = rig
    topic = f"fieldgate/{GW}/cmd/{DEVICE}"
    payload = orjson.dumps({"id": "once-only", "ts": time.time(), "action": "fan",
                            "params": {"state": "on"}})
    assert op.reply(op.publish(topic, payload))["status"] == "ok"
    assert gw.stop() == 0
    gw.start()
    gw.wait_links("cloud")
    reply = op.reply(op.publish(topic, payload))
    assert reply["status"] == "refused" and reply["reason"].startswith("replayed"), reply


def _command_while_site_is_away(rig: Any, site: Mosquitto, ttl: int) -> bytes:
    """Stop the site broker, send a fan command, and wait until the gateway has logged it
    as received (the uplink's event shows it); returns its correlation data."""
    gw, _, op, _ = rig
    site.stop()
    corr = op.command({"action": "fan", "params": {"state": "on"}, "ttl": ttl})
    assert CloudCollector.wait_for(lambda: any(
        e["type"] == "io.fieldgate.command.received" for e in _events(gw)), 60)
    return corr


def test_a_command_waits_for_the_site_broker_then_goes_out(rig, site):
    _, device, op, _ = rig
    # Received and logged while the site broker is away ...
    corr = _command_while_site_is_away(rig, site, ttl=120)
    assert corr not in op.replies
    site.start()
    reply = op.reply(corr)   # ... and delivered once it is back
    assert reply["status"] == "ok", reply
    assert device.fan == "on"


def test_a_waiting_command_survives_a_sigkill_and_its_reply_still_comes(rig, site):
    gw, device, op, _ = rig
    corr = _command_while_site_is_away(rig, site, ttl=300)
    gw.kill()          # taken (PUBACKed to the cloud) and durable, not yet sent
    site.start()
    gw.start()
    reply = op.reply(corr)
    assert reply["status"] == "ok", reply
    assert device.fan == "on"
    assert gw.stop() == 0
    kinds = [e["type"].rsplit(".", 1)[1] for e in _events(gw)
             if e["type"].startswith("io.fieldgate.command.")]
    assert kinds == ["received", "issued", "sent", "acknowledged"]


def test_a_command_past_its_ttl_expires_with_a_reply_and_never_reaches_the_device(rig, site):
    gw, device, op, _ = rig
    site.stop()
    corr = op.command({"action": "fan", "params": {"state": "on"}, "ttl": 2})
    reply = op.reply(corr)
    assert reply["status"] == "expired", reply
    assert "site broker was not reachable" in reply["reason"]
    site.start()
    gw.wait_links("site")
    # A command sent after the site broker is back is answered: the expired one, sent
    # before it, would have reached the device first, had it gone out.
    assert op.reply(op.command({"action": "fan", "params": {"state": "off"}}))["status"] == "ok"
    assert device.fan == "off"
    assert device.sim.stats.commands_ok == 1
    assert gw.stop() == 0
    events = _events(gw)
    expired = [e["data"]["id"] for e in events if e["type"] == "io.fieldgate.command.expired"]
    sent = [e["data"]["id"] for e in events if e["type"] == "io.fieldgate.command.sent"]
    assert len(expired) == 1 and len(sent) == 1   # the second command only
    assert expired[0] not in sent


def test_whoever_publishes_on_the_site_broker_cannot_command_a_device(rig, site):
    gw, device, op, _ = rig
    site_op = Operator(site.port, op.signer)   # even with a valid cloud signature
    try:
        site_op.command({"action": "fan", "params": {"state": "on"}})
        site_op.publish(f"devices/{DEVICE}/cmd", orjson.dumps({
            "id": "forged", "ts": time.time(), "action": "fan", "params": {"state": "on"}}),
            sign=False)
        # A good command from the cloud afterwards: once its answer is back, the site-side
        # requests (published before it) had every chance to act.
        corr = op.command({"action": "fan", "params": {"state": "off"}})
        assert op.reply(corr)["status"] == "ok"
    finally:
        site_op.close()
    assert device.fan == "off"
    assert device.sim.stats.commands_refused == 1   # the unsigned one, refused by the device
    assert gw.stop() == 0
    received = [e for e in _events(gw) if e["type"] == "io.fieldgate.command.received"]
    assert len(received) == 1
    assert not site_op.replies


def test_the_downlink_is_off_without_allow_or_rules(site, cloud, make_gateway, tmp_path, signer):
    gw = _gateway(make_gateway, site, cloud, tmp_path, signer, allow=[]).start()
    gw.wait_links("cloud")
    op = Operator(cloud.port, signer)
    try:
        corr = op.command({"action": "fan", "params": {"state": "on"}})
        _barrier(op)
        assert corr not in op.replies and not op.on_default
    finally:
        op.close()
    assert gw.stop() == 0
    assert not [e for e in _events(gw) if e["type"].startswith("io.fieldgate.command.")]



def test_the_operators_cli_commands_a_device_through_a_real_gateway(rig, cloud, tmp_path):
    """`gateway cloud send` against the gateway itself, not a stand-in."""
    gw, device, _, _ = rig
    key = tmp_path / "cloud.key"
    key.write_bytes(SIGNER_FILE[0].read_bytes())
    key.chmod(0o600)
    conf = tmp_path / "cloud.yaml"
    conf.write_text(yaml.safe_dump({"broker": {"url": cloud.url}, "signing_key_file": str(key)}))
    out = gateway_cli("cloud", "send", "-c", str(conf), "--gateway", GW, "--device", DEVICE,
                      '{"cmd": "fan", "state": "on"}')
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok"), out.stdout
    assert device.fan == "on"
    out = gateway_cli("cloud", "send", "-c", str(conf), "--gateway", GW, "--device", DEVICE,
                      '{"cmd": "reboot"}')
    assert out.returncode == 1, out
    assert "not allowed" in out.stdout + out.stderr
    assert device.fan == "on"
    assert gw.stop() == 0
