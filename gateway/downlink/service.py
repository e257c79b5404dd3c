"""The downlink: requests from the cloud checked, recorded and routed (docs/downlink.md).

The cloud link subscribes to ``fieldgate/<gateway_id>/cmd/+`` (when ``downlink.allow`` lists
any command) and ``fieldgate/<gateway_id>/rules/set`` and ``rules/rollback`` (when
``downlink.rules`` is on); with neither, nothing is subscribed and no request is read. Each
request passes the same checks in the same order — size, signature, a JSON object with an
id and a ts, clock skew, replay — and then its own: a command goes to the command sender
(``gateway.commands``) with its ``CloudOrigin``, a bundle or a rollback to the rule
deployer. The request's id is remembered in the same commit as its first event, so the
MQTT message is acknowledged (after ``on_message`` returns) only once both are durable.

Refusals before the request is known to be authentic and fresh (too large, unsigned, bad
signature, stale, replayed, ...) can come as a flood from anyone who may publish on the
cloud broker: they are logged and answered within a rate budget, and always counted
(``fieldgate_downlink_refused_total{reason}``). Refusals of authentic requests (not
allowed, unknown device, rule errors) are always logged and answered.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from fieldmqtt import MqttError
from gateway.backoff import RateBudget
from gateway.commands import CloudOrigin, CommandNotRecordedError, CommandSender
from gateway.config import GatewayConfig
from gateway.downlink.devices import STATE_NAME as DEVICES_STATE
from gateway.downlink.devices import KnownDevices
from gateway.downlink.replay import STATE_NAME as REPLAY_STATE
from gateway.downlink.replay import ReplayGuard
from gateway.downlink.rules import RECEIVED as RULES_RECEIVED
from gateway.downlink.rules import REFUSED as RULES_REFUSED
from gateway.downlink.rules import SUBJECT as RULES_SUBJECT
from gateway.downlink.rules import RuleDeployer
from gateway.downlink.signing import SIGNATURE_PROPERTY, Verifier
from gateway.ingest.decode import duplicate_key, valid_device_id
from gateway.mqtt.link import InboundMessage, MqttLink, valid_topic_name
from gateway.records import Event, Reading

if TYPE_CHECKING:
    from gateway.log.store import LogStore
    from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

RECEIVED = "io.fieldgate.command.received"
REFUSED = "io.fieldgate.command.refused"
CONTENT_TYPE = "application/json"

_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_MAX_ACTION = 64
# Nesting of "params": a device's parameters are a flat object or nearly; the JSON writer the
# log and the command use (orjson) stops at 255 levels, and the events wrap params in a few
# more, so a deeper object could not be written at all.
MAX_PARAMS_DEPTH = 32
# Answers and events for refusals of requests not known to be authentic, per second at most.
_REFUSAL_BUDGET = 10.0
_MAX_REPLY_TOPIC = 1024
# Correlation Data kept with a waiting command (it is saved with every command and answer):
# the operators' tools send 16 bytes; MQTT allows 64 KiB, which made each saved state grow by
# 128 KiB per waiting command and a burst of commands slow down quadratically.
MAX_CORRELATION_BYTES = 1024
_MAX_SUBJECT = 128


class Kind(StrEnum):
    COMMAND = "command"
    RULES_SET = "rules_set"
    RULES_ROLLBACK = "rules_rollback"


class Refusal(Exception):  # noqa: N818 - a verdict, not our error
    """A request not acted on: ``code`` (the metric's reason label) and one line."""

    def __init__(self, code: str, line: str) -> None:
        super().__init__(line)
        self.code = code
        self.line = line


class _Request(NamedTuple):
    kind: Kind
    device: str        # commands: the device the topic names; else ""
    reply_topic: str
    correlation: bytes | None


class Downlink:
    def __init__(self, cfg: GatewayConfig, store: LogStore, link: MqttLink,
                 commands: CommandSender, metrics: GatewayMetrics,
                 rules: RuleDeployer | None = None,
                 status_changed: Callable[[], None] | None = None) -> None:
        """``status_changed`` is called when the rules version changed (the uplink renews
        its retained status, which names the version)."""
        self._cfg = cfg.downlink
        self._max_device_id = cfg.ingest.max_device_id
        self._store = store
        self._link = link
        self._commands = commands
        self._metrics = metrics
        self._rules = rules if cfg.downlink.rules else None
        self._status_changed = status_changed
        self._prefix = f"fieldgate/{cfg.gateway_id}/"
        self._verifier = Verifier(cfg.downlink.public_keys)
        self._replay = ReplayGuard(cfg.downlink.max_clock_skew, store.load_state(REPLAY_STATE))
        self.devices = KnownDevices(cfg.engine.max_devices, store.load_state(DEVICES_STATE))
        self._budget = RateBudget(_REFUSAL_BUDGET)
        self._logged_codes: set[str] = set()
        self._commands_on = bool(cfg.downlink.allow)
        # Messages taken on the request topics, authentic or not (the loop's sleep ends
        # when this moves: see gateway.daemon).
        self.requests = 0
        self.filters: list[str] = []
        if self._commands_on:
            self.filters.append(self._prefix + "cmd/+")
        if self._rules is not None:
            self.filters += [self._prefix + "rules/set", self._prefix + "rules/rollback"]
        commands.on_cloud_reply = self._command_reply

    # -- the wiring -----------------------------------------------------------------------

    def step(self, now: float) -> None:
        """Once a turn of the loop: save the known devices when they grew."""
        if self.devices.due(now):
            self._store.append_events_with_state((), [self.devices.state(now)])

    def finish(self) -> None:
        self._store.append_events_with_state((), [self.devices.state(time.monotonic())])

    def saw_readings(self, readings: list[Reading]) -> None:
        self.devices.seen(readings)

    # -- requests -------------------------------------------------------------------------

    def on_message(self, msg: InboundMessage) -> None:
        self.requests += 1
        request = self._route(msg)
        if request is None:
            return
        now = time.time()
        try:
            body, rid, ts = self._authentic(msg, request.kind)
        except Refusal as refusal:
            self._refused(request, refusal, None, authentic=False)
            return
        fresh = self._replay.problem(rid, ts, now)
        if fresh is not None:
            self._refused(request, Refusal(*fresh), rid, authentic=False)
            return
        # Authentic and fresh: the id is spent, whatever happens next.
        self._replay.remember(rid, ts)
        if request.kind is Kind.COMMAND:
            self._command(request, rid, body, now)
        else:
            self._rules_request(request, rid, body, now)

    def _route(self, msg: InboundMessage) -> _Request | None:
        rest = msg.topic[len(self._prefix):] if msg.topic.startswith(self._prefix) else ""
        if rest.startswith("cmd/") and "/" not in rest[4:] and self._commands_on:
            kind, device, default = Kind.COMMAND, rest[4:], f"{msg.topic}/reply"
        elif rest == "rules/set" and self._rules is not None:
            kind, device, default = Kind.RULES_SET, "", self._prefix + "rules/reply"
        elif rest == "rules/rollback" and self._rules is not None:
            kind, device, default = Kind.RULES_ROLLBACK, "", self._prefix + "rules/reply"
        else:
            return None
        reply = msg.response_topic
        if reply is None or not valid_topic_name(reply, _MAX_REPLY_TOPIC):
            reply = default
        return _Request(kind, device, reply, msg.correlation_data)

    def _authentic(self, msg: InboundMessage, kind: Kind) -> tuple[dict[str, Any], str, float]:
        """The request's body, id and ts once it is shown authentic; else Refusal."""
        if msg.retain:
            raise Refusal("retained", "retained: a request is never taken from a retained "
                          "message (it would be delivered again to every new subscriber)")
        limit = (self._cfg.max_command_bytes if kind is Kind.COMMAND
                 else self._cfg.max_bundle_bytes)
        if len(msg.payload) > limit:
            what = "max_command_bytes" if kind is Kind.COMMAND else "max_bundle_bytes"
            raise Refusal("too_large", f"too large: {len(msg.payload)} bytes, at most {limit} "
                          f"(downlink.{what})")
        correlation = len(msg.correlation_data or b"")
        if correlation > MAX_CORRELATION_BYTES:
            raise Refusal("too_large", f"too large: Correlation Data of {correlation} bytes, "
                          f"at most {MAX_CORRELATION_BYTES}")
        signatures = [v for k, v in msg.user_properties if k == SIGNATURE_PROPERTY]
        if len(signatures) > 1:
            raise Refusal("bad_signature", "bad signature: more than one 'signature' property")
        problem = self._verifier.problem(msg.topic, msg.payload,
                                         signatures[0] if signatures else None)
        if problem is not None:
            raise Refusal("unsigned" if problem.startswith("unsigned") else "bad_signature",
                          problem)
        try:
            body = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            raise Refusal("malformed", "malformed: the payload is not JSON") from None
        if not isinstance(body, dict):
            raise Refusal("malformed", "malformed: the payload is not a JSON object")
        twice = duplicate_key(msg.payload)
        if twice is not None:
            raise Refusal("malformed", f"malformed: key {twice[:80]!r} appears twice")
        rid, ts = body.get("id"), body.get("ts")
        if not isinstance(rid, str) or not _ID.match(rid):
            raise Refusal("malformed", 'malformed: "id" must be 1 to 128 characters of '
                          "A-Z a-z 0-9 . _ : @ -")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise Refusal("malformed", 'malformed: "ts" must be a number (seconds since the '
                          "epoch)")
        return body, rid, float(ts)

    def _command(self, request: _Request, rid: str, body: dict[str, Any], now: float) -> None:
        device = request.device
        try:
            action, params, ttl = self._command_body(device, body)
        except Refusal as refusal:
            self._refused(request, refusal, rid, authentic=True)
            return
        received = Event(RECEIVED, device, now, {
            "request": rid, "action": action, "params": params, "ttl": ttl,
            "origin": "cloud"})
        origin = CloudOrigin(rid, request.reply_topic,
                             (request.correlation or b"").hex(), ttl)
        try:
            self._commands.send(device, action, params, now=now, cloud=origin,
                                before=[received], state=[self._replay.state()])
        except CommandNotRecordedError:
            self._refused(request, Refusal(
                "not_recorded", "not recorded: the gateway's log cannot write (its disk is "
                "full); nothing was sent to the device, send it again later"),
                rid, authentic=True)
            return
        self._metrics.downlink_requests.labels(Kind.COMMAND.value, "taken").inc()

    def _command_body(self, device: str,
                      body: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
        """Action, params and ttl of a command that may go to ``device``; else Refusal."""
        action, params = body.get("action"), body.get("params", {})
        if not isinstance(action, str) or not 0 < len(action) <= _MAX_ACTION:
            raise Refusal("malformed", f'malformed: "action" must be a string of 1 to '
                          f"{_MAX_ACTION} characters")
        if not isinstance(params, dict):
            raise Refusal("malformed", 'malformed: "params" must be a JSON object')
        if _depth(params) > MAX_PARAMS_DEPTH:
            raise Refusal("malformed", f'malformed: "params" is nested more than '
                          f"{MAX_PARAMS_DEPTH} levels deep")
        ttl = body.get("ttl", self._cfg.default_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) \
                or not 0 < ttl <= self._cfg.max_ttl:
            raise Refusal("malformed", f'malformed: "ttl" must be seconds, more than 0 and at '
                          f"most {self._cfg.max_ttl:g} (downlink.max_ttl)")
        problem = valid_device_id(device, self._max_device_id)
        if problem is not None:
            raise Refusal("bad_device", f"unknown device: {problem}")
        if device not in self.devices:
            raise Refusal("unknown_device", f"unknown device: {device!r} has not been "
                          "heard from by this gateway")
        if not self._allowed(device, action):
            raise Refusal("not_allowed", f"not allowed: {action!r} is not allowed for "
                          f"device {device!r} (downlink.allow)")
        return action, params, float(ttl)

    def _allowed(self, device: str, action: str) -> bool:
        return any(fnmatchcase(device, rule.devices)
                   and ("*" in rule.commands or action in rule.commands)
                   for rule in self._cfg.allow)

    def _rules_request(self, request: _Request, rid: str, body: dict[str, Any],
                       now: float) -> None:
        assert self._rules is not None
        # Recorded, with the spent id, before anything changes: the rules never change
        # without a record (the log's disk may be full while the rules' directory is not).
        received: dict[str, Any] = {"request": rid, "kind": request.kind.value}
        if isinstance(body.get("version"), str):
            received["version"] = body["version"][:_MAX_SUBJECT]
        if not self._store.append_events_with_state(
                [Event(RULES_RECEIVED, RULES_SUBJECT, now, received)],
                [self._replay.state()], now):
            self._refused(request, Refusal(
                "not_recorded", "not recorded: the gateway's log cannot write (its disk is "
                "full); the rules were not changed, send it again later"), rid, authentic=True)
            return
        if request.kind is Kind.RULES_SET:
            outcome = self._rules.deploy(rid, body, now)
        else:
            outcome = self._rules.rollback(rid, now)
        self._store.append_events_with_state(outcome.events, [self._replay.state()], now)
        result = "refused" if outcome.reply.get("status") == "refused" else "taken"
        self._metrics.downlink_requests.labels(request.kind.value, result).inc()
        if result == "refused":
            # The reason's first words name it: "rule errors", "malformed: ...", ...
            reason = str(outcome.reply.get("reason", "refused")).split(":", 1)[0]
            self._metrics.downlink_refused.labels(reason.replace(" ", "_")[:40]).inc()
        self._reply(request.reply_topic, request.correlation, outcome.reply)
        if result == "taken" and self._status_changed is not None:
            self._status_changed()

    # -- refusals and replies -------------------------------------------------------------

    def _refused(self, request: _Request, refusal: Refusal, rid: str | None, *,
                 authentic: bool) -> None:
        self._metrics.downlink_refused.labels(refusal.code).inc()
        self._metrics.downlink_requests.labels(request.kind.value, "refused").inc()
        if not authentic and not self._budget.take():
            return  # counted only: a flood must not fill the log nor the cloud link
        if refusal.code not in self._logged_codes:
            self._logged_codes.add(refusal.code)
            log.warning("Refused a request from the cloud (%s): %s; later ones are logged as "
                        "events and counted (fieldgate_downlink_refused_total)",
                        request.kind.value, refusal.line)
        data: dict[str, Any] = {"reason": refusal.line, "origin": "cloud"}
        if rid is not None:
            data["request"] = rid
        if request.kind is Kind.COMMAND:
            event = Event(REFUSED, request.device[:_MAX_SUBJECT] or "?", time.time(), data)
        else:
            event = Event(RULES_REFUSED, "rules", time.time(), {"kind": request.kind.value,
                                                                 **data})
        states = [self._replay.state()] if authentic else []
        self._store.append_events_with_state([event], states)
        reply: dict[str, Any] = {"id": rid, "status": "refused", "reason": refusal.line}
        if request.kind is Kind.COMMAND:
            reply["device"] = request.device[:_MAX_SUBJECT]
        self._reply(request.reply_topic, request.correlation, reply)

    def _command_reply(self, origin: CloudOrigin, body: dict[str, Any]) -> None:
        self._reply(origin.reply_topic, bytes.fromhex(origin.correlation) or None, body)

    def _reply(self, topic: str, correlation: bytes | None, body: dict[str, Any]) -> None:
        try:
            self._link.publish(topic, orjson.dumps(body), qos=1, content_type=CONTENT_TYPE,
                               correlation_data=correlation)
        except MqttError as err:
            # The events in the log (and on events/...) are the durable record; a reply is
            # the convenience for a waiting sender.
            log.warning("Could not send the reply to request %r on %r: %s", body.get("id"),
                        topic, err)


def _depth(value: object) -> int:
    """How deeply objects and arrays nest in ``value`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            stack.extend((child, level) for child in
                         (item.values() if isinstance(item, dict) else item))
    return deepest
