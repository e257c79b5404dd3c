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

A command from the cloud (gateway.downlink, docs/downlink.md) goes the same way with a
``CloudOrigin``: it waits its own ttl rather than ``ack_timeout`` and expires as
``io.fieldgate.command.expired``; it is handed to the site broker only while the site link is
up (so an expired command is never sent late), with the remaining ttl as the MQTT message
expiry; its payload is kept with the waiting commands until the site broker acknowledged it
(``io.fieldgate.command.sent``), so a restart sends it again; and every outcome (the device's
answer, expiry, the site broker's refusal) becomes a reply, handed to ``on_cloud_reply``
after the event is durable.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from fieldmqtt import reason_name
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
SENT = "io.fieldgate.command.sent"
EXPIRED = "io.fieldgate.command.expired"

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
# Seconds after a command went out during which the loop does not coalesce (sleep to let
# messages gather): a device on the LAN answers within milliseconds, and the answer (and the
# reply to the cloud) should not wait out a sleep.
_ANSWER_WINDOW = 1.0


class CommandDeviceError(ValueError):
    """A command that cannot be sent: its device is no device id (``reason`` says why)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"command to {device[:80]!r} refused: {reason}")
        self.device = device
        self.reason = reason


class CommandNotRecordedError(Exception):
    """A command from the cloud the log could not record (its disk is full): it was not
    sent and does not wait; the caller refuses the request."""


class CloudOrigin(NamedTuple):
    """Where a command from the cloud came from and where its outcome goes."""

    request: str      # the cloud request's id
    reply_topic: str
    correlation: str  # hex of the request's Correlation Data ("" when it had none)
    ttl: float        # seconds it may wait for the site broker and the device


class Pending(NamedTuple):
    """A command issued and not answered yet."""

    device: str
    issued: float    # epoch seconds: saved, it means the same after a restart
    action: str
    deadline: float  # time.monotonic() when it times out: a clock step does not move it
    cloud: CloudOrigin | None = None

    def budget(self, timeout: float) -> float:
        """Seconds it may wait in all: its ttl from the cloud, else commands.ack_timeout."""
        return self.cloud.ttl if self.cloud is not None else timeout


CloudReply = Callable[[CloudOrigin, dict[str, Any]], None]


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
        # Cloud commands the site broker has not acknowledged yet: id -> payload (saved, so
        # a restart sends them again), and the packet ids of those handed to the site link.
        self._unsent: dict[str, bytes] = {}
        self._handed: dict[int, str] = {}
        self._next_deadline = float("inf")
        # Outcomes of cloud commands, handed to on_cloud_reply once their event is durable.
        self._replies: list[tuple[CloudOrigin, dict[str, Any]]] = []
        self.on_cloud_reply: CloudReply | None = None
        self._sent_at = -_ANSWER_WINDOW   # time.monotonic() of the last command handed out
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
            for cid, device, issued, action, *rest in state["pending"]:
                cloud = CloudOrigin(str(rest[0][0]), str(rest[0][1]), str(rest[0][2]),
                                    float(rest[0][3])) if rest else None
                # The time left is what the wall clock says, never more than a full timeout.
                budget = cloud.ttl if cloud is not None else self._timeout
                left = min(max(float(issued) + budget - wall, 0.0), budget)
                self._pending[str(cid)] = Pending(str(device), float(issued), str(action),
                                                  mono + left, cloud)
            for device, cid, digest in state["answered"]:
                self._answered[(str(device), str(cid))] = str(digest)
            for cid, payload in state.get("unsent", []):
                if str(cid) in self._pending:
                    self._unsent[str(cid)] = str(payload).encode()
        except (ValueError, KeyError, TypeError, IndexError):
            self._pending.clear()
            self._answered.clear()
            self._unsent.clear()
        self._next_deadline = min((p.deadline for p in self._pending.values()),
                                  default=float("inf"))

    def state(self) -> tuple[str, bytes]:
        """The waiting commands and taken answers, to be saved with the events that changed
        them (LogStore.append_events_with_state): one commit, so a crash keeps both or
        neither."""
        return STATE_NAME, orjson.dumps({
            "pending": [[cid, p.device, p.issued, p.action,
                         *([list(p.cloud)] if p.cloud is not None else [])]
                        for cid, p in self._pending.items()],
            "answered": [[d, cid, digest] for (d, cid), digest in self._answered.items()],
            "unsent": [[cid, payload.decode()] for cid, payload in self._unsent.items()],
        })

    # -- commands out --------------------------------------------------------------------

    def send(self, device: str, action: str, params: dict[str, Any], *,
             cause: dict[str, Any] | None = None, now: float | None = None,
             cloud: CloudOrigin | None = None, before: Iterable[Event] = (),
             state: Iterable[tuple[str, bytes]] = ()) -> str:
        """Log a command as an event, remember it as waiting (one commit), publish it.
        ``before``: events logged ahead of it, ``state``: more state saved, in that commit.
        Raises CommandDeviceError when ``device`` is no device id, and, for a command from
        the cloud, CommandNotRecordedError when the log refused the commit (disk full)."""
        command = self.prepare(device, action, params, cause=cause, now=now, cloud=cloud)
        # Logged and remembered before it is published: an answer after a crash finds it.
        seqs = self._store.append_events_with_state([*before, *command.events],
                                                    [self.state(), *state], now)
        if not seqs and cloud is not None:
            # Nothing from the cloud reaches a device unless it is recorded (docs/downlink.md).
            self._pending.pop(command.id, None)
            self._unsent.pop(command.id, None)
            raise CommandNotRecordedError(command.id)
        self.publish(command)
        return command.id

    def prepare(self, device: str, action: str, params: dict[str, Any], *,
                cause: dict[str, Any] | None = None, now: float | None = None,
                cloud: CloudOrigin | None = None) -> Prepared:
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
        if cloud is not None:
            cause = {"origin": "cloud", "request": cloud.request, **(cause or {})}
        events = [Event(ISSUED, device, now, {
            "id": cid, "action": action, "params": params, "signed": self._master is not None,
            **({"cause": cause} if cause else {}),
        })]
        while len(self._pending) >= self._max:
            old_id, old = self._pending.popitem(last=False)
            events.insert(0, self._timed_out(old_id, old, now, "too many commands waiting "
                                             "(commands.max_pending)"))
        deadline = time.monotonic() + (cloud.ttl if cloud is not None else self._timeout)
        self._pending[cid] = Pending(device, now, action, deadline, cloud)
        self._next_deadline = min(self._next_deadline, deadline)
        payload = body if self._master is None else seal(self._key(device), topic, body)
        if cloud is not None:
            self._unsent[cid] = payload
        return Prepared(cid, topic, payload, events)

    def publish(self, command: Prepared) -> None:
        if command.id in self._unsent:
            self._hand_over(command.id, command.payload, time.monotonic())
            return
        self._link.publish(command.topic, command.payload, qos=1,
                           content_type="application/json")
        self._sent_at = time.monotonic()

    def expecting(self, now: float) -> bool:
        """A command went out less than ``_ANSWER_WINDOW`` ago and waits for its answer: the
        loop then wakes for it rather than sleep through the device's quick answer."""
        return now - self._sent_at < _ANSWER_WINDOW and bool(self._pending)

    def _hand_over(self, cid: str, payload: bytes, now: float) -> None:
        """Give a cloud command to the site link, if it is up (else ``step`` does later)."""
        waiting = self._pending.get(cid)
        if waiting is None or not self._link.connected or cid in self._handed.values():
            return
        left = max(1, int(waiting.deadline - now))
        pid = self._link.publish(f"devices/{waiting.device}/cmd", payload, qos=1,
                                 content_type="application/json", message_expiry=left)
        self._handed[pid] = cid
        self._sent_at = now

    def published(self, packet_id: int, reason: int) -> None:
        """The site broker's PUBACK of a publish on the site link (ours or not)."""
        cid = self._handed.pop(packet_id, None)
        if cid is None or self._unsent.pop(cid, None) is None:
            return
        waiting = self._pending.get(cid)
        if waiting is None:
            return
        now = time.time()
        if reason < 0x80:
            event = Event(SENT, waiting.device, now, {"id": cid, "action": waiting.action})
        else:
            # The site broker will not pass it on (its ACL, a quota): settled as refused.
            del self._pending[cid]
            why = f"the site broker refused it: {reason_name(reason)} (0x{reason:02x})"
            event = Event(REJECTED, waiting.device, now, {
                "id": cid, "action": waiting.action, "reason": why, "by": "site broker"})
            self._reply(cid, waiting, "refused", why)
        self._store.append_events_with_state([event], [self.state()], now)
        self._flush_replies()

    def _reply(self, cid: str, waiting: Pending, status: str, reason: str | None) -> None:
        if waiting.cloud is None:
            return
        body: dict[str, Any] = {"id": waiting.cloud.request, "status": status,
                                "device": waiting.device, "command": cid}
        if reason is not None:
            body["reason"] = reason
        self._replies.append((waiting.cloud, body))

    def _flush_replies(self) -> None:
        replies, self._replies = self._replies, []
        if self.on_cloud_reply is not None:
            for origin, body in replies:
                self.on_cloud_reply(origin, body)

    def _timed_out(self, cid: str, pending: Pending, now: float, reason: str) -> Event:
        self._unsent.pop(cid, None)
        if pending.cloud is not None:
            self._reply(cid, pending, "expired", reason)
            return Event(EXPIRED, pending.device, now, {
                "id": cid, "action": pending.action, "issued": round(pending.issued, 3),
                "request": pending.cloud.request, "reason": reason})
        return Event(TIMED_OUT, pending.device, now, {
            "id": cid, "action": pending.action, "issued": round(pending.issued, 3),
            "reason": reason})

    def step(self, now: float) -> None:
        """Once a turn of the loop: hand held cloud commands to the site link once it is up,
        time out the commands whose answer is overdue at ``now`` (time.monotonic()), pass
        on replies; cheap when there is nothing to do."""
        if self._unsent and self._link.connected and len(self._handed) < len(self._unsent):
            for cid, payload in list(self._unsent.items()):
                self._hand_over(cid, payload, now)
        if self._replies:
            self._flush_replies()
        if now < self._next_deadline:
            return
        expired: list[Event] = []
        wall = time.time()
        for cid, waiting in list(self._pending.items()):
            if waiting.deadline <= now:
                del self._pending[cid]
                budget = waiting.budget(self._timeout)
                why = (f"no answer within ttl {budget:g} s" if waiting.cloud is not None else
                       f"no answer within {budget:g} s (commands.ack_timeout)")
                if cid in self._unsent:
                    why += " (the site broker was not reachable)"
                expired.append(self._timed_out(cid, waiting, wall, why))
        self._next_deadline = min((p.deadline for p in self._pending.values()),
                                  default=float("inf"))
        if expired:
            self._store.append_events_with_state(expired, [self.state()], wall)
            self._flush_replies()

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
        self._flush_replies()

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
        self._unsent.pop(cid, None)
        self._answered[(device, cid)] = digest
        while len(self._answered) > _ANSWERS_KEPT:
            self._answered.popitem(last=False)
        ok = ack["status"] == "ok"
        data: dict[str, Any] = {"id": cid, "status": ack["status"], "action": waiting.action,
                                "signed": self._master is not None}
        if not ok:
            data["reason"] = ack.get("reason")
        if waiting.cloud is not None:
            data["request"] = waiting.cloud.request
            reason = ack.get("reason")
            self._reply(cid, waiting, "ok" if ok else "rejected",
                        None if ok else str(reason) if reason is not None else None)
        return Event(ACKNOWLEDGED if ok else REJECTED, device, now, data), True
