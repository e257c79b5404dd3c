"""Dead letters (gateway/dlq.py, the dead-letter rows of gateway/log/store.py): what
`gateway log replay` sends again to a real site Mosquitto, and the bound on stored topics."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as paho
import yaml

from gateway import dlq
from gateway.config import LogSection
from gateway.ingest.decode import DeadLetter, Reason
from gateway.log.schema import connect
from gateway.log.store import DLQ_TOPIC_CUT, DLQ_TOPIC_MAX, Message
from gateway.mosquitto import Mosquitto
from gateway.sinks.influx import DLQ_TOPIC as INFLUX_DLQ_TOPIC
from tests.conftest import ROOT
from tests.mqtt_helpers import Publisher, client, subscribe_and_wait
from tests.tools import open_log


def _config(tmp_path: Path, site: Mosquitto) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"gateway_id": "gw-1", "site": {"url": site.url},
                                    "log": {"path": str(tmp_path / "log.db")}}))
    return path


def _replay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "log", "replay", "-c", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


class _Seen:
    """Every topic published on the site broker, from a subscription to ``#``."""

    def __init__(self, port: int) -> None:
        self.topics: list[str] = []
        self._sentinel = threading.Event()
        self.c = client(port)
        self.c.on_message = self._on_message
        subscribe_and_wait(self.c, [("#", 1)])

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        if msg.topic == "test/sentinel":
            self._sentinel.set()
        else:
            self.topics.append(msg.topic)

    def settle(self, port: int) -> list[str]:
        """The topics seen once a message published after them has arrived."""
        pub = Publisher(port)
        pub.publish("test/sentinel", b"")
        pub.close()
        assert self._sentinel.wait(10)
        self.c.disconnect()
        self.c.loop_stop()
        return self.topics


def test_replay_sends_site_messages_only_not_what_sinks_refused(tmp_path: Path) -> None:
    site = Mosquitto(tmp_path, "site").start()
    try:
        config = _config(tmp_path, site)
        store = open_log(LogSection(path=tmp_path / "log.db"), "gw-1")
        assert store.add_dead_letters([
            ("sensors/d1/telemetry", "bad_json", "not JSON", b"{oops"),
            (INFLUX_DLQ_TOPIC, "sink_rejected", "influx: HTTP 400: field type conflict",
             b'{"seq":7,"device":"d1","ts":1.5,"temp":21.5}'),
            ("fieldgate/gw-1/telemetry", "uplink_rejected:0x97", "uplink: cloud broker "
             "refused it: quota exceeded (0x97); seq 8-9", b'[{"seq":8},{"seq":9}]'),
        ])
        store.close()
        seen = _Seen(site.port)
        out = _replay(config, "--since", "0")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "replayed 1 of 1"
        assert out.stderr.splitlines() == [
            "skip 2: sink_rejected is a log record that a sink's destination refused, not a "
            "site message",
            "skip 3: uplink_rejected:0x97 is a log record that a sink's destination refused, "
            "not a site message",
        ]
        assert seen.settle(site.port) == ["sensors/d1/telemetry"]
        conn = connect(tmp_path / "log.db", readonly=True)
        replayed = dict(conn.execute("SELECT id, replayed IS NOT NULL FROM dead_letters"))
        conn.close()
        assert replayed == {1: 1, 2: 0, 3: 0}  # the skipped ones stay as they were
        # Asked for by reason, the same: nothing sent, a note, and no error.
        out = _replay(config, "--reason", "sink_rejected")
        assert (out.returncode, out.stdout.strip()) == (0, "replayed 0 of 0")
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("skip 2: ")
    finally:
        site.stop()


def test_a_dead_letters_topic_is_kept_to_1_kib_and_the_detail_says_so(tmp_path: Path) -> None:
    store = open_log(LogSection(path=tmp_path / "log.db"), "gw-1")
    # A topic far past the bound, of 3-byte characters so the cut falls inside one.
    long_topic = "sensors/" + "温" * 2000 + "/telemetry"
    short_topic = "sensors/d1/telemetry"
    store.append([
        Message(long_topic, b"{oops", 1, DeadLetter(Reason.BAD_JSON, "not JSON"), 1.0),
        Message(short_topic, b"{oops", 2, DeadLetter(Reason.BAD_JSON, "not JSON"), 1.0),
    ])
    assert store.add_dead_letters([(long_topic, "sink_rejected", "HTTP 400", b"{}")])
    conn = connect(tmp_path / "log.db", readonly=True)
    rows = dlq.select(conn)
    conn.close()
    store.close()
    cut, short, from_sink = rows
    size = len(long_topic.encode())
    for row in (cut, from_sink):
        kept = row.topic.encode()
        assert len(kept) <= DLQ_TOPIC_MAX and len(kept) > DLQ_TOPIC_MAX - 3
        assert long_topic.startswith(row.topic)
        assert row.detail.endswith(f"; {DLQ_TOPIC_CUT} (of {size} bytes)")
    assert cut.detail.startswith("not JSON")
    assert (short.topic, short.detail) == (short_topic, "not JSON")
    # A topic that is not the one it came on cannot be replayed.
    assert dlq.not_replayable(cut) == "skip 1: topic was truncated"
    assert dlq.not_replayable(short) is None
