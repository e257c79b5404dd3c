"""Commands to devices: signed, published on the site broker, tracked until answered.

Wire format (DESIGN.md, devices/README.md, which has test vectors and a verifier to copy).
A command is the JSON ``{"id", "ts", "action", "params"}``; an answer on
``devices/<id>/cmd/ack`` is ``{"id", "ts", "status": "ok" | "rejected", "reason"}``. With a
site master key configured, both go in a fixed envelope::

    {"sig":"<64 hex>","cmd":<body>}      (answers: "ack" in place of "cmd")

where ``sig`` is the hex HMAC-SHA256, keyed with the device's key, of ``<topic> + "\\n" +
<body>``: the exact bytes of the body as they stand in the payload, nothing re-serialised,
so C firmware checks it with one HMAC over a slice of the buffer (the body runs from byte 80
to the last byte). The topic names the device and the direction, so a command cannot be
replayed to another device nor passed off as an answer. Each device has its own key,
HMAC-SHA256(master, device id) as 64 hex characters (``gateway site add-device`` prints it):
a key taken from one device signs for that device only.

An answer counts only for a command this gateway issued and is still waiting for, and only
when the device signed it; anything else is logged as ``io.fieldgate.command.ack_rejected``
with a reason. Waiting commands are kept with the log (they survive a restart), expire after
``commands.ack_timeout`` as ``io.fieldgate.command.timed_out`` and number at most
``commands.max_pending``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from gateway.config import Ingest
from gateway.ingest.decode import duplicate_key, valid_device_id
from gateway.records import Event

if TYPE_CHECKING:
    from gateway.log.store import LogStore
    from gateway.mqtt.link import MqttLink

ACK_FILTER = "devices/+/cmd/ack"
STATE_NAME = "commands"
ISSUED = "io.fieldgate.command.issued"
ACKNOWLEDGED = "io.fieldgate.command.acknowledged"
REJECTED = "io.fieldgate.command.rejected"
ACK_REJECTED = "io.fieldgate.command.ack_rejected"
TIMED_OUT = "io.fieldgate.command.timed_out"

_SIG_START = b'{"sig":"'
_SIG_HEX = 64
_BODY_START = len(_SIG_START) + _SIG_HEX + len(b'","cmd":')  # 80


def device_key(master: bytes, device: str) -> bytes:
    """A device's own key: HMAC-SHA256(master, device id) as 64 hex characters (ASCII)."""
    return hmac.new(master, device.encode(), hashlib.sha256).hexdigest().encode()


