"""Run rules over recorded readings, for tuning thresholds on real data.

The CLI's ``gateway rules replay`` decodes a file into ``Columns`` (``gateway.recorded``)
and feeds them here; nothing loops over readings in Python.

The clock. A recording has the readings' own timestamps but not when they arrived, so
replay estimates arrival time: the *replay clock* at a reading is the median timestamp of
the readings around it in the file (``CLOCK_HALF`` on each side), or its own timestamp
when that is earlier, never going back. A
reading's tick is the first multiple of ``interval`` at or after its clock, and it is
ingested at that tick as a live reading is at its arrival, with the live engine's
late/future tolerances. So one reading stamped an hour ahead (a device clock skew) is set
aside as *future* instead of dragging the clock an hour forward, while a real gap in the
recording moves the clock with the readings after it.

Speed. The ingest calls of a whole chunk are prepared at once (``Engine.stage``: filter,
sort, repeat check and per-bucket sums for every tick of the chunk) and each tick's share
is folded in at that tick, which leaves every tick exactly what per-tick ``ingest`` calls
would; a chunk with a repeated reading is ingested call by call (``staged=False`` does that
for every chunk, for comparison).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gateway.engine.engine import Batch, Engine, EngineConfig, Reading
from gateway.engine.events import AlertEvent, CommandEvent, Event
from gateway.engine.rules import Group
from gateway.engine.store import F64, I64, Drops

# Ticks run through the start of a gap in the recording before replay jumps over the rest.
_GAP_TICKS = 3600
# Readings on each side whose median is the replay clock for a reading that looks ahead:
# a burst of fewer skewed readings than this in a row cannot move the clock; a longer one
# is taken for a real jump in time. Larger costs sorting work per suspect reading.
CLOCK_HALF = 16
# A reading is suspect (and gets the median) when one of the next 2 x CLOCK_HALF readings
# is more than this much older; in-order readings keep their own time, at no cost.
CLOCK_SLACK = 1.0


@dataclass(frozen=True, slots=True)
class Columns:
    """Readings in file order: one row per reading, one entry per metric value."""

    devices: list[str]  # names of the device codes
    device: I64  # per reading: code into ``devices``
    ts: F64  # per reading
    metrics: list[str]  # names of the metric codes
    row: I64  # per value: the reading it belongs to
    metric: I64  # per value: code into ``metrics``
    value: F64  # per value

    @property
    def readings(self) -> int:
        return int(self.ts.size)


def columns_of(readings: Iterable[Reading]) -> Columns:
    """Columns of (device, ts, {metric: value}) readings (bools count as 1/0)."""
    devices: dict[str, int] = {}
    metrics: dict[str, int] = {}
    device: list[int] = []
    ts: list[float] = []
    row: list[int] = []
    metric: list[int] = []
    value: list[float] = []
    for i, (name, when, values) in enumerate(readings):
        device.append(devices.setdefault(name, len(devices)))
        ts.append(float(when))
        for key, number in values.items():
            row.append(i)
            metric.append(metrics.setdefault(key, len(metrics)))
            value.append(float(number))
    return Columns(list(devices), np.array(device, dtype=np.int64), np.array(ts, dtype=float),
                   list(metrics), np.array(row, dtype=np.int64),
                   np.array(metric, dtype=np.int64), np.array(value, dtype=float))


def replay_clock(ts: F64) -> F64:
    """The replay clock at each reading (see the module docstring); non-decreasing."""
    n = ts.size
    if n == 0:
        return ts.copy()
    span = 2 * CLOCK_HALF
    # Oldest of the next `span` readings, by doubling: log2(span) vector minimums.
    ahead = np.r_[ts[1:], np.inf]
    reach = 1
    while reach < span:
        step = min(reach, span - reach)
        shifted = np.full(n, np.inf)
        shifted[: max(n - step, 0)] = ahead[step:]
        ahead = np.minimum(ahead, shifted)
        reach += step
    clock = ts.copy()
    suspect = np.flatnonzero(ts > ahead + CLOCK_SLACK)
    if suspect.size:
        # -inf before the first and +inf after the last reading keep the median of an
        # in-order recording on the reading itself at both ends.
        padded = np.r_[np.full(CLOCK_HALF, -np.inf), ts, np.full(CLOCK_HALF, np.inf)]
        windows = sliding_window_view(padded, span + 1)[suspect]
        median = np.partition(windows, CLOCK_HALF, axis=1)[:, CLOCK_HALF]
        clock[suspect] = np.minimum(ts[suspect], median)
    out: F64 = np.maximum.accumulate(clock)
    return out


@dataclass(slots=True)
class ReplaySummary:
    """What a replay read, used and set aside, and the events per rule."""

    readings: int = 0
    values: int = 0
    first: float | None = None
    last: float | None = None
    events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rule, kind)
    drops: Drops = field(default_factory=Drops)
    too_many_devices: int = 0

    @property
    def used(self) -> int:
        d = self.drops
        return self.values - d.late - d.future - d.duplicate - d.unused - self.too_many_devices

    def to_dict(self) -> dict[str, Any]:
        d = self.drops
        return {
            "readings": self.readings, "values": self.values, "values_used": self.used,
            "set_aside": {"late": d.late, "future": d.future, "duplicate": d.duplicate,
                          "unused_metric": d.unused,
                          "too_many_devices": self.too_many_devices},
            "first": self.first, "last": self.last,
            "events": [{"rule": rule, "kind": kind, "count": count}
                       for (rule, kind), count in sorted(self.events.items())],
        }


class Replay:
    """Feed ``Columns`` chunks in file order; events come out tick by tick."""

    def __init__(self, groups: Sequence[Group], *, interval: float = 1.0,
                 config: EngineConfig | None = None,
                 labels: Sequence[tuple[str, Mapping[str, str]]] = (),
                 staged: bool = True) -> None:
        """``labels``: (device glob, labels) pairs; later pairs add to earlier ones, as
        the config's ``device_labels`` do. ``staged``: prepare each chunk's ingest calls
        at once (``Engine.stage``); False ingests tick by tick (same events, slower)."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.interval = interval
        self.engine = Engine(groups, config=config)
        self.labels = [(glob, dict(values)) for glob, values in labels]
        self.staged = staged
        self.chunks_staged = 0  # chunks that took the fast path (the rest had repeats)
        self.summary = ReplaySummary()
        self._ids: dict[str, int] = {}
        self._metric_ids: dict[str, int] = {}
        self._next: int | None = None  # tick number (time = number x interval) not yet run
        self._floor = -math.inf

    def _device(self, name: str) -> int:
        found = self._ids.get(name)
        if found is None:
            labels: dict[str, str] = {}
            for glob, values in self.labels:
                if fnmatch.fnmatchcase(name, glob):
                    labels.update(values)
            if labels:
                self.engine.set_device_labels(name, labels)
            found = self._ids[name] = self.engine.device_id(name)
        return found

    def feed(self, cols: Columns) -> Iterator[Event]:
        """Events of every tick that is complete once ``cols`` is in."""
        s = self.summary
        s.readings += cols.readings
        s.values += int(cols.value.size)
        if cols.readings == 0:
            return
        low, high = float(cols.ts.min()), float(cols.ts.max())
        s.first = low if s.first is None else min(s.first, low)
        s.last = high if s.last is None else max(s.last, high)
        known = list(map(self._ids.get, cols.devices))
        dev_map = np.array([self._device(name) if i is None else i
                            for name, i in zip(cols.devices, known, strict=True)]
                           if None in known else known, dtype=np.int64)
        met_map = np.array([self.engine.metric_id(m) for m in cols.metrics] or [0],
                           dtype=np.int64)
        clock = np.maximum(replay_clock(cols.ts), self._floor)
        self._floor = float(clock[-1])
        tick = np.ceil(clock / self.interval - 1e-9).astype(np.int64)
        if cols.value.size == 0:
            return
        # Readings of one tick are one ingest call; calls are numbered in file order.
        new = np.empty(tick.size, dtype=bool)
        new[0] = True
        np.not_equal(tick[1:], tick[:-1], out=new[1:])
        firsts = np.flatnonzero(new)
        numbers = tick[firsts]
        times = (numbers * self.interval).astype(np.float64)
        e_dev = dev_map[cols.device][cols.row]
        e_met = met_map[cols.metric]
        e_ts = cols.ts[cols.row]
        batch = Batch(e_dev, e_met, e_ts, cols.value)
        staged = self.engine.stage(batch, (np.cumsum(new) - 1)[cols.row], times) \
            if self.staged else None
        self.chunks_staged += staged is not None
        bounds = [*np.searchsorted(cols.row, firsts).tolist(), int(cols.value.size)]
        for j, ((lo, hi), number) in enumerate(zip(itertools.pairwise(bounds),
                                                   numbers.tolist(), strict=True)):
            if hi == lo:
                continue  # readings without values: no call
            if self._next == number - 1:  # the usual case: one tick to run first
                yield from self._tick(number - 1)
                self._next = number
            else:
                yield from self._run_until(number)
            if staged is not None:
                self.engine.ingest_staged(staged, j, number * self.interval)
            else:
                self.engine.ingest(Batch(e_dev[lo:hi], e_met[lo:hi], e_ts[lo:hi],
                                         cols.value[lo:hi]), number * self.interval)

    def _run_until(self, number: int) -> Iterator[Event]:
        """Run every pending tick before tick ``number``, jumping long silences."""
        if self._next is None:
            self._next = number
        while self._next < number:
            yield from self._tick(self._next)
            self._next += 1
            if number - self._next > _GAP_TICKS:
                # A long silence: tick through its first part (absent/offline fire there),
                # then jump to the next reading instead of ticking every interval of it.
                for _ in range(_GAP_TICKS):
                    yield from self._tick(self._next)
                    self._next += 1
                self._next = number

    def _tick(self, number: int) -> Iterator[Event]:
        for event in self.engine.tick(number * self.interval):
            rule = f"{event.group}/{event.rule}" \
                if isinstance(event, AlertEvent | CommandEvent) else ""
            self.summary.events[(rule, str(event.kind))] += 1
            yield event

    def finish(self) -> Iterator[Event]:
        """The last tick; the summary is complete after this."""
        if self._next is not None:
            yield from self._tick(self._next)
            self._next += 1
        self.summary.drops = self.engine.drops
        self.summary.too_many_devices = self.engine.dropped_devices


def replay(groups: Sequence[Group], readings: Iterable[Reading], *, interval: float = 1.0,
           config: EngineConfig | None = None,
           labels: Sequence[tuple[str, Mapping[str, str]]] = ()) -> Iterator[Event]:
    """Events the rules produce over ``readings`` (in recorded order)."""
    run = Replay(groups, interval=interval, config=config, labels=labels)
    yield from run.feed(columns_of(readings))
    yield from run.finish()
