"""The operators' side of the downlink (docs/downlink.md): one signed request, one reply.

``RequestClient.request`` connects to the cloud broker (``Broker``, from the ``broker:``
section of cloud.yaml), subscribes to a reply topic and waits for its SUBACK, publishes the signed
request at QoS 1 with that Response Topic and random Correlation Data, and waits for the
reply that carries the same Correlation Data; anything else on the reply topic is ignored.

The MQTT client is ``fieldmqtt.MqttSession``, the gateway's own: one thread and one socket,
driven here to completion, so a CLI run has no background thread to stop; its typed errors
carry the broker's reason codes (bad credentials, an ACL that refuses the subscribe or the
publish), and the PUBACK's "no matching subscribers" tells at once that no gateway listens
on the topic. (paho would work too, but through callbacks on its own thread.)

Each request gets its own reply topic under the request's default reply topic,
``.../reply/<username>/<nonce>`` (``.../reply/<nonce>`` without a user name): the broker's
ACL can then give each operator's user read access to its own replies only, and a client
receives no one else's. The gateway's own cloud ACL (``fieldgate/<id>/#``) covers it.

Errors::

    DownlinkClientError     base (a FieldgateError); str() is one line
    ├── NotSentError        the request did not go: broker unreachable, credentials or
    │                       a subscribe/publish refused, no gateway subscribed to the topic
    ├── NoReplyError        the request went to the broker; no reply within the timeout
    │                       (it may still have been acted on)
    └── BadReplyError       a reply with our Correlation Data that is not a JSON object
"""

from __future__ import annotations

import getpass
import json
import re
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mqtt5 import QoS, RetainHandling, TopicFilter

from fieldmqtt import (
    Connected,
    ConnectionLostError,
    ConnectRefusedError,
    Event,
    Message,
    MqttSession,
    PacketTooLargeError,
    Published,
    SessionConfig,
    Subscribed,
    reason_name,
)
from gateway.downlink.signing import SIGNATURE_PROPERTY, Signer
from gateway.downlink.versions import LOCAL
from gateway.errors import FieldgateError

# Statuses of a reply that mean "done as asked" (docs/downlink.md, Replies).
SUCCESS = frozenset({"ok", "applied", "rolled_back"})

# What docs/downlink.md allows in a request id and a rules version.
_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")
# What a gateway takes in a bundle (docs/downlink.md, check 6): the gateway's own rules,
# checked before sending, so a bundle is not refused for its shape. "local" names the
# gateway's own configured rules.
RESERVED_VERSIONS = frozenset({LOCAL})
# As GatewayConfig.gateway_id: it becomes a topic level.
GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What a user name may be to become a level of the reply topic: no wildcard, no separator,
# not a system topic.
_LEVEL_RE = re.compile(r"[^/+#$\x00][^/+#\x00]{0,63}")
# Correlation Data: random, so another client's reply cannot be taken for ours by chance.
_CORRELATION_BYTES = 16
# Longest wait for the CONNACK; a broker that does not answer in this long is not there.
_CONNECT_TIMEOUT = 10.0
# The session is driven in slices of at most this long (keepalive, checks of the deadline).
_SLICE = 0.5


class DownlinkClientError(FieldgateError):
    """Base of the request client's errors."""


class NotSentError(DownlinkClientError):
    """The request did not reach any gateway; sending it again is safe."""


class NoReplyError(DownlinkClientError):
    """No reply within the timeout; the request may still have been acted on."""


class BadReplyError(DownlinkClientError):
    """A reply with our Correlation Data that cannot be read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Broker:
    """Where and as whom to connect: the CLI builds it from cloud.yaml's ``broker:`` (a
    ``gateway.config.Link``, whose helpers read the password and the TLS files). Plain
    values: the client needs no config model, and holds the password only in memory."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    keepalive: int = 30

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reply:
    """The gateway's answer: its JSON body, as published on ``topic``."""

    topic: str
    body: dict[str, Any]
    raw: bytes

    @property
    def status(self) -> str:
        return str(self.body.get("status", ""))

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESS


