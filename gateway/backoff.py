"""Capped exponential backoff with jitter, for anything that retries (links, sinks)."""

from __future__ import annotations

import random


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
