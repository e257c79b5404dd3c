"""Gap repair, the gateway's side: answering ``fieldgate/<gateway_id>/resend``.

A cloud consumer that sees a gap in a gateway's ``seq`` asks for the range, as JSON
``{"request_id": "...", "from": <first seq>, "to": <last seq, inclusive>}`` at QoS 1,
with the MQTT v5 Response Topic and Correlation Data of its choice. The gateway re-publishes
what its log still holds in the range on the usual telemetry and events topics, the same
messages the uplink sends (``UplinkSide.message``) with the user property ``resend`` =
request_id, without moving the uplink's cursor; then it answers on the Response Topic (else
``fieldgate/<gateway_id>/resend/reply``), with the Correlation Data (else the request_id):
``{"request_id", "from", "to", "resent", "missing": [[a, b], ...]}`` — ``resent`` counts the
records the cloud broker acknowledged, ``missing`` the inclusive ranges the log no longer
holds (removed at its cap or max_age; seqs not logged yet are reported missing too) — or
``{"request_id"?, "error": "<one line>"}``. ``"refused": n`` is added when the broker
refused some re-sent records (they stay in the log; ask again later).

Bounds: one request at a time and at most one started per ``_MIN_INTERVAL``; others are
answered ``{"error": "busy"}``. At most ``MAX_SEQS`` seqs per request. Error and busy
answers are rate limited (``_REPLY_BUDGET``); requests beyond it are counted, unanswered.
Re-sent batches share the uplink's window (the broker's Receive Maximum): a resend holds
at most half of it, so the live uplink keeps flowing.

This module knows no concrete sink: the uplink hands itself in as an ``UplinkSide``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeGuard

import orjson

from gateway.backoff import RateBudget
from gateway.log.reader import LogReader, Row
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import InboundMessage, MqttLink, valid_topic_name

log = logging.getLogger(__name__)

# Most seqs one request may ask for: bounds the work (and the cloud traffic) of one request.
MAX_SEQS = 1_000_000
# Requests start at most this often (seconds); a worker asking faster gets "busy".
_MIN_INTERVAL = 1.0
# Error and "busy" answers per second at most: a flood of requests must not become a flood
# of answers (each a QoS 1 publish held until its PUBACK). More are counted, unanswered.
_REPLY_BUDGET = 10.0
# A request is a small JSON object; anything larger is refused unread.
_MAX_REQUEST = 4096
_MAX_ID = 200
# Response topics longer than this are refused: the answer must fit any broker's packet.
_MAX_TOPIC = 1024
CONTENT_TYPE = "application/json"


class Result(StrEnum):
    """``fieldgate_resend_requests_total{result}``."""

    DONE = "done"              # answered with resent and missing
    BUSY = "busy"              # another request was running or started under a second ago
    ERROR = "error"            # malformed or out of bounds
    UNANSWERED = "unanswered"  # busy or error, over the answer budget: counted only


class UplinkMessage(Protocol):
    """One uplink message built from log rows (what ``UplinkSide.message`` returns)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def props(self) -> list[tuple[str, str]]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def end(self) -> int: ...
    @property
    def readings(self) -> int: ...
    @property
    def size(self) -> int: ...
    def wire_size(self) -> int: ...