def new_request_id() -> str:
    """A unique request id that says who sent it: ``<user>:<host>:<uuid4 hex>`` in the
    characters docs/downlink.md allows."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "operator"
    host = socket.gethostname() or "host"
    return ":".join(_ID_CHARS.sub("_", part)[:40] for part in (user, host, uuid.uuid4().hex))


def default_version(now: float) -> str:
    """A rules version from the time, e.g. ``2026-11-29T10.41.07Z`` (no ':' allowed)."""
    return time.strftime("%Y-%m-%dT%H.%M.%SZ", time.gmtime(now))


def command_topic(gateway: str, device: str) -> str:
    return f"fieldgate/{gateway}/cmd/{device}"


def rules_topic(gateway: str, what: str) -> str:
    """``what``: ``set`` or ``rollback``."""
    return f"fieldgate/{gateway}/rules/{what}"


def default_reply_topic(request_topic: str) -> str:
    """Where the gateway answers a request without a Response Topic (docs/downlink.md)."""
    if "/cmd/" in request_topic:
        return f"{request_topic}/reply"
    return request_topic.rsplit("/", 1)[0] + "/reply"


def reply_topic(request_topic: str, username: str | None) -> str:
    """This request's own reply topic: ``<default>/<username>/<nonce>``, or
    ``<default>/<nonce>`` without a user name that can be a topic level."""
    nonce = secrets.token_hex(8)
    base = default_reply_topic(request_topic)
    if username is not None and _LEVEL_RE.fullmatch(username):
        return f"{base}/{username}/{nonce}"
    return f"{base}/{nonce}"


def command_body(action: str, params: Mapping[str, Any], *, ttl: float | None,
                 request_id: str, now: float) -> dict[str, Any]:
    body: dict[str, Any] = {"id": request_id, "ts": now, "action": action,
                            "params": dict(params)}
    if ttl is not None:
        body["ttl"] = ttl
    return body


def parse_command(text: str) -> tuple[str, dict[str, Any]]:
    """(action, params) from ``{"cmd": "set", "on": true}`` (the other keys are the
    params) or ``{"action": "set", "params": {...}}``; ValueError with one line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at character {err.pos}); write e.g. "
                         "'{\"cmd\": \"set\", \"on\": true}'") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object, e.g. '{\"cmd\": \"set\", \"on\": true}'")
    if "cmd" in data and "action" in data:
        raise ValueError("give either \"cmd\" (other keys are the params) or \"action\" with "
                         "\"params\", not both")
    if "cmd" in data:
        action = data.pop("cmd")
        params = data
    elif "action" in data:
        action = data.pop("action")
        params = data.pop("params", {})
        if data:
            raise ValueError(f"with \"action\", only \"params\" may follow; unexpected "
                             f"{', '.join(map(repr, sorted(data)))}")
        if not isinstance(params, dict):
            raise ValueError("\"params\" must be a JSON object")
    else:
        raise ValueError("no \"cmd\" (or \"action\"): name the command, e.g. "
                         "'{\"cmd\": \"set\", \"on\": true}'")
    if not isinstance(action, str) or not action:
        raise ValueError("the command's name (\"cmd\" or \"action\") must be a non-empty "
                         "string")
    return action, params