def signature(key: bytes, topic: str, body: bytes) -> str:
    return hmac.new(key, topic.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def seal(key: bytes, topic: str, body: bytes) -> bytes:
    """The signed payload for ``body`` published on ``topic``."""
    field = b"ack" if topic.endswith("/ack") else b"cmd"
    return (_SIG_START + signature(key, topic, body).encode() + b'","' + field + b'":'
            + body + b"}")


def unseal(topic: str, payload: bytes) -> tuple[str, bytes] | None:
    """(signature, body) of a signed payload, or None when it is not in the envelope."""
    field = b"ack" if topic.endswith("/ack") else b"cmd"
    if len(payload) < _BODY_START + 1 or not payload.startswith(_SIG_START) \
            or payload[_BODY_START - 8:_BODY_START] != b'","' + field + b'":' \
            or not payload.endswith(b"}"):
        return None
    sig = payload[len(_SIG_START):len(_SIG_START) + _SIG_HEX]
    try:
        return sig.decode("ascii"), payload[_BODY_START:-1]
    except UnicodeDecodeError:
        return None


def is_ack_topic(topic: str) -> bool:
    # Asked of every site message: the suffix test alone rejects readings.
    return (topic.endswith("/cmd/ack") and topic.startswith("devices/")
            and topic.count("/") == 3)


# Answers remembered to recognise a redelivered one: the site broker redelivers at most the
# messages that were in flight at a crash (site.receive_maximum); more only costs state
# bytes rewritten with every command and answer.
_ANSWERS_KEPT = 1000


class CommandDeviceError(ValueError):
    """A command that cannot be sent: its device is no device id (``reason`` says why)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"command to {device[:80]!r} refused: {reason}")
        self.device = device
        self.reason = reason


class Pending(NamedTuple):
    """A command issued and not answered yet."""

    device: str
    issued: float    # epoch seconds: saved, it means the same after a restart
    action: str
    deadline: float  # time.monotonic() when it times out: a clock step does not move it


@dataclass(frozen=True, slots=True)
class Prepared:
    """A command made and waiting, to be logged (``events``) and then published."""

    id: str
    topic: str
    payload: bytes
    events: list[Event]


class CommandSender:
    """Issues commands and judges the answers; keeps what it waits for in the log's state.

    ``ack_timeout``: seconds a command waits for its answer; ``max_pending``: commands
    waiting at most (at the bound the oldest one times out early). The waiting commands
    are saved with every command and answer (commands are few: rule actions have
    cooldowns), so that an answer after a restart still finds its command.
    """

    def __init__(self, gateway_id: str, master_key: bytes | None, link: MqttLink,
                 store: LogStore, *, ack_timeout: float = 60.0,
                 max_pending: int = 10_000,
                 max_device_id: int = Ingest.model_fields["max_device_id"].default) -> None:
        self._gateway_id = gateway_id
        self._master = master_key
        self._keys: dict[str, bytes] = {}
        self._link = link
        self._store = store
        self._timeout = ack_timeout
        self._max = max_pending
        self._max_device_id = max_device_id
        self._counter = itertools.count(1)
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        # Answers taken, by (device, command id) -> digest of the payload: the site broker
        # redelivers an answer the gateway had not acknowledged before a crash; the same
        # bytes again are skipped, a different answer to an answered command is rejected.
        self._answered: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._load()

    @property
    def pending(self) -> dict[str, Pending]:
        return dict(self._pending)

    def _key(self, device: str) -> bytes:
        assert self._master is not None
        key = self._keys.get(device)
        if key is None:
            if len(self._keys) >= self._max:
                self._keys.clear()
            key = self._keys[device] = device_key(self._master, device)
        return key

    # -- durable state -------------------------------------------------------------------

    def _load(self) -> None:
        saved = self._store.load_state(STATE_NAME)
        if saved is None:
            return
        try:
            state = orjson.loads(saved)
            wall, mono = time.time(), time.monotonic()
            for cid, device, issued, action in state["pending"]:
                # The time left is what the wall clock says, never more than a full timeout.
                left = min(max(float(issued) + self._timeout - wall, 0.0), self._timeout)
                self._pending[str(cid)] = Pending(str(device), float(issued), str(action),
                                                  mono + left)
            for device, cid, digest in state["answered"]:
                self._answered[(str(device), str(cid))] = str(digest)
        except (ValueError, KeyError, TypeError):
            self._pending.clear()
            self._answered.clear()

    def state(self) -> tuple[str, bytes]:
        """The waiting commands and taken answers, to be saved with the events that changed
        them (LogStore.append_events_with_state): one commit, so a crash keeps both or
        neither."""
        return STATE_NAME, orjson.dumps({
            "pending": [[cid, p.device, p.issued, p.action] for cid, p in self._pending.items()],
            "answered": [[d, cid, digest] for (d, cid), digest in self._answered.items()],
        })

    # -- commands out --------------------------------------------------------------------

    def send(self, device: str, action: str, params: dict[str, Any], *,
             cause: dict[str, Any] | None = None, now: float | None = None) -> str:
        """Log a command as an event, remember it as waiting (one commit), publish it.
        Raises CommandDeviceError when ``device`` is no device id."""
        command = self.prepare(device, action, params, cause=cause, now=now)
        # Logged and remembered before it is published: an answer after a crash finds it.
        self._store.append_events_with_state(command.events, [self.state()], now)
        self.publish(command)
        return command.id

    def prepare(self, device: str, action: str, params: dict[str, Any], *,
                cause: dict[str, Any] | None = None, now: float | None = None) -> Prepared:
        """A command made and remembered as waiting, not yet logged nor published: the
        caller logs ``events`` with ``state()`` in its own commit, then calls ``publish``.

        Raises CommandDeviceError, before anything is remembered, when ``device`` is not a
        device id by ingest's rule (a ``+``, ``#`` or ``/`` would change the topic)."""
        problem = valid_device_id(device, self._max_device_id)
        if problem is not None:
            raise CommandDeviceError(device, problem)
        now = time.time() if now is None else now
        cid = f"{self._gateway_id}-{int(now * 1000)}-{next(self._counter)}"
        topic = f"devices/{device}/cmd"
        body = orjson.dumps({"id": cid, "ts": round(now, 3), "action": action,
                             "params": params})
        events = [Event(ISSUED, device, now, {
            "id": cid, "action": action, "params": params, "signed": self._master is not None,
            **({"cause": cause} if cause else {}),
        })]
        while len(self._pending) >= self._max:
            old_id, old = self._pending.popitem(last=False)
            events.insert(0, self._timed_out(old_id, old, now, "too many commands waiting "
                                             "(commands.max_pending)"))
        self._pending[cid] = Pending(device, now, action, time.monotonic() + self._timeout)
        payload = body if self._master is None else seal(self._key(device), topic, body)
        return Prepared(cid, topic, payload, events)

    def publish(self, command: Prepared) -> None:
        self._link.publish(command.topic, command.payload, qos=1,
                           content_type="application/json")

    def _timed_out(self, cid: str, pending: Pending, now: float, reason: str) -> Event:
        return Event(TIMED_OUT, pending.device, now, {
            "id": cid, "action": pending.action, "issued": round(pending.issued, 3),
            "reason": reason})

    def expire(self, now: float) -> None:
        """Time out the commands whose answer is overdue at ``now`` (time.monotonic());
        cheap when none is."""
        if not self._pending:
            return
        expired: list[Event] = []
        wall = time.time()
        while self._pending:
            cid, first = next(iter(self._pending.items()))
            if first.deadline > now:
                break
            del self._pending[cid]
            expired.append(self._timed_out(cid, first, wall, f"no answer within "
                                           f"{self._timeout:g} s (commands.ack_timeout)"))
        if expired:
            self._store.append_events_with_state(expired, [self.state()], wall)

    # -- answers in ----------------------------------------------------------------------

    def acknowledgement(self, topic: str, payload: bytes, now: float, *, dup: bool) -> None:
        """Judge a device's answer on devices/<id>/cmd/ack and log what it means.

        ``dup``: the MQTT DUP flag. Only the broker's redelivery (DUP set) of an answer
        already taken is skipped; the same bytes published again as a new message are a
        replay, rejected as ``duplicate``. The event is logged, and the command no longer
        waits, before this returns, so the caller acknowledges the MQTT message only after
        both are durable.
        """
        device = topic.split("/")[1]
        event, taken = self._judge(device, topic, payload, now, dup)
        if event is None:
            return
        self._store.append_events_with_state([event], [self.state()] if taken else [], now)

    def _judge(self, device: str, topic: str, payload: bytes,  # noqa: PLR0911 - one per reason
               now: float, dup: bool) -> tuple[Event | None, bool]:
        def rejected(reason: str, cid: object = None) -> tuple[Event, bool]:
            data: dict[str, Any] = {"reason": reason}
            if isinstance(cid, str):
                data["id"] = cid
            return Event(ACK_REJECTED, device, now, data), False

        sealed = unseal(topic, payload)
        body = payload if sealed is None else sealed[1]
        try:
            ack = orjson.loads(body)
        except orjson.JSONDecodeError:
            ack = None
        if not isinstance(ack, dict) or not isinstance(ack.get("id"), str) \
                or ack.get("status") not in ("ok", "rejected"):
            return rejected("malformed: expected {\"id\", \"status\": \"ok\" | \"rejected\"}")
        twice = duplicate_key(body)
        if twice is not None:
            # Parsers disagree on which value wins: the device's meaning is unknown.
            return rejected(f"malformed: key {twice[:80]!r} appears twice")
        cid: str = ack["id"]
        if self._master is not None:
            if sealed is None:
                return rejected("unsigned", cid)
            if not hmac.compare_digest(sealed[0], signature(self._key(device), topic, body)):
                return rejected("bad signature", cid)
        digest = hashlib.sha256(payload).hexdigest()[:32]
        seen = self._answered.get((device, cid))
        if seen is not None:
            if seen == digest and dup:
                return None, False  # the broker's redelivery of an answer logged already
            return rejected("duplicate: this command was answered already", cid)
        waiting = self._pending.get(cid)
        if waiting is None or waiting.device != device:
            return rejected("unknown id: no command with this id is waiting for this device",
                            cid)
        del self._pending[cid]
        self._answered[(device, cid)] = digest
        while len(self._answered) > _ANSWERS_KEPT:
            self._answered.popitem(last=False)
        ok = ack["status"] == "ok"
        data: dict[str, Any] = {"id": cid, "status": ack["status"], "action": waiting.action,
                                "signed": self._master is not None}
        if not ok:
            data["reason"] = ack.get("reason")
        return Event(ACKNOWLEDGED if ok else REJECTED, device, now, data), True
