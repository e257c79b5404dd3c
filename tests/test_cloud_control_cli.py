"""`gateway cloud keygen|pubkey|send|deploy-rules|rollback-rules` as an operator runs them,
against a real Mosquitto. A responder on the cloud broker stands in for the gateway: it
checks each request's signature with the gateway's Verifier and answers on the request's
Response Topic as the test tells it (the end-to-end tests with the real gateway are in
test_downlink*). The CLI runs as its own process, as an operator runs it."""

from __future__ import annotations

import json
import os
import re
import secrets
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mqtt5 import QoS, TopicFilter

from fieldmqtt import Message, MqttSession, Published, SessionConfig, Subscribed
from gateway.downlink.signing import SIGNATURE_PROPERTY, Verifier
from gateway.mosquitto import Mosquitto, free_port
from tests.mqtt_helpers import SLACK
from tests.test_rules_cli import RULE
from tests.tools import ROOT, gateway

GW = "gh-1"
PASSWORD = b"pw-for-tests"

# What the responder sends back for one request: (payload, correlation data) pairs.
Answer = Callable[[Message], list[tuple[bytes, bytes | None]]]


class Responder:
    """A client on the cloud broker that takes requests and answers them as told."""

    def __init__(self, port: int, filters: list[str], *, user: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.session = MqttSession(SessionConfig(
            host="127.0.0.1", port=port, client_id=f"responder-{secrets.token_hex(4)}",
            username=user, password=PASSWORD if user else None, tls=tls))
        self.session.connect()
        self.session.run_until(lambda: self.session.connected, 10 * SLACK)
        pid = self.session.subscribe([TopicFilter(f, max_qos=QoS.AT_LEAST_ONCE)
                                      for f in filters])
        self.requests: list[Message] = []
        self._wait(lambda e: isinstance(e, Subscribed) and e.packet_id == pid)

    def _wait(self, done: Callable[[Any], bool]) -> None:
        deadline = time.monotonic() + 10 * SLACK
        while time.monotonic() < deadline:
            for event in self.session.run_once(0.2):
                if isinstance(event, Message):
                    self.session.ack(event)
                    self.requests.append(event)
                if done(event):
                    return
        raise TimeoutError("the responder did not get what it waited for")

    def serve(self, args: list[str], answer: Answer) -> subprocess.CompletedProcess[str]:
        """Run `gateway ARGS`, answering each request it sends, until it exits."""
        proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60 * SLACK
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"`gateway {' '.join(args)}` did not exit")
                for event in self.session.run_once(0.1):
                    if not isinstance(event, Message):
                        continue
                    self.session.ack(event)
                    self.requests.append(event)
                    for payload, correlation in answer(event):
                        assert event.response_topic is not None
                        self.session.publish(event.response_topic, payload, qos=1,
                                             correlation_data=correlation)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def marker_first(self, port: int, topic: str, *, user: str | None = None) -> bool:
        """Publish a marker on ``topic`` from another client (as ``user``) and wait for it:
        True when it is the first message the responder received (nothing came before)."""
        before = len(self.requests)
        other = MqttSession(SessionConfig(host="127.0.0.1", port=port, client_id="marker",
                                          username=user, password=PASSWORD if user else None))
        other.connect()
        other.run_until(lambda: other.connected, 10 * SLACK)
        pid = other.publish(topic, b"marker", qos=1)
        deadline = time.monotonic() + 10 * SLACK
        while not any(isinstance(e, Published) and e.packet_id == pid
                      for e in other.run_once(0.2)):
            assert time.monotonic() < deadline, "no PUBACK for the marker"
        other.disconnect()
        self._wait(lambda e: isinstance(e, Message) and e.payload == b"marker")
        return before == 0 and len(self.requests) == 1

    def close(self) -> None:
        self.session.disconnect()


def reply(message: Message, **body: Any) -> list[tuple[bytes, bytes | None]]:
    """The gateway's reply to ``message`` (its id) with ``body``, correlated."""
    request = json.loads(message.payload)
    return [(json.dumps({"id": request["id"], **body}).encode(), message.correlation_data)]


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    """A signing key made by `gateway cloud keygen`, and the public key it printed."""
    path = tmp_path / "keys" / "cloud-signing.key"
    path.parent.mkdir()
    out = gateway("cloud", "keygen", "--out", str(path))
    assert out.returncode == 0, out.stderr
    return path, out.stdout.strip()


@pytest.fixture
def config(tmp_path: Path, cloud: Mosquitto, key: tuple[Path, str]) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": cloud.url},
                                    "signing_key_file": str(key[0])}))
    return path


