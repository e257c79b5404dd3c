"""Columnar series state: per metric and resolution, one row per device of bucketed rings.

Every bucket keeps only the statistics the rules need (count, sum, sum of squares, min,
max, and the last/first reading with its timestamp), so memory is ``devices x buckets x
planes`` no matter how many readings arrive.

Each window gets its own resolution (``width_for``): the largest round bucket width that
still gives the window at least ``MIN_BUCKETS`` buckets, so ``avg(t, 20s)`` runs on 2 s
buckets while ``avg(t, 1h)`` runs on 5 min ones, and every window holds 10-25 buckets
whatever its length. A metric read at several resolutions has one ring per resolution;
all rings of one width share a clock: the ring's ``head`` is the newest bucket that may be
written, and advancing it clears the slots that are reused, so a slot is valid without a
per-slot bucket id.

A window of ``d`` seconds at time ``now`` covers the ``ceil(d / width)`` buckets ending
with the bucket of ``now`` (windows are bucket-aligned; the reference evaluator uses the
same rule).

Duplicates: a reading with the device, metric and timestamp of one already counted is
left out. The store recognises a repeat within a batch and against the ``DEDUP_DEPTH``
newest timestamps it holds per device and metric (a republished message, a redelivery).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Container
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

# Bucket widths to pick from: round numbers read well in docs and logs. Neighbours differ
# by at most 2.5x, so a window gets between MIN_BUCKETS and 2.5 x MIN_BUCKETS buckets.
NICE_WIDTHS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0,
               120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0, 43200.0)
# Buckets a window spans at least: its edge is then exact to a tenth of its length. More
# costs memory and tick time in proportion; fewer makes `avg(t, 20s)` a 4-bucket guess.
MIN_BUCKETS = 10
# Newest timestamps remembered per device and metric to recognise duplicates. Deeper
# catches repeats that arrive later (after more newer readings) and costs 8 bytes per
# device, metric and step, plus that many comparisons per reading.
DEDUP_DEPTH = 8

# Which per-bucket planes each window function reads.
PLANES: dict[str, frozenset[str]] = {
    "count": frozenset({"cnt"}),
    "absent": frozenset({"cnt"}),
    "sum": frozenset({"sum"}),
    "avg": frozenset({"cnt", "sum"}),
    "min": frozenset({"min"}),
    "max": frozenset({"max"}),
    "std": frozenset({"cnt", "sum", "sumsq"}),
    "last": frozenset({"last", "last_ts"}),
    "delta": frozenset({"last", "last_ts", "first", "first_ts"}),
    "rate": frozenset({"last", "last_ts", "first", "first_ts"}),
    "zscore": frozenset({"cnt", "sum", "sumsq", "last", "last_ts"}),
}
EMPTY: dict[str, float] = {
    "cnt": 0.0, "sum": 0.0, "sumsq": 0.0, "min": math.inf, "max": -math.inf,
    "last": math.nan, "last_ts": -math.inf, "first": math.nan, "first_ts": math.inf,
}


@functools.lru_cache(maxsize=1024)
def width_for(seconds: float) -> float:
    """Bucket width of a window: the largest round width giving it MIN_BUCKETS buckets."""
    fine = [w for w in NICE_WIDTHS if w <= seconds / MIN_BUCKETS + 1e-12]
    return fine[-1] if fine else NICE_WIDTHS[0]


def bucket_of(ts: F64 | float, width: float) -> I64:
    """Bucket number of each timestamp (shared with the reference evaluator)."""
    return np.floor(np.asarray(ts, dtype=np.float64) / width).astype(np.int64)


def buckets_for(seconds: float, width: float) -> int:
    """How many buckets a window of ``seconds`` spans."""
    return max(1, math.ceil(seconds / width - 1e-9))


def run_starts(changed: B) -> I64:
    """Start of each run of a sorted array, from ``changed[i] = a[i + 1] != a[i]``."""
    flags = np.empty(changed.size + 1, dtype=bool)
    flags[0] = True
    flags[1:] = changed
    return np.flatnonzero(flags)


def run_aggregates(planes: Container[str], ts: F64, val: F64,
                   starts: I64, ends: I64) -> dict[str, F64]:
    """Each run's aggregates (runs ``starts[i] .. ends[i]``), for the planes a ring keeps."""
    agg: dict[str, F64] = {}
    if "cnt" in planes:
        agg["cnt"] = (ends - starts + 1).astype(np.float64)
    if "sum" in planes:
        agg["sum"] = np.add.reduceat(val, starts)
    if "sumsq" in planes:
        agg["sumsq"] = np.add.reduceat(val * val, starts)
    if "min" in planes:
        agg["min"] = np.minimum.reduceat(val, starts)
    if "max" in planes:
        agg["max"] = np.maximum.reduceat(val, starts)
    if "last" in planes:
        agg["last"], agg["last_ts"] = val[ends], ts[ends]
    if "first" in planes:
        agg["first"], agg["first_ts"] = val[starts], ts[starts]
    return agg


