"""Rule deployment from the cloud (issue 13), end to end on real Mosquitto: a signed bundle
on fieldgate/<id>/rules/set is applied and its rules fire; a bad one is refused with
file:line while the old rules keep running; rollback; a replayed bundle is refused; the
version is in the retained status; nobody on the site broker can change the rules."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.downlink.signing import Signer
from gateway.mosquitto import Mosquitto
from tests.mqtt_helpers import CloudCollector, Publisher
from tests.test_downlink import GW, Operator, _barrier, _events
from tests.test_rules_deploy import BROKEN, rule
from tests.tools import GatewayProcess
from tests.tools import gateway as gateway_cli


def _bundle(version: str, files: dict[str, str]) -> bytes:
    return orjson.dumps({"id": uuid.uuid4().hex, "ts": time.time(), "version": version,
                         "files": files})


def _fired(gw: GatewayProcess, alert: str) -> list[str]:
    """Devices the alert fired for, from the log."""
    return [e["subject"] for e in _events(gw) if e["type"] == "io.fieldgate.alert.fired"
            and e["data"]["rule"] == alert]


@pytest.fixture
def gw(site: Mosquitto, cloud: Mosquitto, make_gateway: Any, tmp_path: Path) -> Any:
    signer = Signer.generate(tmp_path / "cloud.key")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "house.yaml").write_text(rule("LocalHot", 30))
    proc = make_gateway(site, cloud, rules=[str(tmp_path / "local" / "*.yaml")],
                        engine={"tick": "100ms", "offline_after": None},
                        downlink={"public_keys": [signer.public_key], "rules": True})
    proc.start()
    proc.wait_links("cloud")
    proc.signer = signer
    return proc


def test_a_bundle_is_applied_checked_rolled_back_and_never_replayed(gw, site, cloud):
    op = Operator(cloud.port, gw.signer)
    collector = CloudCollector(cloud.port, GW)
    readings = Publisher(site.port)
    topic = f"fieldgate/{GW}/rules/set"

    def reading(device: str, temp: float) -> None:
        readings.publish(f"sensors/{device}/telemetry", orjson.dumps({"temp": temp}))

    try:
        good = _bundle("v1", {"house.yaml": rule("Deployed", 35)})
        reply = op.reply(op.publish(topic, good))
        assert reply["status"] == "applied", reply
        assert (reply["version"], reply["previous"]) == ("v1", "local")
        reading("gh-1", 40)
        assert CloudCollector.wait_for(lambda: _fired(gw, "Deployed") == ["gh-1"], 60)
        assert not _fired(gw, "LocalHot")   # the deployed version runs instead

        # A bad bundle: refused with file:line, and the running rules keep firing.
        bad = _bundle("v2", {"house.yaml": rule("Deployed", 35), "broken.yaml": BROKEN})
        reply = op.reply(op.publish(topic, bad))
        assert reply["status"] == "refused", reply
        assert reply["version"] == "v1"
        assert any(e.startswith("broken.yaml:5:") for e in reply["errors"]), reply
        reading("gh-2", 41)
        assert CloudCollector.wait_for(lambda: "gh-2" in _fired(gw, "Deployed"), 60)

        # The same signed bundle again: refused, whatever it holds.
        reply = op.reply(op.publish(topic, good))
        assert reply["status"] == "refused" and reply["reason"].startswith("replayed"), reply

        # The retained status names the running version.
        assert CloudCollector.wait_for(
            lambda: any(s.get("rules_version") == "v1" for s in collector.status), 60)

        # Rollback: back to the config's own files.
        rollback = orjson.dumps({"id": uuid.uuid4().hex, "ts": time.time()})
        reply = op.reply(op.publish(f"fieldgate/{GW}/rules/rollback", rollback))
        assert reply["status"] == "rolled_back", reply
        assert (reply["version"], reply["previous"]) == ("local", "v1")
        reading("gh-3", 33)   # (gh-1 and gh-2 read above 30 in the last minute: they fire too)
        assert CloudCollector.wait_for(lambda: "gh-3" in _fired(gw, "LocalHot"), 60)
    finally:
        readings.close()
        collector.close()
        op.close()
    assert gw.stop() == 0
    kinds = [e["type"] for e in _events(gw) if e["type"].startswith("io.fieldgate.rules.")]
    assert kinds == ["io.fieldgate.rules.received", "io.fieldgate.rules.applied",
                     "io.fieldgate.rules.received", "io.fieldgate.rules.refused",
                     "io.fieldgate.rules.refused",   # the replay: never received
                     "io.fieldgate.rules.received", "io.fieldgate.rules.rolled_back"]


def test_an_unsigned_or_forged_bundle_changes_nothing(gw, site, cloud, tmp_path):
    op = Operator(cloud.port, gw.signer)
    other = Signer.generate(tmp_path / "other.key")
    topic = f"fieldgate/{GW}/rules/set"
    try:
        unsigned = op.publish(topic, _bundle("evil", {"house.yaml": rule("X", 0)}), sign=False)
        payload = _bundle("evil", {"house.yaml": rule("X", 0)})
        forged = op.publish(topic, payload, signature=other.sign(topic, payload))
        assert op.reply(unsigned)["reason"].startswith("unsigned")
        assert op.reply(forged)["reason"].startswith("bad signature")
    finally:
        op.close()
    # Someone on the site broker, even with a valid cloud signature, is not heard at all.
    site_op = Operator(site.port, gw.signer)
    try:
        site_op.publish(topic, _bundle("evil", {"house.yaml": rule("X", 0)}))
        site_op.publish(f"fieldgate/{GW}/rules/rollback",
                        orjson.dumps({"id": uuid.uuid4().hex, "ts": time.time()}))
    finally:
        site_op.close()
    cloud_op = Operator(cloud.port, gw.signer)
    try:
        _barrier(cloud_op)
    finally:
        cloud_op.close()
    assert gw.stop() == 0
    kinds = [e["type"] for e in _events(gw) if e["type"].startswith("io.fieldgate.rules.")]
    assert kinds == ["io.fieldgate.rules.refused", "io.fieldgate.rules.refused"]
    assert not (tmp_path / "rules").exists() or not any((tmp_path / "rules").rglob("*.yaml"))


def test_the_operators_cli_deploys_and_rolls_back_through_a_real_gateway(gw, cloud, tmp_path):
    conf = tmp_path / "cloud.yaml"
    conf.write_text(yaml.safe_dump({"broker": {"url": cloud.url},
                                    "signing_key_file": str(tmp_path / "cloud.key")}))
    rules = tmp_path / "ops"
    rules.mkdir()
    (rules / "house.yaml").write_text(rule("Deployed", 35))
    out = gateway_cli("cloud", "deploy-rules", "-c", str(conf), "--gateway", GW,
                      "--version", "ops-1", str(rules / "house.yaml"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("applied"), out.stdout
    history = gateway_cli("rules", "history", "-c", str(gw.config))
    assert "ops-1" in history.stdout, history
    out = gateway_cli("cloud", "rollback-rules", "-c", str(conf), "--gateway", GW)
    assert out.returncode == 0, out.stderr
    out = gateway_cli("cloud", "rollback-rules", "-c", str(conf), "--gateway", GW)
    assert out.returncode == 1, out    # nothing before "local"
    assert "nothing to roll back to" in out.stdout + out.stderr
    assert gw.stop() == 0
