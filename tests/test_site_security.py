"""The shipped site broker config, run by real Mosquitto: devices are users, each confined
to its own topics; provisioning goes through `gateway site add-device`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from gateway.commands import seal, unseal
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.log.reader import LogReader
from gateway.mosquitto import Mosquitto
from gateway.mqtt.link import poll_links
from gateway.site import hash_password

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "site", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _printed(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1)
                                              for line in out.splitlines())}


class Client:
    """A paho client that records what it receives and waits for protocol answers."""

    def __init__(self, port: int, user: str | None, password: str | None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: dict[int, list[int]] = {}
        self._cond = threading.Condition()
        self.connack: Any = None
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"t-{user}-{time.monotonic_ns()}", protocol=paho.MQTTv5)
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.got.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self._cond:
            self.granted[mid] = [int(c.value) for c in codes]
            self._cond.notify_all()

    def wait(self, ready: Any, what: str, timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise AssertionError(f"no {what} within {timeout} s")

    def subscribe(self, topic: str) -> int:
        """Subscribe and wait for the SUBACK; returns its reason code."""
        _, mid = self.c.subscribe(topic, qos=1)
        self.wait(lambda: mid in self.granted, f"SUBACK for {topic}")
        return self.granted[mid][0]

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the PUBACK: by then the broker has routed it."""
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.got]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def locked_site(tmp_path: Path) -> Iterator[tuple[Mosquitto, dict[str, dict[str, str]], Path]]:
    """deploy/mosquitto-site.conf and .acl as shipped (ports and paths substituted), with
    the gateway's user and two devices provisioned by the CLI."""
    passwords = tmp_path / "fieldgate.passwd"
    broker = Mosquitto(tmp_path, "site", config=(ROOT / "deploy/mosquitto-site.conf")
                       .read_text(), files={"password_file": passwords,
                                            "acl_file": ROOT / "deploy/mosquitto-site.acl"})
    (tmp_path / "master.key").write_text("the-site-master-key\n")
    (tmp_path / "master.key").chmod(0o600)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "gateway_id": "gw-site", "log": {"path": str(tmp_path / "log.db")},
        "metrics": {"listen": None},
        "site": {"url": broker.url, "username": "fieldgate",
                 "password_file": str(tmp_path / "site.pw")},
        "subscriptions": [{"topic": "sensors/{device}/{metric}", "format": "number"}],
        "commands": {"key_file": str(tmp_path / "master.key")}}))
    users: dict[str, dict[str, str]] = {}
    out = _cli("add-gateway", "--password-file", str(passwords))
    assert out.returncode == 0, out.stderr
    users["fieldgate"] = _printed(out.stdout)
    (tmp_path / "site.pw").write_text(users["fieldgate"]["password"] + "\n")
    (tmp_path / "site.pw").chmod(0o600)
    for device in ("gh-1", "gh-2"):
        out = _cli("add-device", device, "-c", str(config), "--password-file", str(passwords))
        assert out.returncode == 0, out.stderr
        users[device] = _printed(out.stdout)
    broker.start()
    yield broker, users, config
    broker.stop()


