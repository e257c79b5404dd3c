"""Columnar series state: per metric, one row per device of time-bucketed ring buffers.

Every bucket of width ``width`` seconds keeps only the statistics the rules need
(count, sum, sum of squares, min, max, and the last/first reading with its timestamp), so
memory is ``devices x buckets x planes`` no matter how many readings arrive. All rows share
one clock: the ring's ``head`` is the newest bucket that may be written, and advancing it
clears the slots that are reused, so a slot is valid without a per-slot bucket id.

A window of ``d`` seconds at time ``now`` covers the ``ceil(d / width)`` buckets ending
with the bucket of ``now`` (windows are bucket-aligned; the reference evaluator uses the
same rule).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

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


def bucket_of(ts: F64 | float, width: float) -> I64:
    """Bucket number of each timestamp (shared with the reference evaluator)."""
    return np.floor(np.asarray(ts, dtype=np.float64) / width).astype(np.int64)


def buckets_for(seconds: float, width: float) -> int:
    """How many buckets a window of ``seconds`` spans."""
    return max(1, math.ceil(seconds / width - 1e-9))


@dataclass(slots=True)
class Drops:
    """Readings kept out of rule state (they are still forwarded by the data path)."""

    late: int = 0
    future: int = 0
    unused: int = 0  # metric no rule reads


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
        cols = buckets % self.slots
        p = self.planes
        for name in ("cnt", "sum", "sumsq"):
            if name in p:
                p[name][rows, cols] += agg[name]
        if "min" in p:
            p["min"][rows, cols] = np.minimum(p["min"][rows, cols], agg["min"])
        if "max" in p:
            p["max"][rows, cols] = np.maximum(p["max"][rows, cols], agg["max"])
        if "last" in p:
            # Ties on timestamp go to the reading that arrived later.
            newer = agg["last_ts"] >= p["last_ts"][rows, cols]
            p["last"][rows[newer], cols[newer]] = agg["last"][newer]
            p["last_ts"][rows[newer], cols[newer]] = agg["last_ts"][newer]
        if "first" in p:
            older = agg["first_ts"] < p["first_ts"][rows, cols]
            p["first"][rows[older], cols[older]] = agg["first"][older]
            p["first_ts"][rows[older], cols[older]] = agg["first_ts"][older]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.planes.values())


class SeriesStore:
    """All metric rings plus the shared bucket clock."""

    def __init__(self, *, width: float, needs: dict[int, tuple[frozenset[str], float]],
                 late: float, future: float, devices: int = 64) -> None:
        """``needs`` maps a metric index to (planes, longest window in seconds)."""
        self.width = width
        self.late = late
        self.future = future
        self.capacity = devices
        self.head: int | None = None
        # Future buckets need slots; late readings do not: a bucket older than the longest
        # window can never count again (ticks only move forward), so it is not kept.
        margin = math.ceil(future / width) + 2
        self.rings: dict[int, MetricRing] = {
            m: MetricRing(planes, buckets_for(longest, width) + margin, devices)
            for m, (planes, longest) in needs.items()
        }
        self.drops = Drops()

    def ensure_devices(self, count: int) -> None:
        if count > self.capacity:
            self.capacity = max(count, 2 * self.capacity)
            for ring in self.rings.values():
                ring.grow(self.capacity)

    def advance(self, now: float) -> None:
        """Move the clock so buckets up to ``now + future`` may be written."""
        head = math.floor((now + self.future) / self.width)
        if self.head is None:
            self.head = head
            return
        if head > self.head:
            for ring in self.rings.values():
                ring.clear(self.head + 1, head)
            self.head = head

    def ingest(self, dev: I64, met: I64, ts: F64, val: F64, now: float) -> None:
        """Fold a batch in: late/future/unused readings are counted and left out."""
        self.advance(now)
        assert self.head is not None
        late = ts < now - self.late
        future = ts > now + self.future
        n_met = int(met.max()) + 1 if met.size else 0
        used_table = np.zeros(max(n_met, 1), dtype=bool)
        used_table[[m for m in self.rings if m < n_met]] = True
        used = used_table[met] if met.size else np.zeros(0, dtype=bool)
        self.drops.late += int(np.count_nonzero(late))
        self.drops.future += int(np.count_nonzero(future & ~late))
        self.drops.unused += int(np.count_nonzero(~used & ~late & ~future))
        keep = used & ~late & ~future
        if not keep.any():
            return
        dev, met, ts, val = dev[keep], met[keep], ts[keep], val[keep]
        bucket = bucket_of(ts, self.width)
        low = int(bucket.min())
        span = int(bucket.max()) - low + 1
        key = (met * self.capacity + dev) * span + (bucket - low)
        order = np.lexsort((ts, key))  # stable: equal timestamps keep arrival order
        key, dev, met, ts, val, bucket = (
            key[order], dev[order], met[order], ts[order], val[order], bucket[order])
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        ends = np.r_[starts[1:], key.size] - 1
        g_met = met[starts]
        bounds = np.flatnonzero(np.r_[True, g_met[1:] != g_met[:-1]])
        bounds = np.r_[bounds, g_met.size]
        for lo, hi in itertools.pairwise(bounds.tolist()):
            ring = self.rings[int(g_met[lo])]
            self._merge(ring, starts[lo:hi], ends[lo:hi], dev, ts, val, bucket)

    def _merge(self, ring: MetricRing, starts: I64, ends: I64, dev: I64, ts: F64,
               val: F64, bucket: I64) -> None:
        assert self.head is not None
        lo, hi = int(starts[0]), int(ends[-1]) + 1
        rel = starts - lo
        planes = ring.planes
        agg: dict[str, F64] = {}
        if "cnt" in planes:
            agg["cnt"] = (ends - starts + 1).astype(np.float64)
        if "sum" in planes:
            agg["sum"] = np.add.reduceat(val[lo:hi], rel)
        if "sumsq" in planes:
            agg["sumsq"] = np.add.reduceat(val[lo:hi] ** 2, rel)
        if "min" in planes:
            agg["min"] = np.minimum.reduceat(val[lo:hi], rel)
        if "max" in planes:
            agg["max"] = np.maximum.reduceat(val[lo:hi], rel)
        if "last" in planes:
            agg["last"], agg["last_ts"] = val[ends], ts[ends]
        if "first" in planes:
            agg["first"], agg["first_ts"] = val[starts], ts[starts]
        buckets = bucket[starts]
        # A bucket older than the ring can only come from a caller whose clock went back.
        fits = buckets > self.head - ring.slots
        if not fits.all():
            self.drops.late += int((ends - starts + 1)[~fits].sum())
            agg = {k: v[fits] for k, v in agg.items()}
        ring.merge(dev[starts][fits], buckets[fits], agg)

    def window(self, metric: int, plane: str, seconds: float, now: float) -> list[F64]:
        """Views ``(devices, k_i)`` of ``plane`` covering the window ending at ``now``.

        One view, or two when the window wraps around the ring: views, not copies, because
        gathering columns would copy the whole window for every plane at every tick.
        """
        ring = self.rings[metric]
        assert self.head is not None
        now_b = math.floor(now / self.width)
        k = buckets_for(seconds, self.width)
        first = max(now_b - k + 1, self.head - ring.slots + 1)
        data = ring.planes[plane]
        if first > now_b:
            return [data[:, :0]]
        lo, hi = first % ring.slots, now_b % ring.slots
        if lo <= hi:
            return [data[:, lo:hi + 1]]
        return [data[:, lo:], data[:, :hi + 1]]

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rings.values())
