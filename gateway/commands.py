"""Commands to devices: signed, published on the site broker, logged as events.

Wire format (DESIGN.md, devices/README.md): ``devices/<id>/cmd`` carries
``{"id", "ts", "action", "params", "sig"}``; ``sig`` is the hex HMAC-SHA256 of
``<device id> + "\\n" + <the command without sig as JSON, sorted keys, no spaces>``.
Devices answer on ``devices/<id>/cmd/ack`` with ``{"id", "ts", "status", "reason"}``.
Every command issued and every answer becomes an event on the uplink.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from collections import OrderedDict
from typing import Any

import orjson

from gateway.events import Event
from gateway.log.store import LogStore
from gateway.mqtt.link import MqttLink

ACK_FILTER = "devices/+/cmd/ack"
_ANSWERS_REMEMBERED = 10_000
ISSUED = "io.fieldgate.command.issued"
ACKNOWLEDGED = "io.fieldgate.command.acknowledged"
REJECTED = "io.fieldgate.command.rejected"


def canonical(device: str, command: dict[str, Any]) -> bytes:
    """What is signed; devices compute the same (devices/commands.py, tested to agree)."""
    body = {k: v for k, v in command.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return device.encode() + b"\n" + text.encode()


def sign(key: bytes, device: str, command: dict[str, Any]) -> str:
    return hmac.new(key, canonical(device, command), hashlib.sha256).hexdigest()


def is_ack_topic(topic: str) -> bool:
    # Asked of every site message: the suffix test alone rejects readings.
    return (topic.endswith("/cmd/ack") and topic.startswith("devices/")
            and topic.count("/") == 3)


class CommandSender:
    def __init__(self, gateway_id: str, key: bytes | None, link: MqttLink,
                 store: LogStore) -> None:
        self._gateway_id = gateway_id
        self._key = key
        self._link = link
        self._store = store
        self._counter = itertools.count(1)
        # Answers already logged, by (device, command id): a redelivered acknowledgement
        # (the site broker resends what was not PUBACKed) is logged once.
        self._answered: OrderedDict[tuple[str, str], None] = OrderedDict()

    def send(self, device: str, action: str, params: dict[str, Any], *,
             cause: dict[str, Any] | None = None, now: float | None = None) -> str:
        """Publish a command (QoS 1) and log it as an event; returns the command id."""
        now = time.time() if now is None else now
        cid = f"{self._gateway_id}-{int(now * 1000)}-{next(self._counter)}"
        command: dict[str, Any] = {"id": cid, "ts": round(now, 3), "action": action,
                                   "params": params}
        if self._key is not None:
            command["sig"] = sign(self._key, device, command)
        self._link.publish(f"devices/{device}/cmd", orjson.dumps(command), qos=1,
                           content_type="application/json")
        self._store.append_events([Event(ISSUED, device, now, {
            "id": cid, "action": action, "params": params, "signed": self._key is not None,
            **({"cause": cause} if cause else {}),
        })])
        return cid

    def acknowledgement(self, topic: str, payload: bytes, now: float) -> Event | None:
        """The event for a device's answer on devices/<id>/cmd/ack (None: seen before)."""
        device = topic.split("/")[1]
        try:
            ack = orjson.loads(payload)
        except orjson.JSONDecodeError:
            ack = None
        if not isinstance(ack, dict):
            return Event(REJECTED, device, now, {"reason": "unreadable acknowledgement"})
        seen = (device, str(ack.get("id")))
        if seen in self._answered:
            return None
        self._answered[seen] = None
        if len(self._answered) > _ANSWERS_REMEMBERED:
            self._answered.popitem(last=False)
        ok = ack.get("status") == "ok"
        data = {"id": ack.get("id"), "status": ack.get("status")}
        if not ok:
            data["reason"] = ack.get("reason")
        return Event(ACKNOWLEDGED if ok else REJECTED, device, now, data)
