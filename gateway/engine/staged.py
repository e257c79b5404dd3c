"""Readings of many ticks prepared at once, folded in tick by tick (replay's fast path).

``SeriesStore.ingest`` does per call: filter late/future/unused readings, sort, drop
repeats, bucket, and reduce per (device, bucket); only the last step, folding the
aggregates into the rings, depends on what earlier ticks left there. For a recording
whose readings are known ahead, ``stage`` does everything but that fold for a whole chunk
of ticks in one set of array operations, grouped by tick, and ``StagedIngest.apply`` folds
one tick's share in. Each tick's rings then hold exactly what per-tick ``ingest`` calls
would have left: the same readings in the same order per (tick, device, bucket) reduce to
the same numbers, and the fold is the same code at the same tick.

Repeats are where per-tick state matters (the store remembers the newest timestamps per
device and metric, and which of them are still remembered depends on the order of
ticks); a chunk with any repeat inside it or of a remembered timestamp is not staged
(``stage`` returns None) and the caller ingests it tick by tick.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from gateway.engine.store import (
    F64,
    I64,
    B,
    MetricRing,
    Resolution,
    SeriesStore,
    bucket_of,
    run_aggregates,
    run_ends,
    run_starts,
)


@dataclass(slots=True)
class _RingShare:
    """Per-(tick, device, bucket) aggregates of one metric for one ring, in tick order."""

    res: Resolution
    ring: MetricRing
    bounds: list[int]  # [tick j's entries] = bounds[j]:bounds[j + 1]
    oldest: list[int]  # tick j's oldest bucket (0 when it has none)
    at: I64  # flat position in the ring's planes (``MetricRing.merge_at``)
    buckets: I64
    agg: dict[str, F64]


@dataclass(slots=True)
class StagedIngest:
    """A chunk of ticks' readings, reduced and waiting to be folded in tick by tick."""

    ticks: int
    # Readings (not from the future) per tick, for device liveness: (bounds, dev, ts).
    arrived: tuple[list[int], I64, F64] | None = None
    # Per metric: devices whose first counted reading comes at each tick (``seen``).
    seen: list[tuple[int, list[int], I64]] = field(default_factory=list)  # (metric, bounds, devs)
    shares: list[_RingShare] = field(default_factory=list)

    def apply(self, store: SeriesStore, j: int, last_seen: F64) -> None:
        """Fold tick ``j``'s readings in; ``store.advance`` to its time first."""
        if self.arrived is not None:
            bounds, devs, ts = self.arrived
            lo, hi = bounds[j], bounds[j + 1]
            if hi > lo:
                np.maximum.at(last_seen, devs[lo:hi], ts[lo:hi])
        for m, bounds, devs in self.seen:
            lo, hi = bounds[j], bounds[j + 1]
            if hi > lo:
                store.seen[m][devs[lo:hi]] = True
        for share in self.shares:
            lo, hi = share.bounds[j], share.bounds[j + 1]
            if hi == lo:
                continue
            res, ring = share.res, share.ring
            assert res.head is not None
            # A bucket older than the ring is older than every window that reads it.
            if share.oldest[j] > res.head - ring.slots:
                ring.merge_at(share.at[lo:hi], {k: v[lo:hi] for k, v in share.agg.items()})
                continue
            fits = share.buckets[lo:hi] > res.head - ring.slots
            ring.merge_at(share.at[lo:hi][fits],
                          {k: v[lo:hi][fits] for k, v in share.agg.items()})


