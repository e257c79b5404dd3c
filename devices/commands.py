"""Commands to actuators: `devices/{device}/cmd`, verified before they change anything.

Wire format (DESIGN.md): JSON ``{"id", "ts", "action", "params", "sig"}``. With a key
configured, ``sig`` is the hex HMAC-SHA256 of ``device + "\\n" + canonical`` where canonical
is the command without ``sig`` as JSON with sorted keys and no spaces (UTF-8). Binding the
device id means a command captured for one device cannot be replayed to another. A command
is refused when it is unsigned (a key is set), its signature does not match, it is older
than ``command_max_age`` (or as far in the future), or its id was seen before.
Acknowledgements go to `devices/{device}/cmd/ack`: ``{"id", "ts", "status", "reason"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Ids remembered for replay detection; a command older than max_age is refused as stale
# anyway, so this only needs to hold the ids of one max_age window at the highest rate.
_SEEN_MAX = 100_000


def canonical(device: str, command: dict[str, Any]) -> bytes:
    body = {k: v for k, v in command.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return device.encode() + b"\n" + text.encode()


def sign(key: bytes, device: str, command: dict[str, Any]) -> str:
    return hmac.new(key, canonical(device, command), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""


class CommandVerifier:
    def __init__(self, key: bytes | None, max_age: float) -> None:
        self._key = key
        self._max_age = max_age
        self._seen: OrderedDict[str, None] = OrderedDict()

    def check(  # noqa: PLR0911 - one return per reason a command is refused
        self, device: str, raw: bytes, now: float
    ) -> tuple[Verdict, dict[str, Any]]:
        try:
            command = json.loads(raw)
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
        if self._key is not None:
            sig = command.get("sig")
            if not isinstance(sig, str):
                return Verdict(False, "unsigned"), command
            if not hmac.compare_digest(sig, sign(self._key, device, command)):
                return Verdict(False, "bad signature"), command
        if abs(now - ts) > self._max_age:
            return Verdict(False, "stale"), command
        if cid in self._seen:
            return Verdict(False, "replayed"), command
        self._seen[cid] = None
        if len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        return Verdict(True), command