@pytest.fixture
def responder(cloud: Mosquitto) -> Iterator[Responder]:
    r = Responder(cloud.port, [f"fieldgate/{GW}/cmd/+", f"fieldgate/{GW}/rules/+"])
    yield r
    r.close()


def verified(message: Message, public_key: str) -> dict[str, Any]:
    """The request's body, after the gateway's own signature check passed."""
    signature = dict(message.user_properties).get(SIGNATURE_PROPERTY)
    assert Verifier([public_key]).problem(message.topic, message.payload, signature) is None
    body: dict[str, Any] = json.loads(message.payload)
    return body


# -- keys ------------------------------------------------------------------------------------

def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
        tmp_path: Path, key: tuple[Path, str]) -> None:
    path, public = key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public not in path.read_text()  # stdout is the public key, not the private one
    Verifier([public])  # a key downlink.public_keys takes
    assert gateway("cloud", "pubkey", "--key-file", str(path)).stdout.strip() == public

    before = path.read_bytes()
    out = gateway("cloud", "keygen", "--out", str(path))
    assert out.returncode == 2
    assert "exists" in out.stderr and "never overwritten" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert path.read_bytes() == before


def test_a_signing_key_every_user_can_read_is_refused(
        config: Path, key: tuple[Path, str]) -> None:
    key[0].chmod(0o644)
    out = gateway("cloud", "send", "-c", str(config), "--gateway", GW, "--device", "fan-1",
                  '{"cmd": "set"}')
    assert out.returncode == 2
    assert "chmod 600" in out.stderr and len(out.stderr.splitlines()) == 1
    assert "PRIVATE KEY" not in out.stderr + out.stdout


# -- send ------------------------------------------------------------------------------------

def test_send_signs_the_request_and_prints_the_reply_with_its_correlation_data(
        config: Path, key: tuple[Path, str], responder: Responder) -> None:
    def answer(message: Message) -> list[tuple[bytes, bytes | None]]:
        # First a reply for someone else on the same topic: it must be ignored.
        decoy = (json.dumps({"id": "x", "status": "refused", "reason": "decoy"}).encode(),
                 b"someone else")
        return [decoy, *reply(message, status="ok", device="fan-1", command="gh-1-7")]

    out = responder.serve(["cloud", "send", "-c", str(config), "--gateway", GW, "--device",
                           "fan-1", "--ttl", "45s", '{"cmd": "set", "on": true}'], answer)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == "ok (device fan-1, command gh-1-7)\n"

    [request] = responder.requests
    assert request.topic == f"fieldgate/{GW}/cmd/fan-1"
    assert request.qos == 1
    body = verified(request, key[1])
    assert body["action"] == "set" and body["params"] == {"on": True} and body["ttl"] == 45
    assert abs(body["ts"] - time.time()) < 300  # within the gateway's default skew
    assert request.response_topic is not None
    assert request.response_topic.startswith(f"fieldgate/{GW}/cmd/fan-1/reply/")
    assert request.correlation_data is not None and len(request.correlation_data) >= 16


def test_request_ids_are_unique_and_in_the_allowed_characters(
        config: Path, responder: Responder) -> None:
    args = ["cloud", "send", "-c", str(config), "--gateway", GW, "--device", "fan-1",
            "--json", '{"action": "set", "params": {"on": false}}']
    for _ in range(2):
        out = responder.serve(args, lambda m: reply(m, status="ok"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "ok"  # --json: the reply as it came
    ids = [json.loads(m.payload)["id"] for m in responder.requests]
    assert ids[0] != ids[1]
    for rid in ids:
        assert 1 <= len(rid) <= 128
        assert set(rid) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                               "0123456789._:-")
    assert [json.loads(m.payload)["params"] for m in responder.requests] == [{"on": False}] * 2


@pytest.mark.parametrize("status", ["refused", "rejected", "expired"])
def test_a_reply_other_than_ok_exits_1_with_its_reason(
        config: Path, responder: Responder, status: str) -> None:
    out = responder.serve(
        ["cloud", "send", "-c", str(config), "--gateway", GW, "--device", "fan-1",
         '{"cmd": "open"}'],
        lambda m: reply(m, status=status, reason="not allowed: 'open' for 'fan-1'"))
    assert out.returncode == 1
    assert out.stdout == f"{status}: not allowed: 'open' for 'fan-1'\n"


def test_no_reply_within_the_timeout_exits_3(config: Path, responder: Responder) -> None:
    out = responder.serve(["cloud", "send", "-c", str(config), "--gateway", GW, "--device",
                           "fan-1", "--timeout", "1s", '{"cmd": "set"}'], lambda m: [])
    assert out.returncode == 3
    assert out.stderr.startswith("error: no reply within 1 s")
    assert len(responder.requests) == 1  # it went; the gateway said nothing


def test_no_gateway_on_the_topic_exits_4_at_once(config: Path, cloud: Mosquitto) -> None:
    out = gateway("cloud", "send", "-c", str(config), "--gateway", GW, "--device", "fan-1",
                  "--timeout", "10m", '{"cmd": "set"}')
    assert out.returncode == 4
    assert "no client subscribes to 'fieldgate/gh-1/cmd/fan-1'" in out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_a_broker_that_is_not_there_is_one_line_and_exit_4(tmp_path: Path,
                                                           key: tuple[Path, str]) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": f"mqtt://127.0.0.1:{free_port()}"},
                                    "signing_key_file": str(key[0])}))
    out = gateway("cloud", "send", "-c", str(path), "--gateway", GW, "--device", "fan-1",
                  '{"cmd": "set"}')
    assert out.returncode == 4
    assert out.stderr.startswith("error: cannot reach the broker 127.0.0.1:")
    assert len(out.stderr.splitlines()) == 1


