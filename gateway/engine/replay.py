"""Run rules over recorded readings, for tuning thresholds on real data.

The CLI's ``gateway rules replay`` reads a JSONL/CSV file into readings and prints what this
yields; the engine clock follows the readings' own timestamps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

from gateway.engine.engine import Engine, EngineConfig, Reading
from gateway.engine.events import Event
from gateway.engine.rules import Group

# Ticks run through the start of a gap in the recording before replay jumps over the rest.
_GAP_TICKS = 3600


def replay(groups: Sequence[Group], readings: Iterable[Reading], *, interval: float = 1.0,
           config: EngineConfig | None = None) -> Iterator[Event]:
    """Events the rules produce over ``readings`` (in recorded order).

    Ticks fall on multiples of ``interval`` in reading time; a tick at ``T`` sees every
    reading up to ``T``. Readings may be out of order within the engine's late tolerance,
    as live ones may.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    engine = Engine(groups, config=config)
    pending: list[Reading] = []
    next_tick = math.nan
    for reading in readings:
        ts = reading[1]
        if math.isnan(next_tick):
            next_tick = math.ceil(ts / interval) * interval
        while ts > next_tick:
            engine.ingest(engine.batch(pending), next_tick)
            pending = []
            yield from engine.tick(next_tick)
            next_tick += interval
            if ts - next_tick > _GAP_TICKS * interval:
                # A long silence: tick through its first part (absent/offline fire there),
                # then jump to the next reading instead of ticking every interval of it.
                for _ in range(_GAP_TICKS):
                    yield from engine.tick(next_tick)
                    next_tick += interval
                next_tick = math.ceil(ts / interval) * interval
        pending.append(reading)
    if not math.isnan(next_tick):
        engine.ingest(engine.batch(pending), next_tick)
        yield from engine.tick(next_tick)