class UplinkSide(Protocol):
    """What a resend needs of the uplink: its link, its messages, its bounds and window."""

    link: MqttLink

    def message(self, rows: Sequence[Row],
                extra: Sequence[tuple[str, str]] = ()) -> UplinkMessage: ...
    def batch_bounds(self) -> tuple[int, int]: ...
    def window(self) -> int: ...
    def live_inflight(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Request:
    request_id: str
    first: int
    last: int
    reply_topic: str
    correlation: bytes


class BadRequest(ValueError):  # noqa: N818 (a request, not an error of ours)
    """A request refused unread: ``kind`` names the class of fault (logged once each)."""

    def __init__(self, kind: str, why: str, request_id: str | None = None,
                 reply_topic: str | None = None) -> None:
        super().__init__(why)
        self.kind = kind
        self.why = why
        self.request_id = request_id
        self.reply_topic = reply_topic


def parse(msg: InboundMessage, default_reply: str) -> Request:
    """The request in ``msg``, or ``BadRequest``."""
    reply_topic = default_reply
    if msg.response_topic is not None:
        if not valid_topic_name(msg.response_topic, _MAX_TOPIC):
            raise BadRequest("bad_response_topic", "the Response Topic is not a topic name "
                             f"one can publish to (no + or #, at most {_MAX_TOPIC} bytes)")
        reply_topic = msg.response_topic
    if len(msg.payload) > _MAX_REQUEST:
        raise BadRequest("too_large", f"a request is at most {_MAX_REQUEST} bytes",
                         reply_topic=reply_topic)
    try:
        body = orjson.loads(msg.payload)
    except orjson.JSONDecodeError:
        raise BadRequest("not_json", "the request is not JSON", reply_topic=reply_topic) \
            from None
    if not isinstance(body, dict):
        raise BadRequest("not_object", 'the request is not a JSON object {"request_id", '
                         '"from", "to"}', reply_topic=reply_topic)
    rid = body.get("request_id")
    if not isinstance(rid, str) or not 0 < len(rid) <= _MAX_ID:
        raise BadRequest("bad_request_id", f"request_id must be a string of 1 to {_MAX_ID} "
                         "characters", reply_topic=reply_topic)
    first, last = body.get("from"), body.get("to")
    if not _seq(first) or not _seq(last):
        raise BadRequest("bad_range", '"from" and "to" must be sequence numbers (integers '
                         f'>= 1, at most {MAX_SEQ})', rid, reply_topic)
    if last < first:
        raise BadRequest("bad_range", f'"to" {last} is before "from" {first}', rid,
                         reply_topic)
    if last - first + 1 > MAX_SEQS:
        raise BadRequest("too_many", f"{last - first + 1} seqs asked, at most {MAX_SEQS:,} "
                         "per request: ask in parts", rid, reply_topic)
    correlation = msg.correlation_data if msg.correlation_data is not None else rid.encode()
    return Request(rid, first, last, reply_topic, correlation)


# The largest seq a request may name: exact in a JSON number and in SQLite's INTEGER (2**63
# reached the log's reader and stopped the gateway with an OverflowError).
MAX_SEQ = 2**53


def _seq(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEQ


@dataclass(slots=True)
class _Job:
    request: Request
    next: int                                   # next seq to read
    started: float
    inflight: dict[int, int] = field(default_factory=dict)  # packet id -> records
    resent: int = 0
    refused: int = 0
    missing: list[list[int]] = field(default_factory=list)
    byte_bound: int | None = None               # after a batch over Maximum Packet Size

    def lost(self, first: int, last: int) -> None:
        if self.missing and self.missing[-1][1] == first - 1:
            self.missing[-1][1] = last
        else:
            self.missing.append([first, last])


class Resender:
    """Answers resend requests, one at a time, on the uplink's link and within its window."""

    def __init__(self, uplink: UplinkSide, reader: LogReader, metrics: GatewayMetrics,
                 gateway_id: str) -> None:
        self._uplink = uplink
        self._reader = reader
        self._metrics = metrics
        self.topic = f"fieldgate/{gateway_id}/resend"
        self._default_reply = f"{self.topic}/reply"
        self._job: _Job | None = None
        self._last_start = -_MIN_INTERVAL
        self._budget = RateBudget(_REPLY_BUDGET)
        self._logged_kinds: set[str] = set()

    @property
    def inflight(self) -> int:
        """Re-sent batches waiting for their PUBACK."""
        return len(self._job.inflight) if self._job is not None else 0

    @property
    def running(self) -> bool:
        return self._job is not None

    # -- requests -------------------------------------------------------------------------------

    def on_message(self, msg: InboundMessage) -> None:
        if msg.topic != self.topic:
            return
        now = time.monotonic()
        try:
            request = parse(msg, self._default_reply)
        except BadRequest as bad:
            if bad.kind not in self._logged_kinds:   # later ones: counted on /metrics
                self._logged_kinds.add(bad.kind)
                log.warning("Refused a resend request (%s): %s; later ones like it are only "
                            "counted (fieldgate_resend_requests_total)", bad.kind, bad.why)
            body: dict[str, Any] = {"error": bad.why}
            if bad.request_id is not None:
                body = {"request_id": bad.request_id, **body}
            correlation = msg.correlation_data if msg.correlation_data is not None else (
                bad.request_id.encode() if bad.request_id is not None else None)
            self._answer_refusal(Result.ERROR, bad.reply_topic or self._default_reply,
                                 body, correlation, now)
            return
        if self._job is not None or now - self._last_start < _MIN_INTERVAL:
            self._answer_refusal(Result.BUSY, request.reply_topic,
                                 {"request_id": request.request_id, "error": "busy"},
                                 request.correlation, now)
            return
        self._last_start = now
        self._job = _Job(request, request.first, now)

    def _answer_refusal(self, result: Result, topic: str, body: dict[str, Any],
                        correlation: bytes | None, now: float) -> None:
        if not self._budget.take():
            self._metrics.resend_requests.labels(Result.UNANSWERED.value).inc()
            return
        self._metrics.resend_requests.labels(result.value).inc()
        self._reply(topic, body, correlation)

    def _reply(self, topic: str, body: dict[str, Any], correlation: bytes | None) -> None:
        self._uplink.link.publish(topic, orjson.dumps(body), qos=1, content_type=CONTENT_TYPE,
                                  correlation_data=correlation)
        self._uplink.link.flush()

    # -- re-sending -----------------------------------------------------------------------------

    def _room(self, *, after_uplink: bool) -> bool:
        """Whether one more re-sent batch fits: at most half the window (the uplink asks
        before its own turn, so the resend gets its half and the live uplink the rest); a
        window of one goes to the live uplink first, to a resend only when that left it."""
        window = self._uplink.window()
        if self._uplink.live_inflight() + self.inflight >= window:
            return False
        if window == 1:
            return after_uplink
        return self.inflight < window // 2

    def due(self) -> bool:
        """Whether ``pump`` would publish now."""
        job = self._job
        return (job is not None and job.next <= job.request.last
                and self._uplink.link.connected and self._room(after_uplink=True))

    def pump(self, *, after_uplink: bool) -> bool:
        """Publish what the window allows of the running request (the uplink calls this
        before and after its own turn); True if anything went."""
        job = self._job
        if job is None or not self._uplink.link.connected:
            return False
        sent = False
        request = job.request
        extra = [("resend", request.request_id)]
        end = request.last + 1
        while job.next < end and self._room(after_uplink=after_uplink):
            max_readings, max_bytes = self._uplink.batch_bounds()
            if job.byte_bound is not None:
                max_bytes = min(max_bytes, job.byte_bound)
            rows = self._reader.read_within(job.next, end, max_readings=max_readings,
                                            max_bytes=max_bytes)
            if not rows:
                job.lost(job.next, request.last)
                job.next = end
                break
            if rows[0].seq > job.next:
                job.lost(job.next, rows[0].seq - 1)
            out = self._uplink.message(rows, extra)
            limit = self._uplink.link.server_max_packet
            if limit is not None and out.wire_size() > limit:
                if sum(r.n for r in rows) > 1:   # the estimate was short: fewer, at once
                    job.byte_bound = max(1, out.size // 2)
                    continue
                # One record over the broker's limit: the uplink dead-lettered it.
                job.refused += 1
                job.next = out.end
                continue
            mid = self._uplink.link.publish(out.topic, out.payload, qos=1,
                                            user_properties=out.props,
                                            content_type=out.content_type)
            job.inflight[mid] = out.readings
            job.next = out.end
            sent = True
        self._finish_if_done()
        return sent

    def on_published(self, mid: int, reason: int) -> bool:
        """A PUBACK; True if it was for a re-sent batch."""
        job = self._job
        if job is None or mid not in job.inflight:
            return False
        records = job.inflight.pop(mid)
        if reason < 0x80:
            job.resent += records
            self._metrics.resent_records.inc(records)
        else:
            job.refused += records
        self._finish_if_done()
        return True

    def _finish_if_done(self) -> None:
        job = self._job
        if job is None or job.next <= job.request.last or job.inflight:
            return
        self._job = None
        request = job.request
        body: dict[str, Any] = {"request_id": request.request_id, "from": request.first,
                                "to": request.last, "resent": job.resent,
                                "missing": job.missing}
        if job.refused:
            body["refused"] = job.refused
        self._metrics.resend_requests.labels(Result.DONE.value).inc()
        self._reply(request.reply_topic, body, request.correlation)
        missing = sum(b - a + 1 for a, b in job.missing)
        log.info("Resend %r: seq %d-%d: %d records re-sent, %d no longer in the log%s",
                 request.request_id[:80], request.first, request.last, job.resent, missing,
                 f", {job.refused} refused by the cloud broker" if job.refused else "")

    def close(self) -> None:
        self._reader.close()
