"""Commands to actuators: `devices/{device}/cmd`, verified before they change anything.

Wire format (DESIGN.md, devices/README.md). A command is the JSON ``{"id", "ts", "action",
"params"}``; the answer on ``devices/{device}/cmd/ack`` is ``{"id", "ts", "status",
"reason"}``. With keys, both travel in a fixed envelope, ``{"sig":"<64 hex>","cmd":<body>}``
(``"ack"`` for answers), where ``sig`` is HMAC-SHA256(device key, topic + "\\n" + body) over
the exact body bytes in the payload (from byte 80 to the last byte), so firmware never
re-serialises JSON to check it. The topic names the device and the direction: a command for
one device cannot be replayed to another, nor an answer passed off as a command. A device's
key is HMAC-SHA256(site master key, device id) as 64 hex characters; the emulator plays
every device, so it holds the master key, where a real device holds only its own key.

A command is refused when it is unsigned (keys are set), its signature does not match, it
is older than ``command_max_age`` (or as far in the future), or its id was seen before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Ids remembered for replay detection; a command older than max_age is refused as stale
# anyway, so this only needs to hold the ids of one max_age window at the highest rate.
_SEEN_MAX = 100_000

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
    try:
        return payload[len(_SIG_START):len(_SIG_START) + _SIG_HEX].decode("ascii"), \
            payload[_BODY_START:-1]
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""


class CommandVerifier:
    """Checks commands; ``key_for(device)`` is that device's key (None: no keys, unsigned)."""

    def __init__(self, key_for: Callable[[str], bytes] | None, max_age: float) -> None:
        self._key_for = key_for
        self._max_age = max_age
        self._seen: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_master(cls, master: bytes | None, max_age: float) -> CommandVerifier:
        """A verifier for every device of a site, as the emulator needs."""
        if master is None:
            return cls(None, max_age)
        keys: dict[str, bytes] = {}

        def key_for(device: str) -> bytes:
            if device not in keys:
                if len(keys) >= _SEEN_MAX:
                    keys.clear()
                keys[device] = device_key(master, device)
            return keys[device]

        return cls(key_for, max_age)

    def answer(self, device: str, ack: dict[str, Any]) -> bytes:
        """The payload of an answer to publish on devices/<device>/cmd/ack (signed with keys)."""
        body = json.dumps(ack, separators=(",", ":")).encode()
        if self._key_for is None:
            return body
        return seal(self._key_for(device), f"devices/{device}/cmd/ack", body)

    def check(  # noqa: PLR0911 - one return per reason a command is refused
        self, device: str, raw: bytes, now: float
    ) -> tuple[Verdict, dict[str, Any]]:
        topic = f"devices/{device}/cmd"
        sealed = unseal(topic, raw)
        body = raw if sealed is None else sealed[1]
        try:
            command = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return Verdict(False, "not JSON"), {}
        if not isinstance(command, dict):
            return Verdict(False, "not a JSON object"), {}
        cid, ts, action = command.get("id"), command.get("ts"), command.get("action")
        if not isinstance(cid, str) or not isinstance(action, str) \
                or not isinstance(ts, int | float) or isinstance(ts, bool) \
                or not isinstance(command.get("params", {}), dict):
            return Verdict(False, "needs id (string), ts (number), action (string), "
                                  "params (object)"), command
        if self._key_for is not None:
            if sealed is None:
                return Verdict(False, "unsigned"), command
            if not hmac.compare_digest(sealed[0],
                                       signature(self._key_for(device), topic, body)):
                return Verdict(False, "bad signature"), command
        if abs(now - ts) > self._max_age:
            return Verdict(False, "stale"), command
        if cid in self._seen:
            return Verdict(False, "replayed"), command
        self._seen[cid] = None
        if len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        return Verdict(True), command