def run_ends(starts: I64, size: int) -> I64:
    """Last index of each run (inclusive)."""
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:] - 1
    ends[-1] = size - 1
    return ends


@dataclass(slots=True)
class Drops:
    """Readings kept out of rule state (they are still forwarded by the data path)."""

    late: int = 0
    future: int = 0
    unused: int = 0  # metric no rule reads
    duplicate: int = 0  # same device, metric and timestamp as a reading already counted

    @property
    def set_aside(self) -> int:
        """Readings of metrics the rules read that were left out (late, future, repeats)."""
        return self.late + self.future + self.duplicate


def _flat(plane: F64) -> F64:
    """A 1-D view of a (C-ordered) plane: writes through it land in the plane."""
    assert plane.flags.c_contiguous
    return plane.reshape(-1)


def _put_where(which: B, at: I64, *pairs: tuple[F64, F64]) -> None:
    """``plane.flat[at[which]] = values[which]`` for each (plane, values) pair."""
    if which.all():
        for plane, values in pairs:
            _flat(plane)[at] = values
    elif which.any():
        at = at[which]
        for plane, values in pairs:
            _flat(plane)[at] = values[which]


class MetricRing:
    """Ring buffers of one metric: ``planes[name]`` has shape ``(devices, slots)``."""

    def __init__(self, planes: frozenset[str], slots: int, devices: int) -> None:
        self.slots = slots
        self.planes = {p: np.full((devices, slots), EMPTY[p]) for p in sorted(planes)}

    def grow(self, devices: int) -> None:
        for name, old in self.planes.items():
            new = np.full((devices, self.slots), EMPTY[name])
            new[: old.shape[0]] = old
            self.planes[name] = new

    def clear(self, first: int, last: int) -> None:
        """Empty buckets ``first..last`` (inclusive) before they are reused."""
        if last - first + 1 >= self.slots:
            cols: slice | I64 = slice(None)
        else:
            cols = np.arange(first, last + 1, dtype=np.int64) % self.slots
        for name, plane in self.planes.items():
            plane[:, cols] = EMPTY[name]

    def merge(self, rows: I64, buckets: I64, agg: dict[str, F64]) -> None:
        """Fold per-(row, bucket) aggregates in; ``(rows, buckets)`` pairs are unique."""
        self.merge_at(rows * self.slots + buckets % self.slots, agg)

    def merge_at(self, at: I64, agg: dict[str, F64]) -> None:
        """``merge`` by flat positions ``row * slots + slot`` (unique)."""
        p = self.planes
        for name in ("cnt", "sum", "sumsq"):
            if name in p:
                flat = _flat(p[name])
                flat[at] = flat[at] + agg[name]
        if "min" in p:
            flat = _flat(p["min"])
            flat[at] = np.minimum(flat[at], agg["min"])
        if "max" in p:
            flat = _flat(p["max"])
            flat[at] = np.maximum(flat[at], agg["max"])
        if "last" in p:
            # Ties on timestamp go to the reading that arrived later.
            _put_where(agg["last_ts"] >= _flat(p["last_ts"])[at], at,
                       (p["last"], agg["last"]), (p["last_ts"], agg["last_ts"]))
        if "first" in p:
            _put_where(agg["first_ts"] < _flat(p["first_ts"])[at], at,
                       (p["first"], agg["first"]), (p["first_ts"], agg["first_ts"]))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.planes.values())


