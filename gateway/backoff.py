"""Capped exponential backoff with jitter, for anything that retries (links, sinks), and a
rate budget for answers that must not become a flood."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """Capped exponential backoff with jitter: delay n is uniform in [d/2, d], d = min·2ⁿ."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self._min = minimum
        self._max = maximum
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self._max, self._min * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


class RateBudget:
    """A token bucket: ``take()`` is True at most ``rate`` times a second on average, with
    bursts up to ``rate`` (answers to requests that may come as a flood)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
