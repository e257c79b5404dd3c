"""Recognising site messages the broker redelivers that are already in the log.

The site session is acknowledged by hand, after the commit: a gateway killed between the
commit and the PUBACK gets those messages again, flagged DUP, and must not log them twice.
Each logged site message keeps a key (``message_key``) in the log, as an opaque number the
log stores with the message and hands back at start (``LogStore.recent_keys``); what the
key means is decided here.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

# Site messages whose keys are read back at start-up to recognise redeliveries: every packet
# id (1..65535) that can be in flight, with room for the ones reused since.
TAIL_KEYS = 131_072
# A redelivery was logged at most this many site messages before the crash: what was
# committed but whose PUBACK did not reach the broker (the last commits' worth; bounded by
# the site session's in-flight messages, at most 65,535). Half the packet-id space: an
# id's previous use under Mosquitto's turn-by-turn ids is a whole cycle (65,535) back.
_REDELIVERY_WINDOW = 32_768


def message_key(topic: str, payload: bytes, mid: int) -> int:
    """Identifies a site message for redelivery checks: a broker redelivers with the same
    packet id (MQTT 4.4), so the id plus a checksum of topic and payload tells a redelivery
    from a new message that merely carries the same value."""
    return (mid << 32) | zlib.crc32(payload, zlib.crc32(topic.encode()))


class Redeliveries:
    """For each packet id, the checksum of the last site message logged under it (records
    and dead letters alike), with its place in logging order."""

    __slots__ = ("_last_by_mid", "_logged")

    def __init__(self, logged_keys: Sequence[int] = ()) -> None:
        """``logged_keys``: the keys of the last site messages logged, oldest first (the
        log's ``recent_keys(TAIL_KEYS)``), so a restart recognises redeliveries."""
        self._logged = len(logged_keys)   # site messages logged (the order of the next)
        self._last_by_mid: dict[int, tuple[int, int]] = {
            key >> 32: (key & 0xFFFFFFFF, order) for order, key in enumerate(logged_keys)}

    def is_redelivery(self, key: int) -> bool:
        """True when a DUP message is one already logged.

        A broker reuses a packet id only after our PUBACK for its previous message, so a
        redelivery (DUP) carries the id of a message we logged and did not get to
        acknowledge, or of one we never logged. It was logged exactly when the last message
        logged under that id has the same topic and payload. This holds whatever the broker's
        in-flight window (Mosquitto's max_inflight_messages 0 included).

        One case it cannot tell: a message lost before its commit whose packet id last
        carried byte-identical content (a door sensor sending "0"). Mosquitto hands out ids
        in turn, so that previous use is ~65,535 messages old, while a true redelivery was
        logged among the last few commits: a match older than _REDELIVERY_WINDOW messages
        is taken for a new message.
        """
        entry = self._last_by_mid.get(key >> 32)
        return (entry is not None and entry[0] == key & 0xFFFFFFFF
                and entry[1] >= self._logged - _REDELIVERY_WINDOW)

    def logged(self, keys: Iterable[int]) -> None:
        """These messages' keys were made durable, in this order."""
        last = self._last_by_mid
        order = self._logged
        for key in keys:
            if key >> 32:
                last[key >> 32] = (key & 0xFFFFFFFF, order)
                order += 1
        self._logged = order
