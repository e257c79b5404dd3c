"""Dead letters: listing them and sending them again (``gateway log dlq|replay``).

Replay publishes the stored payload to the site broker on its original topic, so it flows
through ingest like any message: after a fix (a new subscription, a larger max_payload, a
repaired device) it is accepted; otherwise it lands in the table again with its reason.

Only site messages can be replayed. A dead letter that a sink wrote (reason
``uplink_rejected:0x..`` or ``sink_rejected``: its destination refused a log record for
good) holds that record, not what a device sent, and its topic names the sink's
destination; published to the site broker it would come back as telemetry it never was.
Nor can a truncated payload or topic be sent as it arrived. ``not_replayable`` says why.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import GatewayConfig
from gateway.errors import FieldgateError
from gateway.log.store import DLQ_TOPIC_CUT

# Reasons of dead letters written by sinks (gateway/sinks/*.py), not by ingest.
_SINK_REASONS = ("uplink_rejected:", "sink_rejected")


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: int
    ts: float
    topic: str
    reason: str
    detail: str
    size: int
    payload: bytes
    replayed: float | None

    @property
    def truncated(self) -> bool:
        return len(self.payload) < self.size


def not_replayable(row: DeadLetterRow) -> str | None:
    """One line saying why ``row`` cannot be replayed, or None if it can."""
    if row.reason.startswith(_SINK_REASONS):
        return (f"skip {row.id}: {row.reason} is a log record that a sink's destination "
                "refused, not a site message")
    if row.truncated:
        return f"skip {row.id}: payload was truncated ({row.size} bytes)"
    if DLQ_TOPIC_CUT in row.detail:
        return f"skip {row.id}: topic was truncated"
    return None


def select(conn: sqlite3.Connection, *, ids: tuple[int, ...] = (), reason: str | None = None,
           since: float | None = None, limit: int | None = None,
           include_replayed: bool = True) -> list[DeadLetterRow]:
    where = []
    args: list[object] = []
    if ids:
        where.append(f"id IN ({','.join('?' * len(ids))})")
        args.extend(ids)
    if reason:
        where.append("reason = ?")
        args.append(reason)
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if not include_replayed:
        where.append("replayed IS NULL")
    sql = "SELECT id, ts, topic, reason, detail, size, payload, replayed FROM dead_letters"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [DeadLetterRow(*row) for row in conn.execute(sql, args)]


def replay(cfg: GatewayConfig, conn: sqlite3.Connection, rows: list[DeadLetterRow],
           timeout: float = 10.0) -> int:
    """Publish the rows to the site broker at QoS 1; mark them replayed; returns the count.
    Rows that cannot be replayed (``not_replayable``) are not sent."""
    rows = [row for row in rows if not_replayable(row) is None]
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"fieldgate-{cfg.gateway_id}-replay", protocol=paho.MQTTv5)
    if cfg.site.username is not None:
        client.username_pw_set(cfg.site.username, cfg.site.password())
    if cfg.site.tls:
        client.tls_set_context(cfg.site.ssl_context("site"))
    # The broker's verdict per publish: a PUBACK can refuse (e.g. 0x87 not authorized).
    verdicts: dict[int, int] = {}
    client.on_publish = lambda _c, _u, mid, rc, _p: verdicts.__setitem__(mid, rc.value)
    try:
        client.connect(cfg.site.host, cfg.site.port, keepalive=30)
    except OSError as err:
        raise FieldgateError(f"Cannot reach site broker {cfg.site.host}:{cfg.site.port}: "
                             f"{err}") from None
    client.loop_start()
    try:
        infos = [(row, client.publish(row.topic, row.payload, qos=1)) for row in rows]
        deadline = time.monotonic() + timeout
        done = []
        refused: set[int] = set()
        for row, info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if info.is_published():
                if verdicts.get(info.mid, 0) < 0x80:
                    done.append(row.id)
                else:
                    refused.add(verdicts[info.mid])
    finally:
        client.disconnect()
        client.loop_stop()
    now = time.time()
    conn.executemany("UPDATE dead_letters SET replayed = ? WHERE id = ?",
                     [(now, i) for i in done])
    conn.commit()
    if refused:
        codes = ", ".join(f"0x{c:02x}" for c in sorted(refused))
        raise FieldgateError(f"The site broker refused {len(infos) - len(done)} of the "
                             f"replayed messages (reason {codes}); check that site.username "
                             "may publish on those topics")
    return len(done)
