"""Commands from the gateway to devices: signed over the bytes sent, verified, answered,
and answers judged: only signed answers to commands still waiting count."""

from __future__ import annotations

import binascii
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from devices import commands as device_side
from devices.fleet import parse_fleet
from devices.generator import FleetModel
from devices.simulator import Simulator
from gateway import commands as gateway_side
from gateway.commands import CommandSender, device_key, seal, signature
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.mqtt.link import poll_links
from tests.mqtt_helpers import Publisher
from tests.tools import open_log

ROOT = Path(__file__).resolve().parents[1]
MASTER = "site-master-key-for-tests"


def _vectors() -> dict[str, str]:
    """The test-vector table of devices/README.md, as {row name: value}."""
    text = (ROOT / "devices/README.md").read_text()
    rows = re.findall(r"^\| ([^|]+?) \| `([^`]+)`", text, re.MULTILINE)
    return dict(rows)


def test_readme_vectors_match_both_implementations():
    v = _vectors()
    master = v["master key"].encode()
    body = v["command body"].encode()
    answer = v["answer body"].encode()
    for side in (gateway_side, device_side):
        key1 = side.device_key(master, "gh-1")
        assert key1.decode() == v["key of `gh-1`"]
        key2 = side.device_key(master, "gh-2")
        assert key2.decode() == v["key of `gh-2`"]
        assert side.signature(key1, "devices/gh-1/cmd", body) == \
            v["sig on `devices/gh-1/cmd`"]
        assert side.signature(key2, "devices/gh-2/cmd", body) == \
            v["sig of the same body on `devices/gh-2/cmd` (gh-2's key)"]
        assert side.signature(key1, "devices/gh-1/cmd/ack", answer) == \
            v["sig on `devices/gh-1/cmd/ack`"]
        sealed = side.seal(key1, "devices/gh-1/cmd", body)
        assert sealed[8:72].decode() == v["sig on `devices/gh-1/cmd`"]
        assert sealed[80:-1] == body
        assert orjson.loads(sealed)["cmd"] == orjson.loads(body)  # still JSON
        assert side.unseal("devices/gh-1/cmd", sealed) == (sealed[8:72].decode(), body)


def _readme_verifier() -> dict[str, Any]:
    """The MicroPython verifier from devices/README.md, run as written (on CPython)."""
    text = (ROOT / "devices/README.md").read_text()
    code = text.split("A verifier for MicroPython", 1)[1].split("```python\n", 1)[1]
    code = code.split("```", 1)[0]
    namespace: dict[str, Any] = {}
    sys.modules.setdefault("ubinascii", binascii)
    exec(compile(code, "devices/README.md", "exec"), namespace)  # our own doc, run as written
    return namespace


def test_the_readme_micropython_verifier_agrees_with_the_gateway():
    v = _vectors()
    fw = _readme_verifier()
    key = v["key of `gh-1`"].encode()
    body = v["command body"].encode()
    payload = seal(key, "devices/gh-1/cmd", body)
    assert fw["open_signed"](key, "devices/gh-1/cmd", payload) == body
    # The same bytes are refused on another device's topic, with another key, tampered.
    assert fw["open_signed"](key, "devices/gh-2/cmd", payload) is None
    assert fw["open_signed"](v["key of `gh-2`"].encode(), "devices/gh-1/cmd", payload) is None
    assert fw["open_signed"](key, "devices/gh-1/cmd", payload.replace(b'"on"', b'"of"')) is None
    assert fw["open_signed"](key, "devices/gh-1/cmd", body) is None  # unsigned
    # An answer the firmware seals is one the gateway's verification accepts.
    answer = v["answer body"].encode()
    sealed = fw["seal"](key, "devices/gh-1/cmd/ack", answer)
    assert gateway_side.unseal("devices/gh-1/cmd/ack", sealed) == (
        v["sig on `devices/gh-1/cmd/ack`"], answer)


def _config(tmp_path: Path, site_url: str = "mqtt://127.0.0.1:1", *, key: bool = True,
            **commands: Any) -> GatewayConfig:
    key_file = tmp_path / "master.key"
    key_file.write_text(MASTER + "\n")
    key_file.chmod(0o600)
    if key:
        commands["key_file"] = str(key_file)
    return GatewayConfig.model_validate({
        "gateway_id": "gw-cmd", "site": {"url": site_url},
        "log": {"path": str(tmp_path / "log.db")}, "metrics": {"listen": None},
        "commands": commands})


