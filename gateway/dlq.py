"""Dead letters: listing them and sending them again (``gateway log dlq|replay``).

Replay publishes the stored payload to the site broker on its original topic, so it flows
through ingest like any message: after a fix (a new subscription, a larger max_payload, a
repaired device) it is accepted; otherwise it lands in the table again with its reason.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import GatewayConfig
from gateway.errors import FieldgateError


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
    """Publish the rows to the site broker at QoS 1; mark them replayed; returns the count."""
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