def encode(body: Mapping[str, Any]) -> bytes:
    """A request's payload: compact UTF-8 JSON; what is signed is exactly these bytes."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class RequestClient:
    """Sends signed requests to gateways through the cloud broker, one at a time."""

    def __init__(self, broker: Broker, signer: Signer, *, client_id: str | None = None) -> None:
        """``client_id``: default a fresh ``fieldgate-ctl-<hex>``, never the ingest worker's
        ``broker.client_id`` (the broker would disconnect the worker)."""
        self._broker = broker
        self._signer = signer
        self._client_id = client_id or f"fieldgate-ctl-{secrets.token_hex(6)}"

    def request(self, topic: str, body: Mapping[str, Any], *, timeout: float,
                reply_to: str | None = None) -> Reply:
        """Publish ``body`` signed on ``topic`` and return the gateway's reply within
        ``timeout`` seconds (all of it: connecting, subscribing, publishing, waiting).
        ``reply_to``: the reply topic, default ``reply_topic(topic, broker user)``."""
        payload = encode(body)
        broker = self._broker
        reply_to = reply_to or reply_topic(topic, broker.username)
        correlation = secrets.token_bytes(_CORRELATION_BYTES)
        deadline = time.monotonic() + timeout
        session = MqttSession(SessionConfig(
            host=broker.host, port=broker.port, client_id=self._client_id,
            keepalive=broker.keepalive, clean_start=True, session_expiry=0,
            username=broker.username,
            password=broker.password.encode() if broker.password is not None else None,
            tls=broker.tls, connect_timeout=max(0.1, min(_CONNECT_TIMEOUT, timeout))))
        exchange = _Exchange(topic, payload, self._signer.sign(topic, payload), reply_to,
                             correlation, broker.username)
        try:
            session.connect()
        except OSError as err:
            raise NotSentError(f"cannot reach the broker {broker.where}: "
                               f"{err.strerror or err}") from None
        except ConnectionLostError as err:
            raise NotSentError(f"cannot reach the broker {err}") from None
        try:
            return exchange.run(session, deadline, timeout)
        finally:
            session.disconnect()


class _Exchange:
    """One request's way through the session: connect, subscribe, publish, reply."""

    def __init__(self, topic: str, payload: bytes, signature: str, reply_to: str,
                 correlation: bytes, username: str | None) -> None:
        self.topic = topic
        self.payload = payload
        self.signature = signature
        self.reply_to = reply_to
        self.correlation = correlation
        self.user = repr(username) if username else "this client"
        self.sub_id: int | None = None
        self.pub_id: int | None = None
        self.published = False   # publish() was called: from now on the outcome is unknown
        self.reply: Reply | None = None

    def run(self, session: MqttSession, deadline: float, timeout: float) -> Reply:
        while self.reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(session, timeout)
            try:
                events = session.run_once(min(left, _SLICE))
            except ConnectRefusedError as err:
                raise NotSentError(self._refused(err)) from None
            except ConnectionLostError as err:
                # Only a reply matters now: the connection is gone, nothing more can be sent.
                for event in err.events:
                    if isinstance(event, Message):
                        self._take(event)
                if self.reply is not None:
                    break
                if self.published:
                    raise NoReplyError(f"lost the broker after sending the request "
                                       f"({err}); its outcome is unknown") from None
                raise NotSentError(f"cannot reach the broker {err}") from None
            self._handle(session, events)
        return self.reply

    def _handle(self, session: MqttSession, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Message):
                session.ack(event)
                self._take(event)
            elif isinstance(event, Subscribed) and event.packet_id == self.sub_id:
                self._subscribed(session, event)
            elif isinstance(event, Published) and event.packet_id == self.pub_id:
                self._check_puback(int(event.reason_code.value))
            elif isinstance(event, Connected):
                self.sub_id = session.subscribe([TopicFilter(
                    self.reply_to, max_qos=QoS.AT_LEAST_ONCE,
                    retain_handling=RetainHandling.SEND_NEVER)])

    def _subscribed(self, session: MqttSession, event: Subscribed) -> None:
        code = int(event.reason_codes[0].value)
        if code >= 0x80:
            raise NotSentError(
                f"the broker refused to subscribe to the reply topic {self.reply_to!r}: "
                f"{reason_name(code)} (0x{code:02x}); its ACL must let {self.user} read "
                "it (deploy/README.md, Cloud control)")
        try:
            self.pub_id = session.publish(
                self.topic, self.payload, qos=1, content_type="application/json",
                user_properties=[(SIGNATURE_PROPERTY, self.signature)],
                response_topic=self.reply_to, correlation_data=self.correlation)
        except PacketTooLargeError as err:
            raise NotSentError(f"the request is too large for the broker: {err}") from None
        self.published = True

    def _check_puback(self, code: int) -> None:
        if code == 0x10:  # No matching subscribers: the request went nowhere
            raise NotSentError(f"no client subscribes to {self.topic!r} on the broker: the "
                               "gateway is not connected to it, or takes no cloud requests")
        if code >= 0x80:
            raise NotSentError(f"the broker refused the request on {self.topic!r}: "
                               f"{reason_name(code)} (0x{code:02x}); its ACL must let "
                               f"{self.user} write it (deploy/README.md, Cloud control)")

    def _take(self, message: Message) -> None:
        if message.topic != self.reply_to or message.correlation_data != self.correlation:
            return
        try:
            body = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise BadReplyError(f"the reply on {message.topic!r} is not a JSON object: "
                                f"{message.payload[:80]!r}")
        self.reply = Reply(message.topic, body, message.payload)

    def _refused(self, err: ConnectRefusedError) -> str:
        code = err.reason_code or 0
        return (f"the broker {err.where} refused the connection: {reason_name(code)} "
                f"(0x{code:02x}); check broker.username and broker.password_file/"
                "password_env (or the client certificate) in the config")

    def _timed_out(self, session: MqttSession, timeout: float) -> DownlinkClientError:
        if not session.connected:
            return NotSentError(f"cannot reach the broker {session.config.host}:"
                                f"{session.config.port}: no answer within {timeout:g} s")
        if not self.published:
            return NotSentError(f"the broker did not confirm the subscription to "
                                f"{self.reply_to!r} within {timeout:g} s")
        return NoReplyError(f"no reply within {timeout:g} s; the request may still be "
                            "acted on (a command until its ttl)")
