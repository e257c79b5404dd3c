"""Freshness of cloud requests: a timestamp window and the ids seen inside it.

A request is fresh when its ``ts`` is within ``max_clock_skew`` of the gateway's clock and
its ``id`` was not seen before. An id is remembered for as long as its ``ts`` would still be
accepted (after that the timestamp alone refuses a replay), so the memory is bounded by the
requests of one window, and it is saved with the log (``state``, committed with the
request's events): a replay is refused after a restart too.
"""

from __future__ import annotations

import orjson

STATE_NAME = "downlink"
# Ids remembered at most: 10,000 requests in one window (5 minutes by default: 33 a second
# for five minutes) is far beyond what operators send. When full, requests are refused as
# "busy" rather than forgetting ids early (which would let a replay through).
MAX_IDS = 10_000


class ReplayGuard:
    def __init__(self, skew: float, saved: bytes | None = None) -> None:
        self._skew = skew
        self._seen: dict[str, float] = {}
        if saved is not None:
            try:
                for rid, ts in orjson.loads(saved)["ids"]:
                    self._seen[str(rid)] = float(ts)
            except (ValueError, KeyError, TypeError):
                self._seen.clear()

    def problem(self, rid: str, ts: float, now: float) -> tuple[str, str] | None:
        """None when the request is fresh; else (reason code, one line)."""
        if ts < now - self._skew:
            return "stale", (f"stale: signed {_seconds(now - ts)} s ago, more than "
                             f"downlink.max_clock_skew {self._skew:g} s")
        if ts > now + self._skew:
            return "future", (f"from the future: signed {_seconds(ts - now)} s ahead of the "
                              f"gateway's clock, more than downlink.max_clock_skew "
                              f"{self._skew:g} s (check both clocks)")
        if rid in self._seen:
            return "replayed", f"replayed: request id {rid!r} was taken already"
        self._forget(now)
        if len(self._seen) >= MAX_IDS:
            return "busy", (f"busy: {MAX_IDS} requests in the last "
                            f"{self._skew:g} s; send again later")
        return None

    def remember(self, rid: str, ts: float) -> None:
        self._seen[rid] = ts

    def _forget(self, now: float) -> None:
        oldest = now - self._skew
        if self._seen and min(self._seen.values()) < oldest:
            self._seen = {rid: ts for rid, ts in self._seen.items() if ts >= oldest}

    def state(self) -> tuple[str, bytes]:
        return STATE_NAME, orjson.dumps({"ids": list(self._seen.items())})


def _seconds(value: float) -> str:
    """A time difference for a reason line: whole seconds, or three digits and an exponent
    when it is absurd (a ts of 1e300 would otherwise print 301 digits)."""
    return f"{value:.0f}" if value < 1e12 else f"{value:.3g}"