def test_the_shipped_site_config_confines_each_device_to_its_own_topics(locked_site):
    broker, users, config = locked_site
    # Nobody gets in without a user, nor with a wrong password.
    anonymous = Client(broker.port, None, None)
    assert anonymous.connack.is_failure
    anonymous.close()
    wrong = Client(broker.port, "gh-1", users["gh-2"]["password"])
    assert wrong.connack.is_failure
    wrong.close()

    gw = Gateway(GatewayConfig.model_validate(yaml.safe_load(config.read_text())))
    links = [gw.ingest.link]

    def turn_until(done: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, f"no {what} within 10 s"
            poll_links(links, 0.05)
            gw.ingest.step(time.monotonic())
            gw.ingest.link.flush()

    turn_until(lambda: gw.ingest.link.connected, "gateway connection")
    gh1 = Client(broker.port, "gh-1", users["gh-1"]["password"])
    gh2 = Client(broker.port, "gh-2", users["gh-2"]["password"])
    assert not gh1.connack.is_failure and not gh2.connack.is_failure
    # Each device subscribes to its own commands, and tries for more: Mosquitto grants the
    # subscriptions but delivers only what the ACL lets the device read (checked below).
    assert gh1.subscribe("devices/gh-1/cmd") == 1
    assert gh2.subscribe("devices/gh-2/cmd") == 1
    for topic in ("devices/gh-2/cmd", "devices/+/cmd", "sensors/#", "devices/gh-2/cmd/ack"):
        gh1.subscribe(topic)

    # gh-1 poses as gh-2 (a reading, a command, an answer), then publishes as itself.
    gh1.publish("sensors/gh-2/temp", b"45")
    gh1.publish("devices/gh-2/cmd", b'{"id":"forged","ts":0,"action":"fan","params":{}}')
    gh1.publish("devices/gh-2/cmd/ack", b'{"id":"forged","status":"ok"}')
    gh1.publish("sensors/gh-1/temp", b"21")
    turn_until(lambda: gw.store.counters["readings"] >= 1, "gh-1's reading")
    logged = LogReader(gw.store.path).read(1, max_readings=100, max_bytes=10**6)
    devices = [r["device"] for row in logged if row.kind == 0
               for r in orjson.loads(b"[" + row.body + b"]")]
    assert devices == ["gh-1"], "only gh-1's own reading reached the gateway"

    # The gateway's user writes commands; each device gets its own and nothing forged.
    assert gw.commands is not None
    to_gh2 = gw.commands.send("gh-2", "fan", {"state": "on"})
    to_gh1 = gw.commands.send("gh-1", "fan", {"state": "on"})
    gw.ingest.link.flush()
    gh1.wait(lambda: any(t == "devices/gh-1/cmd" for t in gh1.topics()), "gh-1's command")
    gh2.wait(lambda: bool(gh2.got), "gh-2's command")
    # (gh-1 gets its own twice: devices/gh-1/cmd and devices/+/cmd both match it.) The
    # gateway sent gh-2's command first, so had it leaked it would be here already.
    assert set(gh1.topics()) == {"devices/gh-1/cmd"}  # not gh-2's
    assert gh2.topics() == ["devices/gh-2/cmd"]  # not gh-1's forgery, published before
    assert orjson.loads(unseal("devices/gh-2/cmd", gh2.got[0][1])[1])["id"] == to_gh2
    # The command carries the key `gateway site add-device` printed for that device, and
    # the device's signed answer is believed (the gateway reads answers).
    key1 = users["gh-1"]["command key"].encode()
    opened = unseal("devices/gh-1/cmd", gh1.got[0][1])
    assert opened is not None
    assert orjson.loads(opened[1])["id"] == to_gh1
    assert seal(key1, "devices/gh-1/cmd", opened[1]) == gh1.got[0][1]
    body = orjson.dumps({"id": to_gh1, "ts": time.time(), "status": "ok"})
    gh1.publish("devices/gh-1/cmd/ack", seal(key1, "devices/gh-1/cmd/ack", body))
    turn_until(lambda: to_gh1 not in (gw.commands.pending if gw.commands else {}),
               "gh-1's answer")
    events = [(t, s) for (t, s) in gw.store._conn.execute(
        "SELECT json_extract(body, '$.type'), json_extract(body, '$.subject') FROM records "
        "WHERE kind = 1 ORDER BY seq")]
    gw.ingest.finish()
    gw.store.close()
    for client in (gh1, gh2):
        client.close()
    # gh-1's forged answer for gh-2 never arrived: gh-2's command is still waiting.
    assert set(gw.commands.pending) == {to_gh2}
    assert ("io.fieldgate.command.acknowledged", "gh-1") in events
    assert not any(t == "io.fieldgate.command.ack_rejected" for t, _ in events)


def test_add_device_refuses_bad_ids_and_duplicates_in_one_line(tmp_path):
    passwords = tmp_path / "p"
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"gateway_id": "g"}))
    cfg = str(tmp_path / "g.yaml")
    assert _cli("add-device", "gh-1", "-c", cfg, "--password-file", str(passwords)) \
        .returncode == 0
    for device, words in (("gh-1", "already"), ("a/b", "characters other than ASCII"),
                          ("gh+", "characters other than ASCII"),
                          ("fieldgate", "gateway's user")):
        out = _cli("add-device", device, "-c", cfg, "--password-file", str(passwords))
        assert out.returncode == 2
        assert words in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    again = _cli("add-device", "gh-1", "-c", cfg, "--password-file", str(passwords),
                 "--replace")
    assert again.returncode == 0
    assert "none (commands.key_file is not set" in again.stdout
    assert [line.split(":")[0] for line in passwords.read_text().splitlines()] == ["gh-1"]
    assert passwords.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(("device", "words"), [
    ('a"b', "characters other than ASCII"), ("a,b", "characters other than ASCII"),
    ("a$b", "characters other than ASCII"), ("a%b", "characters other than ASCII"),
    ("dév", "characters other than ASCII"), ("d\uff11", "characters other than ASCII"),
    ("..", "is a path name"), (".", "is a path name"),
    ("d" * 300, "more than ingest.max_device_id 128"),
    ("d" * 17, "more than ingest.max_device_id 16"),
    ("aa:bb", "Mosquitto's password file"),
])
def test_add_device_provisions_only_ids_ingest_accepts(tmp_path, device, words):
    from click.testing import CliRunner

    from gateway.cli import main

    passwords = tmp_path / "p"
    config: dict[str, Any] = {"gateway_id": "g"}
    if "16" in words:
        config["ingest"] = {"max_device_id": 16}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["site", "add-device", device, "-c",
                                       str(tmp_path / "g.yaml"), "--password-file",
                                       str(passwords)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not passwords.exists()


def test_add_device_and_ingest_agree_on_device_ids(tmp_path):
    """Every id add-device provisions, ingest takes; every id it refuses but ':' (which
    Mosquitto's password file cannot hold), ingest dead-letters as bad_device."""
    from gateway.config import Ingest, Subscription
    from gateway.errors import FieldgateError
    from gateway.ingest.decode import DeadLetter, Decoder, Reason
    from gateway.ingest.topics import TopicTemplates
    from gateway.site import add_device

    cfg = Ingest(max_device_id=32)
    decoder = Decoder(cfg, TopicTemplates([Subscription(topic="s/{device}/t")]))
    now = time.time()
    candidates = ["gh-1", "esp32_01.north", "dev@site~3", "a..b", ".x", "A" * 32, "A" * 33,
                  'a"b', "a,b", "a$b", "a%b", "a b", "dév", "d\uff11", ".", "..", "a*b",
                  "aa:bb:cc"]
    for device in candidates:
        try:
            add_device(tmp_path / "p", device, None, max_device_id=cfg.max_device_id)
            provisioned = True
        except FieldgateError:
            provisioned = False
        out = decoder.decode(f"s/{device}/t", b'{"v": 1}', now)
        taken = not isinstance(out, DeadLetter)
        assert taken or out.reason is Reason.BAD_DEVICE
        assert provisioned == (taken and ":" not in device), device


def test_password_hash_is_the_one_mosquitto_passwd_writes(tmp_path):
    passwords = tmp_path / "p"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "u", "s3cret"],
                   check=True, capture_output=True)
    written = passwords.read_text().strip().split(":", 1)[1]
    _, _, iterations, salt, _ = written.split("$")
    import base64

    assert hash_password("s3cret", salt=base64.b64decode(salt),
                         iterations=int(iterations)) == written


@pytest.mark.parametrize("command", ["add-device", "add-gateway"])
def test_site_commands_have_help_with_an_example(command):
    out = _cli(command, "--help")
    assert out.returncode == 0
    assert "Example:" in out.stdout and f"gateway site {command}" in out.stdout