def stage(store: SeriesStore, dev: I64, met: I64, ts: F64, val: F64, tick: I64,
          now: F64) -> StagedIngest | None:
    """Stage readings that per-tick ``store.ingest`` calls would take at ``now[tick]``.

    ``tick`` (per reading, non-decreasing in arrival order) numbers the ingest calls
    ``0..len(now) - 1``; ``now`` is each call's (non-decreasing) clock. Counts late, future
    and unused readings into ``store.drops`` and updates the duplicate memory at once;
    returns None, with nothing changed, when the chunk has a repeat (see the module
    docstring).
    """
    n_ticks = int(now.size)
    t_now = now[tick]
    late = ts < t_now - store.late
    future = ts > t_now + store.future
    n_met = int(met.max()) + 1 if met.size else 0
    used_table = np.zeros(max(n_met, 1), dtype=bool)
    used_table[[m for m in store.seen if m < n_met]] = True
    used = used_table[met] if met.size else np.zeros(0, dtype=bool)
    keep = used & ~late & ~future
    if not keep.all():
        dev, met, ts, val, tick = dev[keep], met[keep], ts[keep], val[keep], tick[keep]
    if dev.size == 0:
        _count_drops(store, late, future, used)
        return StagedIngest(n_ticks)
    key = met * (int(dev.max()) + 1) + dev  # orders as (metric, device)
    # Repeats: the same (metric, device, timestamp) twice in the chunk, or a remembered one.
    by_time = sorted_by([key], ts)
    k_s, t_s = key[by_time], ts[by_time]
    if ((k_s[1:] == k_s[:-1]) & (t_s[1:] == t_s[:-1])).any():
        return None
    m_s, d_s = met[by_time], dev[by_time]
    spans = list(itertools.pairwise([*run_starts(m_s[1:] != m_s[:-1]).tolist(), m_s.size]))
    for lo, hi in spans:
        recent = store.recent[int(m_s[lo])]
        d, t = d_s[lo:hi], t_s[lo:hi]
        # Only a reading no newer than a device's newest remembered one can repeat it.
        maybe = np.flatnonzero(t <= recent[d, -1])
        if maybe.size and (recent[d[maybe]] == t[maybe, None]).any():
            return None
    _count_drops(store, late, future, used)
    for lo, hi in spans:
        store.remember(int(m_s[lo]), d_s[lo:hi], t_s[lo:hi])
    out = StagedIngest(n_ticks)
    # A device's metric is seen from the first call that counts one of its readings.
    key_starts = run_starts(k_s[1:] != k_s[:-1])
    c_s = tick[by_time]
    first_call = np.minimum.reduceat(c_s, key_starts)
    key_met, key_dev = m_s[key_starts], d_s[key_starts]
    # Keys are in (metric, device) order: each metric's keys are one slice.
    key_bounds = np.searchsorted(key_met, [int(m_s[lo]) for lo, _ in spans] + [n_met])
    for m, (lo, hi) in zip([int(m_s[lo]) for lo, _ in spans],
                           itertools.pairwise(key_bounds.tolist()), strict=True):
        by_call = np.argsort(first_call[lo:hi], kind="stable")
        out.seen.append((m, np.searchsorted(first_call[lo:hi][by_call],
                                            np.arange(n_ticks + 1)).tolist(),
                         key_dev[lo:hi][by_call]))
    # Per metric, call-major order: (metric, call, device, timestamp), arrival order on
    # ties, the order per-tick ingest sorts each call's readings into: a stable sort by
    # (metric, call) of the (metric, device, timestamp) order.
    group = m_s * n_ticks + c_s
    if int(group.max()) < _RADIX:
        order = by_time[np.argsort(group.astype(np.uint16), kind="stable")]
    else:
        order = by_time[np.argsort(group, kind="stable")]
    dev, ts, val, tick = dev[order], ts[order], val[order], tick[order]
    # The metrics' slices: each metric's readings, in the same count, in metric order.
    for m, (lo, hi) in zip([int(m_s[lo]) for lo, _ in spans], spans, strict=True):
        d, t, v, k = dev[lo:hi], ts[lo:hi], val[lo:hi], tick[lo:hi]
        for res in store.resolutions.values():
            ring = res.rings.get(m)
            if ring is not None:
                out.shares.append(_share(res, ring, d, t, v, k, n_ticks))
    return out


def _share(res: Resolution, ring: MetricRing, dev: I64, ts: F64, val: F64, tick: I64,
           n_ticks: int) -> _RingShare:
    """Aggregates per (tick, device, bucket) run, as ``SeriesStore._merge`` makes them."""
    bucket = bucket_of(ts, res.width)
    changed = (dev[1:] != dev[:-1]) | (bucket[1:] != bucket[:-1]) | (tick[1:] != tick[:-1])
    if changed.all():
        # Every run is one reading (a device reads at most once a tick, as a recording
        # of one reading per device and second replayed at 1 s): its own aggregates.
        agg = _singles(ring.planes, ts, val)
    else:
        starts = run_starts(changed)
        agg = run_aggregates(ring.planes, ts, val, starts, run_ends(starts, dev.size))
        dev, bucket, tick = dev[starts], bucket[starts], tick[starts]
    bounds = np.searchsorted(tick, np.arange(n_ticks + 1))
    some = np.flatnonzero(bounds[1:] > bounds[:-1])
    oldest = np.zeros(n_ticks, dtype=np.int64)
    if some.size:
        oldest[some] = np.minimum.reduceat(bucket, bounds[some])
    return _RingShare(res, ring, bounds.tolist(), oldest.tolist(),
                      dev * ring.slots + bucket % ring.slots, bucket, agg)


def _singles(planes: Iterable[str], ts: F64, val: F64) -> dict[str, F64]:
    """``run_aggregates`` of runs of one reading each (the same numbers, no reductions)."""
    agg: dict[str, F64] = {}
    for name in planes:
        if name == "cnt":
            agg[name] = np.ones(val.size)
        elif name == "sumsq":
            agg[name] = val * val
        elif name in ("first_ts", "last_ts"):
            agg[name] = ts
        else:  # sum, min, max, first, last: the reading's value
            agg[name] = val
    return agg


# Keys below this sort by stable radix passes (numpy's stable sort of 16-bit integers).
_RADIX = 1 << 16


def sorted_by(keys: list[I64], ts: F64) -> I64:
    """Order by ``keys`` (most significant first), then ``ts``, arrival order on ties:
    ``np.lexsort((ts, *reversed(keys)))``, by radix passes when the keys are small and
    the timestamps already ascend within equal keys (a recording in time order)."""
    if ts.size and all(int(k.max()) < _RADIX for k in keys):
        order = np.argsort(keys[-1].astype(np.uint16), kind="stable")
        for k in reversed(keys[:-1]):
            order = order[np.argsort(k[order].astype(np.uint16), kind="stable")]
        same = np.ones(ts.size - 1, dtype=bool)
        for k in keys:
            k_o = k[order]
            same &= k_o[1:] == k_o[:-1]
        t = ts[order]
        if not (same & (t[1:] < t[:-1])).any():
            return order
    out: I64 = np.lexsort((ts, *reversed(keys)))
    return out


def _count_drops(store: SeriesStore, late: B, future: B, used: B) -> None:
    store.drops.late += int(np.count_nonzero(late))
    store.drops.future += int(np.count_nonzero(future & ~late))
    store.drops.unused += int(np.count_nonzero(~used & ~late & ~future))