def _events(gw: Gateway) -> list[dict[str, Any]]:
    return [orjson.loads(body) for (body,) in gw.store._conn.execute(
        "SELECT body FROM records WHERE kind = 1 ORDER BY seq")]


def _answers(gw: Gateway) -> list[tuple[str, dict[str, Any]]]:
    return [(e["type"].removeprefix("io.fieldgate.command."), e["data"]) for e in _events(gw)
            if e["type"] != "io.fieldgate.command.issued"]


def _restarted(gw: Gateway) -> Gateway:
    """The same gateway after a restart: its log closed, and the command side built again
    from what the log holds (the link is only published on)."""
    gw.store.close()
    gw.store = open_log(gw.cfg.log, gw.cfg.gateway_id)
    gw.commands = CommandSender(gw.cfg.gateway_id, gw.cfg.commands.key(), gw.ingest.link,
                                gw.store, ack_timeout=gw.cfg.commands.ack_timeout,
                                max_pending=gw.cfg.commands.max_pending)
    return gw


def _ack(device: str, cid: str, status: str = "ok", *, key: bytes | None = None) -> bytes:
    body = orjson.dumps({"id": cid, "ts": time.time(), "status": status})
    topic = f"devices/{device}/cmd/ack"
    key = device_key(MASTER.encode(), device) if key is None else key
    return seal(key, topic, body)


@pytest.mark.parametrize(("device_master", "expected"),
                         [(MASTER, "acknowledged"), ("another-key", "ack_rejected")])