class Resolution:
    """The rings of one bucket width and their shared clock."""

    def __init__(self, width: float) -> None:
        self.width = width
        self.head: int | None = None
        self.rings: dict[int, MetricRing] = {}

    def advance(self, now: float, future: float) -> None:
        head = math.floor((now + future) / self.width)
        if self.head is None:
            self.head = head
            return
        if head > self.head:
            for ring in self.rings.values():
                ring.clear(self.head + 1, head)
            self.head = head


class SeriesStore:
    """All metric rings by resolution, plus per-metric duplicate memory."""

    def __init__(self, *, needs: dict[int, tuple[frozenset[str], list[float]]],
                 late: float, future: float, devices: int = 64,
                 width: float | None = None) -> None:
        """``needs`` maps a metric index to (planes, its window lengths in seconds);
        ``width`` fixes one bucket width for every window (default: ``width_for``)."""
        self.fixed_width = width
        self.late = late
        self.future = future
        self.capacity = devices
        self.resolutions: dict[float, Resolution] = {}
        for m, (planes, lengths) in sorted(needs.items()):
            longest: dict[float, float] = {}
            for seconds in lengths:
                w = self.width_of(seconds)
                longest[w] = max(longest.get(w, 0.0), seconds)
            for w, seconds in sorted(longest.items()):
                res = self.resolutions.setdefault(w, Resolution(w))
                # Future buckets need slots; late readings do not: a bucket older than the
                # longest window can never count again (ticks only move forward).
                margin = math.ceil(future / w) + 2
                res.rings[m] = MetricRing(planes, buckets_for(seconds, w) + margin, devices)
        self.metrics = sorted(needs)
        # seen[m][d]: device d has had a reading of metric m counted (see vector.py).
        self.seen: dict[int, B] = {m: np.zeros(devices, dtype=bool) for m in needs}
        # recent[m][d]: the newest distinct timestamps counted, -inf where none yet.
        self.recent: dict[int, F64] = {m: np.full((devices, DEDUP_DEPTH), -math.inf)
                                       for m in needs}
        self.drops = Drops()

    def width_of(self, seconds: float) -> float:
        return self.fixed_width or width_for(seconds)

    @property
    def rings(self) -> dict[int, MetricRing]:
        """The finest ring of each metric (for inspection and tests)."""
        out: dict[int, MetricRing] = {}
        for w in sorted(self.resolutions, reverse=True):
            out.update(self.resolutions[w].rings)
        return out

    def ensure_devices(self, count: int) -> None:
        if count > self.capacity:
            old = self.capacity
            self.capacity = max(count, 2 * self.capacity)
            for res in self.resolutions.values():
                for ring in res.rings.values():
                    ring.grow(self.capacity)
            for m, seen in self.seen.items():
                self.seen[m] = np.zeros(self.capacity, dtype=bool)
                self.seen[m][:old] = seen
                recent = np.full((self.capacity, DEDUP_DEPTH), -math.inf)
                recent[:old] = self.recent[m]
                self.recent[m] = recent

    def advance(self, now: float) -> None:
        """Move the clocks so buckets up to ``now + future`` may be written."""
        for res in self.resolutions.values():
            res.advance(now, self.future)

    def ingest(self, dev: I64, met: I64, ts: F64, val: F64, now: float) -> None:
        """Fold a batch in: late/future/unused/duplicate readings are counted and left out."""
        self.advance(now)
        late = ts < now - self.late
        future = ts > now + self.future
        n_met = int(met.max()) + 1 if met.size else 0
        used_table = np.zeros(max(n_met, 1), dtype=bool)
        used_table[[m for m in self.seen if m < n_met]] = True
        used = used_table[met] if met.size else np.zeros(0, dtype=bool)
        self.drops.late += int(np.count_nonzero(late))
        self.drops.future += int(np.count_nonzero(future & ~late))
        self.drops.unused += int(np.count_nonzero(~used & ~late & ~future))
        keep = used & ~late & ~future
        if not keep.any():
            return
        dev, met, ts, val = dev[keep], met[keep], ts[keep], val[keep]
        # One sort serves every resolution: (metric, device, timestamp), arrival order on ties.
        order = np.lexsort((ts, met * self.capacity + dev))
        dev, met, ts, val = dev[order], met[order], ts[order], val[order]
        m_bounds = run_starts(met[1:] != met[:-1])
        for lo, hi in itertools.pairwise([*m_bounds.tolist(), met.size]):
            m = int(met[lo])
            d, t, v = self._unique(m, dev[lo:hi], ts[lo:hi], val[lo:hi])
            if d.size == 0:
                continue
            self.seen[m][d] = True
            for res in self.resolutions.values():
                ring = res.rings.get(m)
                if ring is not None:
                    self._merge(res, ring, d, t, v)

    def _unique(self, m: int, dev: I64, ts: F64, val: F64) -> tuple[I64, F64, F64]:
        """Drop repeats (sorted by device, timestamp) and remember the newest timestamps."""
        recent = self.recent[m]
        again = (recent[dev] == ts[:, None]).any(axis=1)
        again[1:] |= (dev[1:] == dev[:-1]) & (ts[1:] == ts[:-1])
        if again.any():
            self.drops.duplicate += int(np.count_nonzero(again))
            dev, ts, val = dev[~again], ts[~again], val[~again]
        if dev.size:
            self.remember(m, dev, ts)
        return dev, ts, val

    def remember(self, m: int, dev: I64, ts: F64) -> None:
        """Keep the newest DEDUP_DEPTH of (remembered + ``ts``) per device; ``dev``/``ts``
        are counted readings sorted by device and time, so a device's newest are the last
        entries of its run. The newest of a union is the newest of the parts' newest, so
        remembering several calls' readings at once leaves the same memory."""
        recent = self.recent[m]
        starts = run_starts(dev[1:] != dev[:-1])
        ends = run_ends(starts, dev.size)
        rows = dev[starts]
        idx = ends[:, None] - np.arange(DEDUP_DEPTH)
        newest = np.where(idx >= starts[:, None], ts[np.maximum(idx, 0)], -math.inf)
        both = np.concatenate((recent[rows], newest), axis=1)
        both.sort(axis=1)
        recent[rows] = both[:, DEDUP_DEPTH:]

    def _merge(self, res: Resolution, ring: MetricRing, dev: I64, ts: F64,
               val: F64) -> None:
        """Fold one metric's readings (sorted by device, timestamp) into one ring."""
        assert res.head is not None
        bucket = bucket_of(ts, res.width)
        starts = run_starts((dev[1:] != dev[:-1]) | (bucket[1:] != bucket[:-1]))
        ends = run_ends(starts, dev.size)
        agg = run_aggregates(ring.planes, ts, val, starts, ends)
        buckets = bucket[starts]
        # A bucket older than the ring is older than every window that reads this ring.
        fits = buckets > res.head - ring.slots
        if not fits.all():
            agg = {k: v[fits] for k, v in agg.items()}
        ring.merge(dev[starts][fits], buckets[fits], agg)

    def window(self, metric: int, plane: str, seconds: float, now: float) -> list[F64]:
        """Views ``(devices, k_i)`` of ``plane`` covering the window ending at ``now``.

        One view, or two when the window wraps around the ring: views, not copies, because
        gathering columns would copy the whole window for every plane at every tick.
        """
        res = self.resolutions[self.width_of(seconds)]
        ring = res.rings[metric]
        assert res.head is not None
        now_b = math.floor(now / res.width)
        k = buckets_for(seconds, res.width)
        first = max(now_b - k + 1, res.head - ring.slots + 1)
        data = ring.planes[plane]
        if first > now_b:
            return [data[:, :0]]
        lo, hi = first % ring.slots, now_b % ring.slots
        if lo <= hi:
            return [data[:, lo:hi + 1]]
        return [data[:, lo:], data[:, :hi + 1]]

    def nbytes(self) -> int:
        rings = sum(r.nbytes() for res in self.resolutions.values() for r in res.rings.values())
        return rings + sum(a.nbytes for a in self.seen.values()) + \
            sum(a.nbytes for a in self.recent.values())
