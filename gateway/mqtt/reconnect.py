"""When a link tries its broker again: probe often, back off only on a refusal.

An unreachable broker is probed about once a second, jittered so a fleet does not arrive in
step (a refused TCP connect costs one SYN), and right away after a connection that was up
is lost, so readings flow within about a second of the broker coming back. Only a broker
that answers and refuses (bad credentials, not authorised, busy, quota, session taken over)
is asked again with exponential backoff: asking at once would not change its answer.
"""

from __future__ import annotations

import random

from gateway.backoff import Backoff

# An unreachable broker is probed this often (seconds, uniform between the two).
PROBE = (0.5, 1.0)
# After a connection that was up is lost, the first attempt comes this soon.
FIRST_RETRY = (0.0, 0.25)
# Reasons a broker gives that another attempt at once would not change: back off.
# (0x8E: another client took over our client id; 0x95: we sent something too large and
# would send it again at once.)
REFUSALS = frozenset({0x80, 0x83, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x8E, 0x95, 0x97,
                      0x9C, 0x9D, 0x9F})


class Reconnect:
    """Seconds to wait before the next attempt, by what ended the last one."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff

    def connected(self) -> None:
        self.backoff.reset()

    def after_lost(self, reason_code: int | None) -> float:
        """A connection that was up ended (``reason_code``: the broker's DISCONNECT)."""
        if reason_code is not None and reason_code in REFUSALS:
            return self.backoff.next_delay()
        return random.uniform(*FIRST_RETRY)

    def after_failed(self, *, refused: bool) -> float:
        """An attempt did not get to a CONNACK (``refused``: the CONNACK said no)."""
        return self.backoff.next_delay() if refused else random.uniform(*PROBE)