def test_signed_command_reaches_the_device_and_its_answer_is_judged(
        site, tmp_path, device_master, expected):
    gw = Gateway(_config(tmp_path, site.url))
    fleet = parse_fleet({"types": {"gh": {
        "count": 1, "id": "gh-1", "interval": "200ms", "metrics": {"temp": {"baseline": 30}},
        "actuators": {"fan": {"states": ["off", "on"], "initial": "off"}}}}})
    sim = Simulator(FleetModel(fleet, start=time.time()), broker=site.url,
                    key=device_master.encode(), say=lambda _line: None)
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(30, stop.is_set), daemon=True)
    runner.start()
    links = [gw.ingest.link]

    def turn(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            poll_links(links, 0.02)
            gw.ingest.step(time.monotonic())

    # Ready when readings from the device are logged: both sides connected and subscribed.
    deadline = time.monotonic() + 60
    while gw.store.counters["readings"] == 0 and time.monotonic() < deadline:
        turn(0.1)
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"}, cause={"rule": "TooHot"})
    gw.ingest.link.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _answers(gw):
        turn(0.1)
    stop.set()
    runner.join(10)
    gw.ingest.finish()
    events = _events(gw)
    answers = _answers(gw)
    gw.store.close()
    issued = [e for e in events if e["type"] == "io.fieldgate.command.issued"]
    assert len(issued) == 1
    assert issued[0]["data"]["id"] == cid and issued[0]["data"]["signed"] is True
    assert issued[0]["data"]["cause"] == {"rule": "TooHot"}
    assert len(answers) == 1
    kind, data = answers[0]
    assert kind == expected
    assert data["id"] == cid
    if expected == "acknowledged":
        assert data["status"] == "ok" and data["signed"] is True
        assert sim.model.by_id["gh-1"].actuators["fan"] == "on"
    else:
        # The device with the wrong key refused the command, and its answer, signed with
        # that wrong key, is refused by the gateway.
        assert data["reason"] == "bad signature"
        assert sim.model.by_id["gh-1"].actuators["fan"] == "off"
        assert sim.stats.commands_refused == 1


def test_forged_acknowledgements_over_mqtt_are_rejected_with_a_reason(site, tmp_path):
    """The issue's reproduction: answers nobody was asked for are not believed."""
    gw = Gateway(_config(tmp_path, site.url))
    assert gw.commands is not None
    real = gw.commands.send("gh-9", "fan", {"state": "on"})
    forged = {
        "unsigned": orjson.dumps({"id": "never-issued", "status": "ok"}),
        "unknown": _ack("gh-9", "never-issued"),
        "badsig": _ack("gh-9", real, key=b"0" * 64),
        "other-device": _ack("gh-8", real),   # gh-8's valid signature, gh-9's command
        "malformed": b"{nope",
    }
    pub = Publisher(site.port)
    links = [gw.ingest.link]
    deadline = time.monotonic() + 60
    while not gw.ingest.ready and time.monotonic() < deadline:  # SUBACK, not just CONNACK
        poll_links(links, 0.05)
        gw.ingest.step(time.monotonic())
    for name, payload in forged.items():
        device = "gh-8" if name == "other-device" else "gh-9"
        pub.publish(f"devices/{device}/cmd/ack", payload)
    pub.wait()
    deadline = time.monotonic() + 60
    while len(_answers(gw)) < len(forged) and time.monotonic() < deadline:
        poll_links(links, 0.05)
        gw.ingest.step(time.monotonic())
    answers = _answers(gw)
    assert gw.commands.pending.keys() == {real}  # still waiting: nothing was believed
    gw.ingest.finish()
    gw.store.close()
    pub.c.disconnect()
    pub.c.loop_stop()
    assert [kind for kind, _ in answers] == ["ack_rejected"] * len(forged)
    reasons = [data["reason"].split(":")[0] for _, data in answers]
    assert reasons == ["unsigned", "unknown id", "bad signature", "unknown id", "malformed"]


def test_waiting_commands_survive_a_restart_and_then_time_out(tmp_path):
    cfg = _config(tmp_path, ack_timeout="30s")
    gw = Gateway(cfg)
    assert gw.commands is not None
    t0 = time.time()
    first = gw.commands.send("gh-1", "fan", {"state": "on"}, now=t0)
    second = gw.commands.send("gh-2", "fan", {"state": "on"}, now=t0)
    gw = _restarted(gw)
    assert gw.commands is not None
    assert set(gw.commands.pending) == {first, second}
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", _ack("gh-1", first), t0 + 1, dup=False)
    # Timeouts run on time.monotonic(), so that a clock step does not fire them; after a
    # restart the time left is what the wall clock says (here: nearly all of the 30 s).
    gw.commands.step(time.monotonic() + 20)
    assert set(gw.commands.pending) == {second}
    gw.commands.step(time.monotonic() + 30)
    assert gw.commands.pending == {}
    # Too late: the answer to a command that timed out is not believed either.
    gw.commands.acknowledgement("devices/gh-2/cmd/ack", _ack("gh-2", second), t0 + 32, dup=False)
    answers = _answers(gw)
    gw.store.close()
    assert [(kind, data["id"]) for kind, data in answers] == [
        ("acknowledged", first), ("timed_out", second), ("ack_rejected", second)]
    assert answers[1][1]["reason"] == "no answer within 30 s (commands.ack_timeout)"
    assert answers[2][1]["reason"].startswith("unknown id")


def test_waiting_commands_are_bounded(tmp_path):
    gw = Gateway(_config(tmp_path, max_pending=2))
    assert gw.commands is not None
    ids = [gw.commands.send(f"gh-{n}", "fan", {"state": "on"}) for n in range(3)]
    assert set(gw.commands.pending) == set(ids[1:])
    answers = _answers(gw)
    gw.store.close()
    assert [(kind, data["id"]) for kind, data in answers] == [("timed_out", ids[0])]
    assert "commands.max_pending" in answers[0][1]["reason"]


def test_a_redelivered_answer_is_logged_once_and_a_second_answer_is_rejected(tmp_path):
    gw = Gateway(_config(tmp_path))
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"})
    ok = _ack("gh-1", cid)
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", ok, 1.0, dup=False)
    gw = _restarted(gw)  # even after a restart
    assert gw.commands is not None
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", ok, 2.0, dup=True)  # redelivery
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", _ack("gh-1", cid, "rejected"), 3.0,
                                dup=False)
    answers = _answers(gw)
    gw.store.close()
    assert [kind for kind, _ in answers] == ["acknowledged", "ack_rejected"]
    assert answers[1][1]["reason"].startswith("duplicate")


def _wait_for_answers(gw: Gateway, count: int) -> list[tuple[str, dict[str, Any]]]:
    links = [gw.ingest.link]
    deadline = time.monotonic() + 60
    while len(_answers(gw)) < count and time.monotonic() < deadline:
        poll_links(links, 0.05)
        gw.ingest.step(time.monotonic())
    return _answers(gw)