def test_credentials_the_broker_refuses_are_one_line_and_exit_4(
        tmp_path: Path, key: tuple[Path, str]) -> None:
    broker = Mosquitto(tmp_path, "auth", users={"ops": "right"}).start()
    try:
        secret = tmp_path / "ops.pw"
        secret.write_text("wrong\n")
        secret.chmod(0o600)
        path = tmp_path / "cloud.yaml"
        path.write_text(yaml.safe_dump({
            "broker": {"url": broker.url, "username": "ops", "password_file": str(secret)},
            "signing_key_file": str(key[0])}))
        out = gateway("cloud", "send", "-c", str(path), "--gateway", GW, "--device",
                      "fan-1", '{"cmd": "set"}')
    finally:
        broker.stop()
    assert out.returncode == 4
    assert "refused the connection" in out.stderr and "broker.username" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert "wrong" not in out.stderr


def test_send_over_tls_with_the_configured_ca(tmp_path: Path, key: tuple[Path, str],
                                              pki: tuple[Path, Path, Path]) -> None:
    broker = Mosquitto(tmp_path, "tls", tls=pki).start()
    gw = Responder(broker.port, [f"fieldgate/{GW}/cmd/+"],
                   tls=ssl.create_default_context(cafile=str(pki[0])))
    try:
        path = tmp_path / "cloud.yaml"
        path.write_text(yaml.safe_dump({"broker": {"url": broker.url, "ca_file": str(pki[0])},
                                        "signing_key_file": str(key[0])}))
        out = gw.serve(["cloud", "send", "-c", str(path), "--gateway", GW, "--device",
                        "fan-1", '{"cmd": "set"}'], lambda m: reply(m, status="ok"))
        assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr
        # Without the CA the broker's certificate is not trusted: not sent, one line.
        path.write_text(yaml.safe_dump({"broker": {"url": broker.url},
                                        "signing_key_file": str(key[0])}))
        out = gateway("cloud", "send", "-c", str(path), "--gateway", GW, "--device",
                      "fan-1", '{"cmd": "set"}')
        assert out.returncode == 4 and len(out.stderr.splitlines()) == 1, out.stderr
        assert "certificate" in out.stderr
    finally:
        gw.close()
        broker.stop()


@pytest.mark.parametrize(("command", "says"), [
    ("{cmd: set}", "not JSON"),
    ('["set"]', "expected a JSON object"),
    ('{"on": true}', 'no "cmd"'),
    ('{"cmd": ""}', "non-empty string"),
    ('{"cmd": "set", "action": "set"}', "not both"),
    ('{"action": "set", "params": [1]}', '"params" must be a JSON object'),
    ('{"action": "set", "on": true}', "only \"params\" may follow"),
])
def test_bad_command_json_is_a_one_line_usage_error(config: Path, command: str,
                                                    says: str) -> None:
    out = gateway("cloud", "send", "-c", str(config), "--gateway", GW, "--device", "fan-1",
                  command)
    assert out.returncode == 2
    assert out.stderr.startswith("error: COMMAND_JSON: ") and says in out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_no_signing_key_is_a_usage_error(tmp_path: Path, cloud: Mosquitto) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": cloud.url}}))
    out = gateway("cloud", "send", "-c", str(path), "--gateway", GW, "--device", "fan-1",
                  '{"cmd": "set"}')
    assert out.returncode == 2
    assert "give --key-file or set signing_key_file" in out.stderr


