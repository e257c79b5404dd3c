"""Hostile requests to the downlink (docs/downlink.md), found by probing a real gateway on
real Mosquitto: each one gets a reply that says why, the gateway keeps running, and the
device is touched only by what was allowed and recorded."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests import test_downlink
from tests.mqtt_helpers import SLACK, CloudCollector
from tests.test_downlink import DEVICE, GW, Operator, _events
from tests.test_downlink_rules import _bundle
from tests.test_rules_deploy import rule
from tests.tools import GatewayProcess
from tests.tools import gateway as gateway_cli

# The end-to-end rig of the downlink tests: a gateway, the emulator as gh-1, an operator.
rig = test_downlink.rig
signer = test_downlink.signer


def _reply(gw: GatewayProcess, op: Operator, corr: bytes,
           timeout: float = 60) -> dict[str, Any]:
    """The reply to ``corr``; AssertionError at once if the gateway died meanwhile."""
    deadline = time.monotonic() + timeout * SLACK
    while corr not in op.replies:
        assert gw.proc is not None and gw.proc.poll() is None, f"gateway died:\n{gw.log()}"
        assert time.monotonic() < deadline, f"no reply; replies so far: {op.replies}"
        time.sleep(0.02)
    return op.replies[corr]


def _signed(op: Operator, body: bytes, device: str = DEVICE) -> bytes:
    return op.publish(f"fieldgate/{GW}/cmd/{device}", body)


def test_params_nested_too_deep_are_refused_and_the_gateway_runs_on(rig):
    gw, device, op, _ = rig
    # Valid JSON the parser takes (it allows 1024 levels), deeper than the writer allows.
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    body = (b'{"id":"%s","ts":%f,"action":"fan","params":' % (uuid.uuid4().hex.encode(),
                                                               time.time())
            + deep + b"}")
    reply = _reply(gw, op, _signed(op, body))
    assert reply["status"] == "refused", reply
    assert reply["reason"].startswith('malformed: "params" is nested more than'), reply
    # Just at the bound, it is taken.
    inner: Any = 1
    for _ in range(32 - 1):   # downlink.service.MAX_PARAMS_DEPTH
        inner = {"x": inner}
    ok = {"state": "on", "x": inner}
    assert _reply(gw, op, op.command({"action": "fan", "params": ok}))["status"] == "ok"
    assert device.fan == "on"
    assert gw.stop() == 0
    issued = [e["data"]["params"] for e in _events(gw)
              if e["type"] == "io.fieldgate.command.issued"]
    assert issued == [ok]


def test_an_absurd_ts_is_refused_with_a_readable_reason(rig):
    gw, _, op, _ = rig
    reasons = []
    for ts in (1e300, -1e300, 10**40):
        body = b'{"id":"%s","ts":%s,"action":"fan"}' % (uuid.uuid4().hex.encode(),
                                                       repr(ts).encode())
        reply = _reply(gw, op, _signed(op, body))
        assert reply["status"] == "refused", reply
        reasons.append(reply["reason"])
    assert reasons[0].startswith("from the future: signed 1e+300 s ahead"), reasons
    assert reasons[1].startswith("stale: signed 1e+300 s ago"), reasons
    assert reasons[2].startswith("from the future: signed 1e+40 s ahead"), reasons
    assert all(len(r) < 200 for r in reasons), reasons


def _fill(path: Path) -> None:
    """Write ``path`` until its disk is full."""
    with contextlib.suppress(OSError), path.open("wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 65536)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB filesystem of its own (a tmpfs; needs root, else the test is skipped)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        why = mounted.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {why[0]}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_command_the_log_cannot_record_is_refused_and_never_sent(
        site, cloud, make_gateway, tmp_path, signer, small_disk):
    key = tmp_path / "master.key"
    key.write_text(test_downlink.MASTER + "\n")
    key.chmod(0o600)
    gw = make_gateway(site, cloud, log={"path": str(small_disk / "log.db")},
                      commands={"key_file": str(key)}, downlink={
                          "public_keys": [signer.public_key],
                          "allow": [{"devices": "gh-*", "commands": ["fan"]}]}).start()
    collector = CloudCollector(cloud.port, GW)
    device = test_downlink.Device(site)
    op = Operator(cloud.port, signer)
    try:
        assert collector.wait_for(
            lambda: any(r["device"] == DEVICE for r in collector.readings), 60)
        filler = small_disk / "filler"
        _fill(filler)
        reply = _reply(gw, op, op.command({"action": "fan", "params": {"state": "on"}}))
        assert reply["status"] == "refused", reply
        assert reply["reason"].startswith("not recorded: "), reply
        filler.unlink()   # space again: the log takes records, the site session resumes
        assert CloudCollector.wait_for(
            lambda: gw.metric("fieldgate_log_full") == 0.0, 60)
        reply = _reply(gw, op, op.command({"action": "fan", "params": {"state": "off"}}))
        assert reply["status"] == "ok", reply
    finally:
        op.close()
        device.close()
        collector.close()
    assert device.fan == "off"
    assert device.sim.stats.commands_ok == 1   # the refused command never reached it
    assert gw.stop() == 0


def test_correlation_data_is_bounded(rig):
    gw, device, op, _ = rig
    topic = f"fieldgate/{GW}/cmd/{DEVICE}"

    def command(correlation: bytes, state: str) -> bytes:
        payload = orjson.dumps({"id": uuid.uuid4().hex, "ts": time.time(), "action": "fan",
                                "params": {"state": state}})
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = op.reply_topic
        props.CorrelationData = correlation
        props.UserProperty = [("signature", op.signer.sign(topic, payload))]  # type: ignore[union-attr]
        op.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(30)
        return correlation

    # A waiting command keeps its Correlation Data in every state the log saves.
    reply = _reply(gw, op, command(b"\x01" * 2000, "on"))
    assert reply["status"] == "refused", reply
    assert reply["reason"] == "too large: Correlation Data of 2000 bytes, at most 1024"
    assert device.fan == "off"
    assert _reply(gw, op, command(b"\x02" * 1024, "on"))["status"] == "ok"
    assert device.fan == "on"


def test_a_bundle_the_log_cannot_record_is_refused_and_changes_nothing(
        site, cloud, make_gateway, tmp_path, signer, small_disk):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "house.yaml").write_text(rule("LocalHot", 30))
    rules_dir = tmp_path / "deployed"   # on another disk than the log
    gw = make_gateway(site, cloud, log={"path": str(small_disk / "log.db")},
                      rules=[str(tmp_path / "local" / "*.yaml")],
                      downlink={"public_keys": [signer.public_key], "rules": True,
                                "rules_dir": str(rules_dir)}).start()
    gw.wait_links("cloud")
    op = Operator(cloud.port, signer)
    try:
        filler = small_disk / "filler"
        _fill(filler)
        reply = _reply(gw, op, op.publish(f"fieldgate/{GW}/rules/set",
                                          _bundle("v1", {"house.yaml": rule("X", 1)})))
        assert reply["status"] == "refused", reply
        assert reply["reason"].startswith("not recorded: "), reply
        assert not rules_dir.exists() or not any(rules_dir.rglob("*.yaml"))
        filler.unlink()
        assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_log_full") == 0.0, 60)
        reply = _reply(gw, op, op.publish(f"fieldgate/{GW}/rules/set",
                                          _bundle("v2", {"house.yaml": rule("Y", 1)})))
        assert reply["status"] == "applied", reply
    finally:
        op.close()
    history = gateway_cli("rules", "history", "-c", str(gw.config))
    assert "v2" in history.stdout and "v1" not in history.stdout, history
    assert gw.stop() == 0