def test_a_replayed_answer_over_mqtt_is_rejected_as_duplicate(site, tmp_path):
    """A valid answer captured and published again as a new message (no DUP flag: not the
    broker's redelivery) is an ack_rejected event, not silence."""
    gw = Gateway(_config(tmp_path, site.url))
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"})
    ok = _ack("gh-1", cid)
    pub = Publisher(site.port)
    deadline = time.monotonic() + 60
    while not gw.ingest.ready and time.monotonic() < deadline:  # SUBACK, not just CONNACK
        poll_links([gw.ingest.link], 0.05)
        gw.ingest.step(time.monotonic())
    pub.publish("devices/gh-1/cmd/ack", ok)
    pub.wait()
    assert [kind for kind, _ in _wait_for_answers(gw, 1)] == ["acknowledged"]
    pub.publish("devices/gh-1/cmd/ack", ok)  # the replay
    pub.wait()
    answers = _wait_for_answers(gw, 2)
    gw.ingest.finish()
    gw.store.close()
    pub.close()
    assert [kind for kind, _ in answers] == ["acknowledged", "ack_rejected"]
    assert answers[1][1]["id"] == cid
    assert answers[1][1]["reason"].startswith("duplicate: ")


def test_only_a_redelivered_copy_of_a_taken_answer_is_skipped(tmp_path):
    gw = Gateway(_config(tmp_path))
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"})
    ok = _ack("gh-1", cid)
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", ok, 1.0, dup=False)
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", ok, 2.0, dup=True)  # skipped
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", ok, 3.0, dup=False)  # a replay
    answers = _answers(gw)
    gw.store.close()
    assert [kind for kind, _ in answers] == ["acknowledged", "ack_rejected"]
    assert answers[1][1]["reason"].startswith("duplicate: ")


@pytest.mark.parametrize("body", [
    b'{"id":"x","status":"ok","id":"CID"}',        # the last id would acknowledge
    b'{"id":"CID","status":"ok","id":"x"}',
    b'{"id":"CID","status":"rejected","status":"ok"}',
])
def test_an_answer_with_a_key_twice_is_malformed(tmp_path, body):
    gw = Gateway(_config(tmp_path))
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"})
    body = body.replace(b"CID", cid.encode())
    topic = "devices/gh-1/cmd/ack"
    gw.commands.acknowledgement(topic, seal(device_key(MASTER.encode(), "gh-1"), topic, body),
                                1.0, dup=False)
    answers = _answers(gw)
    gw.store.close()
    assert cid in gw.commands.pending  # nothing was believed
    assert [kind for kind, _ in answers] == ["ack_rejected"]
    assert answers[0][1]["reason"].startswith("malformed: ")
    assert "appears twice" in answers[0][1]["reason"]


def test_without_a_key_only_answers_to_waiting_commands_count(tmp_path):
    gw = Gateway(_config(tmp_path, key=False))
    assert gw.commands is not None
    cid = gw.commands.send("gh-1", "fan", {"state": "on"})
    plain = orjson.dumps({"id": cid, "status": "rejected", "reason": "busy"})
    gw.commands.acknowledgement("devices/gh-1/cmd/ack", plain, 1.0, dup=False)
    gw.commands.acknowledgement("devices/gh-1/cmd/ack",
                                orjson.dumps({"id": "x", "status": "ok"}), 1.0, dup=False)
    answers = _answers(gw)
    gw.store.close()
    assert answers == [
        ("rejected", {"id": cid, "status": "rejected", "action": "fan", "signed": False,
                      "reason": "busy"}),
        ("ack_rejected", {"id": "x", "reason": answers[1][1]["reason"]})]
    assert answers[1][1]["reason"].startswith("unknown id")


def test_a_command_payload_is_the_envelope_over_the_exact_body():
    key = device_key(MASTER.encode(), "gh-1")
    body = b'{"id":"a","ts":1.5,"action":"fan","params":{"state":"on","\xc3\xbc":[1,2]}}'
    payload = seal(key, "devices/gh-1/cmd", body)
    assert payload.startswith(b'{"sig":"') and payload[72:80] == b'","cmd":'
    assert payload[80:-1] == body
    assert payload[8:72].decode() == signature(key, "devices/gh-1/cmd", body)
    # Any change in the body, in the topic or in the key changes the signature.
    assert signature(key, "devices/gh-1/cmd", body.replace(b"1.5", b"1.50")) != \
        signature(key, "devices/gh-1/cmd", body)
    assert signature(key, "devices/gh-2/cmd", body) != signature(key, "devices/gh-1/cmd", body)