def test_key_file_overrides_the_config(tmp_path: Path, config: Path,
                                       responder: Responder) -> None:
    other = tmp_path / "other.key"
    public = gateway("cloud", "keygen", "--out", str(other)).stdout.strip()
    out = responder.serve(["cloud", "send", "-c", str(config), "--key-file", str(other),
                           "--gateway", GW, "--device", "fan-1", '{"cmd": "set"}'],
                          lambda m: reply(m, status="ok"))
    assert out.returncode == 0, out.stderr
    verified(responder.requests[0], public)


# -- rules -----------------------------------------------------------------------------------

def test_deploy_rules_sends_the_checked_files_as_one_signed_bundle(
        tmp_path: Path, config: Path, key: tuple[Path, str], responder: Responder) -> None:
    (tmp_path / "north.yaml").write_text(RULE)
    (tmp_path / "south.yaml").write_text(RULE.replace("house", "barn"))
    (tmp_path / "north.test.yaml").write_text("tests: []\n")
    out = responder.serve(
        ["cloud", "deploy-rules", "-c", str(config), "--gateway", GW,
         str(tmp_path / "north.yaml"), str(tmp_path / "south.yaml"),
         str(tmp_path / "north.test.yaml")],
        lambda m: reply(m, status="applied", version=json.loads(m.payload)["version"],
                        previous="local"))
    assert out.returncode == 0, out.stderr
    [request] = responder.requests
    assert request.topic == f"fieldgate/{GW}/rules/set"
    assert request.response_topic is not None
    assert request.response_topic.startswith(f"fieldgate/{GW}/rules/reply/")
    body = verified(request, key[1])
    assert body["files"] == {"north.yaml": RULE, "south.yaml": RULE.replace("house", "barn")}
    version = body["version"]
    assert time.strptime(version, "%Y-%m-%dT%H.%M.%SZ")  # the default: a UTC time stamp
    assert out.stdout == f"applied (version {version}, previous local)\n"


def test_a_bundle_the_gateway_refuses_prints_its_errors_and_exits_1(
        tmp_path: Path, config: Path, responder: Responder) -> None:
    (tmp_path / "north.yaml").write_text(RULE)
    errors = ["north.yaml:5: unknown device 'x'", "north.yaml:9: something else"]
    out = responder.serve(
        ["cloud", "deploy-rules", "-c", str(config), "--gateway", GW, "--version", "v2",
         str(tmp_path / "north.yaml")],
        lambda m: reply(m, status="refused", reason="rule errors", errors=errors,
                        version="v1"))
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["refused: rule errors (version v1)", *errors]
    assert json.loads(responder.requests[0].payload)["version"] == "v2"


def test_a_bad_rule_file_is_refused_here_with_file_line_and_nothing_is_sent(
        tmp_path: Path, config: Path, cloud: Mosquitto, responder: Responder) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RULE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULE.replace("avg(temp, 10s) > 30", "avg(temp, 10s) >> 30"))
    out = gateway("cloud", "deploy-rules", "-c", str(config), "--gateway", GW, str(good),
                  str(bad))
    assert out.returncode == 2
    assert out.stderr.splitlines()[0].startswith(f"{bad}:5:")
    assert out.stderr.splitlines()[-1] == "error: nothing was sent: fix the rule files first"
    assert responder.marker_first(cloud.port, f"fieldgate/{GW}/rules/set")


def test_a_file_name_a_gateway_would_refuse_is_refused_here(
        tmp_path: Path, config: Path) -> None:
    odd = tmp_path / "north rules.yaml"
    odd.write_text(RULE)
    out = gateway("cloud", "deploy-rules", "-c", str(config), "--gateway", GW, str(odd))
    assert out.returncode == 2
    assert "plain file names" in out.stderr and len(out.stderr.splitlines()) == 1


def test_rollback_rules(config: Path, key: tuple[Path, str], responder: Responder) -> None:
    out = responder.serve(["cloud", "rollback-rules", "-c", str(config), "--gateway", GW],
                          lambda m: reply(m, status="rolled_back", version="v1",
                                          previous="v2"))
    assert (out.returncode, out.stdout) == (0, "rolled_back (version v1, previous v2)\n")
    [request] = responder.requests
    assert request.topic == f"fieldgate/{GW}/rules/rollback"
    assert set(verified(request, key[1])) == {"id", "ts"}


@pytest.mark.parametrize(("args", "says"), [
    (["--gateway", "gh/1"], "--gateway 'gh/1' is not a gateway id"),
    (["--gateway", GW, "--version", "1:2"], "--version '1:2'"),
    (["--gateway", GW, "--timeout", "soon"], "--timeout"),
    (["--gateway", GW, "--version", "local"], "names the gateway's own rules"),
])
def test_deploy_rules_usage_errors(tmp_path: Path, config: Path, args: list[str],
                                   says: str) -> None:
    (tmp_path / "north.yaml").write_text(RULE)
    out = gateway("cloud", "deploy-rules", "-c", str(config), *args,
                  str(tmp_path / "north.yaml"))
    assert out.returncode == 2
    assert says in out.stderr and len(out.stderr.splitlines()) == 1


def test_the_sample_names_the_signing_key(tmp_path: Path) -> None:
    sample = gateway("config", "sample", "--cloud").stdout
    assert "\nsigning_key_file: null\n" in sample
    assert os.path.exists(ROOT / "deploy" / "cloud.example.yaml")


# -- the cloud broker's ACL, as deploy/README.md gives it --------------------------------------

def readme_acl() -> str:
    """The acl_file block of deploy/README.md (Cloud control), as an operator copies it."""
    text = (ROOT / "deploy" / "README.md").read_text()
    [block] = re.findall(r"```\n(# acl_file of the cloud broker.*?)```", text, re.S)
    return block


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    acl = tmp_path / "cloud.acl"
    bob = readme_acl().split("user ops-alice", 1)[1].replace("ops-alice", "ops-bob")
    acl.write_text(readme_acl() + "\nuser ops-bob" + bob)
    users = {u: PASSWORD.decode() for u in (GW, "ops-alice", "ops-bob", "viewer")}
    broker = Mosquitto(tmp_path, "acl", users=users, extra=f"acl_file {acl}\n").start()
    yield broker
    broker.stop()


def operator_config(tmp_path: Path, broker: Mosquitto, key: Path, user: str) -> Path:
    secret = tmp_path / f"{user}.pw"
    secret.write_text(PASSWORD.decode() + "\n")
    secret.chmod(0o600)
    path = tmp_path / f"{user}.yaml"
    path.write_text(yaml.safe_dump({
        "broker": {"url": broker.url, "username": user, "password_file": str(secret)},
        "signing_key_file": str(key)}))
    return path


def test_the_readme_acl_lets_an_operator_command_and_read_only_its_own_replies(
        tmp_path: Path, acl_broker: Mosquitto, key: tuple[Path, str]) -> None:
    gw = Responder(acl_broker.port, [f"fieldgate/{GW}/cmd/+"], user=GW)
    eavesdropper = Responder(acl_broker.port, ["fieldgate/#"], user="ops-bob")
    try:
        alice = operator_config(tmp_path, acl_broker, key[0], "ops-alice")
        out = gw.serve(["cloud", "send", "-c", str(alice), "--gateway", GW, "--device",
                        "fan-1", '{"cmd": "set"}'], lambda m: reply(m, status="ok"))
        assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr
        assert gw.requests[0].response_topic is not None
        assert "/reply/ops-alice/" in gw.requests[0].response_topic
        # Bob, another operator subscribed to everything, got neither the request nor
        # alice's reply: the first thing he gets is a reply meant for him.
        assert eavesdropper.marker_first(
            acl_broker.port, f"fieldgate/{GW}/cmd/fan-1/reply/ops-bob/x", user=GW)
    finally:
        eavesdropper.close()
        gw.close()


def test_a_publish_the_acl_refuses_is_one_line_and_exit_4(
        tmp_path: Path, acl_broker: Mosquitto, key: tuple[Path, str]) -> None:
    gw = Responder(acl_broker.port, [f"fieldgate/{GW}/cmd/+"], user=GW)
    try:
        viewer = operator_config(tmp_path, acl_broker, key[0], "viewer")
        out = gw.serve(["cloud", "send", "-c", str(viewer), "--gateway", GW, "--device",
                        "fan-1", '{"cmd": "set"}'], lambda m: reply(m, status="ok"))
    finally:
        gw.close()
    assert out.returncode == 4
    assert out.stderr == ("error: the broker refused the request on 'fieldgate/gh-1/cmd/fan-1': "
                          "Not authorized (0x87); its ACL must let 'viewer' write it "
                          "(deploy/README.md, Cloud control)\n")
    assert gw.requests == []
