"""The rule engine: readings in (columnar batches), alert/command/device events out.

Typical use by the daemon (``load_rule_files`` is gateway.rulefiles': the engine reads no
files)::

    engine = Engine(load_rule_files(paths), config=EngineConfig())
    engine.ingest(engine.batch(readings), now)      # as readings arrive
    events = engine.tick(now)                       # every evaluation interval
    saved = engine.snapshot()                       # JSON-able; the caller stores it
    engine.restore(saved, now)                      # after a restart
    report = engine.reload(load_rule_files(paths))  # SIGHUP; raises ConfigError first

The hot path (``ingest`` and ``tick``) loops over metrics and rules, never over readings
or devices; per-device Python work happens only when a device is first seen and for the
few rows that produce an event.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fieldkit.units import Duration
from gateway.engine.alerts import AlertTable
from gateway.engine.compiled import CompiledRule, alert_events, compile_rule
from gateway.engine.events import DeviceEvent, Event, Kind, clean
from gateway.engine.rules import Group, fingerprint
from gateway.engine.staged import StagedIngest, stage
from gateway.engine.store import F64, I64, PLANES, Drops, SeriesStore, width_for
from gateway.engine.vector import TickValues, truth
from gateway.records import Reading as Reading  # noqa: PLC0414 - re-exported: replay imports it


class EngineConfig(BaseModel):
    """Engine tuning; the defaults suit a Raspberry Pi serving a few thousand devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bucket_width: Duration | None = Field(None, gt=0, description="One bucket width for "
                                          "every window; default: each window its own, "
                                          "the largest round width giving it 10 buckets.")
    late_tolerance: Duration = Field(30.0, ge=0, description="Readings older than now minus "
                                     "this are counted and kept out of rule state.")
    future_tolerance: Duration = Field(5.0, ge=0, description="Readings newer than now plus "
                                       "this (device clock ahead) are counted and left out.")
    lookback: Duration = Field(300.0, gt=0, description="How far back a bare metric name "
                               "looks for its last value.")
    offline_after: Duration | None = Field(60.0, gt=0, description="Silence after which a "
                                           "device is reported offline; null turns it off.")
    max_devices: int = Field(100_000, gt=0, description="Bound on tracked devices; readings "
                             "of further devices are counted and left out.")


@dataclass(frozen=True, slots=True)
class Batch:
    """Columnar readings: device and metric indices (from ``Engine.device_id``/``metric_id``)."""

    device: I64
    metric: I64
    ts: F64
    value: F64


@dataclass(slots=True)
class ReloadReport:
    kept: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # state reset
    removed: list[str] = field(default_factory=list)


class Engine:
    """Vectorised rules over every device; see the module docstring for the calls."""

    def __init__(self, groups: Sequence[Group], *, config: EngineConfig | None = None,
                 device_labels: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.config = config or EngineConfig()
        self._devices: list[str] = []
        self._device_ids: dict[str, int] = {}
        self._labels: dict[str, dict[str, str]] = {
            k: dict(v) for k, v in (device_labels or {}).items()}
        self._metric_ids: dict[str, int] = {}
        self._cap = 64
        self._last_seen = np.full(self._cap, -math.inf)
        self._offline = np.zeros(self._cap, dtype=bool)
        self.dropped_devices = 0
        self._now = -math.inf
        self._rules: list[CompiledRule] = []
        self._masks: dict[str, np.ndarray[Any, np.dtype[np.bool_]]] = {}
        self._groups: list[Group] = []
        self.store = SeriesStore(needs={}, late=0, future=0)
        self._install(list(groups), keep={})

    # -- names -----------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    @property
    def groups(self) -> list[Group]:
        return list(self._groups)

    def width_of(self, seconds: float) -> float:
        """Bucket width of a window of ``seconds`` (see ``store.width_for``)."""
        return self.config.bucket_width or width_for(seconds)

    @property
    def widths(self) -> dict[str, float]:
        """Bucket width of every window in the rules, by its text."""
        return {w.text: self.width_of(w.seconds) for r in self._rules for w in r.windows}

    def device_id(self, name: str) -> int:
        """Index of ``name``, registering it on first sight; -1 beyond ``max_devices``."""
        found = self._device_ids.get(name)
        if found is not None:
            return found
        if len(self._devices) >= self.config.max_devices:
            return -1
        idx = len(self._devices)
        self._devices.append(name)
        self._device_ids[name] = idx
        if idx >= self._cap:
            self._grow(max(2 * self._cap, idx + 1))
        for group in self._groups:
            self._masks[group.name][idx] = self._matches(group, name)
        return idx

    def metric_id(self, name: str) -> int:
        return self._metric_ids.setdefault(name, len(self._metric_ids))

    def set_device_labels(self, name: str, labels: Mapping[str, str]) -> None:
        self._labels[name] = dict(labels)
        idx = self.device_id(name)
        if idx >= 0:
            for group in self._groups:
                self._masks[group.name][idx] = self._matches(group, name)

    def _matches(self, group: Group, device: str) -> bool:
        labels = self._labels.get(device, {})
        return fnmatch.fnmatchcase(device, group.match.device) and all(
            labels.get(k) == v for k, v in group.match.labels.items())

    def _grow(self, cap: int) -> None:
        old = self._cap
        self._cap = cap
        last_seen, offline = self._last_seen, self._offline
        self._last_seen = np.full(cap, -math.inf)
        self._last_seen[:old] = last_seen
        self._offline = np.zeros(cap, dtype=bool)
        self._offline[:old] = offline
        for name, mask in self._masks.items():
            self._masks[name] = np.zeros(cap, dtype=bool)
            self._masks[name][:old] = mask
        for rule in self._rules:
            rule.table.grow(cap)
        self.store.ensure_devices(cap)

    # -- rules -----------------------------------------------------------------

    def _install(self, groups: list[Group], keep: dict[str, CompiledRule]) -> ReloadReport:
        report = ReloadReport()
        rules: list[CompiledRule] = []
        for group in groups:
            for rule in group.rules:
                key = f"{group.name}/{rule.alert}"
                fp = fingerprint(group, rule)
                old = keep.get(key)
                if old is not None and old.fp == fp:
                    table = old.table
                    report.kept.append(key)
                else:
                    (report.changed if old is not None else report.added).append(key)
                    table = AlertTable(for_=rule.for_, flap_transitions=rule.flapping.transitions,
                                       flap_window=rule.flapping.window,
                                       n_actions=len(rule.actions), devices=self._cap)
                rules.append(compile_rule(group, rule, key, fp, table, self.config.lookback))
        report.removed = [k for k in keep if k not in {r.key for r in rules}]
        self._rules, self._groups = rules, groups
        self._masks = {g.name: np.array([self._matches(g, d) for d in self._devices] +
                                        [False] * (self._cap - len(self._devices)), dtype=bool)
                       for g in groups}
        kept_data = self._rebuild_store()
        for compiled in rules:
            if compiled.key in report.kept and any(
                    self.metric_id(w.metric) not in kept_data for w in compiled.windows):
                # Its windows start empty again: hold its alerts as after a restart.
                compiled.table.warm_until = self._now + compiled.horizon
        return report

    def _rebuild_store(self) -> set[int]:
        """New rings for the current rules; returns the metrics whose data was all kept."""
        needs: dict[int, tuple[frozenset[str], list[float]]] = {}
        for w in (w for r in self._rules for w in r.windows):
            m = self.metric_id(w.metric)
            planes, lengths = needs.get(m, (frozenset(), []))
            needs[m] = (planes | PLANES[w.func], [*lengths, w.seconds])
        cfg = self.config
        old = self.store
        store = SeriesStore(needs=needs, late=cfg.late_tolerance, future=cfg.future_tolerance,
                            devices=self._cap, width=cfg.bucket_width)
        store.drops = old.drops
        lost: set[int] = set()
        for width, res in store.resolutions.items():
            prev_res = old.resolutions.get(width)
            if prev_res is None or prev_res.head is None:
                lost.update(res.rings)
                continue
            # Rings whose shape did not change keep their data across a reload.
            res.head = prev_res.head
            for m, ring in res.rings.items():
                prev = prev_res.rings.get(m)
                if prev is not None and prev.slots == ring.slots and \
                        set(prev.planes) == set(ring.planes):
                    res.rings[m] = prev
                else:
                    lost.add(m)
        for m in store.seen:
            if m in old.seen:
                store.seen[m], store.recent[m] = old.seen[m], old.recent[m]
        self.store = store
        return {m for m in needs if m not in lost}

    def reload(self, groups: Sequence[Group]) -> ReloadReport:
        """Swap in new rules; unchanged rules (same fingerprint) keep their alert state."""
        return self._install(list(groups), keep={r.key: r for r in self._rules})

    # -- data ------------------------------------------------------------------

    def batch(self, readings: Iterable[Reading]) -> Batch:
        """Columnar batch from ingest readings; bools count as 1/0, devices over the cap -1."""
        dev: list[int] = []
        met: list[int] = []
        ts: list[float] = []
        val: list[float] = []
        for device, when, metrics in readings:
            d = self.device_id(device)
            for name, value in metrics.items():
                dev.append(d)
                met.append(self.metric_id(name))
                ts.append(when)
                val.append(float(value))
        return Batch(np.array(dev, dtype=np.int64), np.array(met, dtype=np.int64),
                     np.array(ts, dtype=np.float64), np.array(val, dtype=np.float64))

    def _clock(self, now: float) -> float:
        """The engine's clock never goes back: a wall clock stepped back by NTP would
        otherwise reuse ring slots that still hold newer buckets."""
        self._now = max(self._now, now)
        return self._now

    def ingest(self, batch: Batch, now: float) -> None:
        """Fold readings into rule state; late/future/unused ones are counted in ``drops``."""
        now = self._clock(now)
        known = batch.device >= 0
        if not known.all():
            self.dropped_devices += int(np.count_nonzero(~known))
            batch = Batch(batch.device[known], batch.metric[known], batch.ts[known],
                          batch.value[known])
        if batch.device.size == 0:
            self.store.advance(now)
            return
        fresh = batch.ts <= now + self.config.future_tolerance
        np.maximum.at(self._last_seen, batch.device[fresh], batch.ts[fresh])
        self.store.ingest(batch.device, batch.metric, batch.ts, batch.value, now)

    def stage(self, batch: Batch, tick: I64, now: F64) -> StagedIngest | None:
        """Prepare ``len(now)`` ingest calls at once (replay's fast path, see ``staged``):
        reading ``i`` belongs to call ``tick[i]`` (non-decreasing: the batch is in arrival
        order) at time ``now[tick[i]]``; then
        ``ingest_staged(staged, j, now[j])`` for each ``j`` in order, with ticks between
        as usual, leaves the engine as ``ingest`` calls would. None: the batch has a
        repeated reading; ingest it call by call."""
        if tick.size and (tick[1:] < tick[:-1]).any():
            raise ValueError("stage: readings must come in call order")
        now = np.maximum(now, self._now)
        known = batch.device >= 0
        if not known.all():
            batch = Batch(batch.device[known], batch.metric[known], batch.ts[known],
                          batch.value[known])
            tick = tick[known]
        staged = stage(self.store, batch.device, batch.metric, batch.ts, batch.value, tick,
                       now)
        if staged is not None:
            self.dropped_devices += int(np.count_nonzero(~known))
            fresh = batch.ts <= now[tick] + self.config.future_tolerance
            # ``tick`` does not decrease: each call's readings are one slice.
            staged.arrived = (np.searchsorted(tick[fresh], np.arange(staged.ticks + 1)).tolist(),
                              batch.device[fresh], batch.ts[fresh])
        return staged

    def ingest_staged(self, staged: StagedIngest, j: int, now: float) -> None:
        """Call ``j`` of a staged batch, as ``ingest`` of its readings at ``now``."""
        now = self._clock(now)
        self.store.advance(now)
        staged.apply(self.store, j, self._last_seen)

    @property
    def drops(self) -> Drops:
        return self.store.drops

    # -- evaluation ------------------------------------------------------------

    def tick(self, now: float) -> list[Event]:
        """Evaluate every rule for every matching device at ``now``; events in rule order."""
        now = self._clock(now)
        self.store.advance(now)
        n = len(self._devices)
        values = TickValues(self.store, self._metric_ids, now, n)
        events: list[Event] = []
        for rule in self._rules:
            mask = self._masks[rule.group.name][:n]
            cond = truth(rule.cond, values) & mask
            clear = None if rule.clear is None else truth(rule.clear, values) & mask
            step = rule.table.step(cond, clear, now)
            if not step.any:
                continue
            for kind, hits in ((Kind.FLAPPING, step.flapping), (Kind.FIRED, step.fired),
                               (Kind.RESOLVED, step.resolved)):
                rows = np.flatnonzero(hits)
                if rows.size:
                    events.extend(alert_events(rule, kind, rows, values, now, self._devices))
        events.extend(self._liveness(now, n))
        return events

    def _liveness(self, now: float, n: int) -> list[Event]:
        after = self.config.offline_after
        if after is None or n == 0:
            return []
        seen = self._last_seen[:n]
        silent = (now - seen > after) & np.isfinite(seen)
        if not silent.any() and not self._offline[:n].any():
            return []  # everyone online and heard from: nothing changes
        went = silent & ~self._offline[:n]
        back = ~silent & self._offline[:n]
        self._offline[:n] = silent
        out: list[Event] = []
        for kind, rows in ((Kind.OFFLINE, went), (Kind.ONLINE, back)):
            out.extend(DeviceEvent(kind, now, self._devices[i], float(seen[i]))
                       for i in np.flatnonzero(rows).tolist())
        return out

    def firing(self) -> list[tuple[str, str]]:
        """(group/alert, device) pairs that consumers were told are firing."""
        n = len(self._devices)
        return [(r.key, self._devices[i]) for r in self._rules
                for i in np.flatnonzero(r.table.is_firing(n)).tolist()]

    def nbytes(self) -> int:
        """Bytes of numpy state (series rings, alert tables, device arrays)."""
        tables = sum(a.nbytes for r in self._rules for a in (
            r.table.state, r.table.since, r.table.emitted, r.table.flapping, r.table.trans,
            r.table.trans_pos, r.table.sent))
        masks = sum(m.nbytes for m in self._masks.values())
        return self.store.nbytes() + tables + masks + self._last_seen.nbytes + \
            self._offline.nbytes

    # -- persistence -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Alert and device-liveness state as JSON-able data (series data is not kept)."""
        rules: dict[str, Any] = {}
        for rule in self._rules:
            rows = {}
            for i, name in enumerate(self._devices):
                row = rule.table.dump_row(i)
                if row is not None:
                    rows[name] = row
            rules[rule.key] = {"fingerprint": rule.fp, "devices": rows}
        devices = {name: {"last_seen": clean(float(self._last_seen[i])),
                          "offline": bool(self._offline[i])}
                   for i, name in enumerate(self._devices)}
        return {"version": 1, "rules": rules, "devices": devices}

    def restore(self, data: Mapping[str, Any], now: float) -> list[str]:
        """Load a snapshot; returns the rule keys whose state was dropped (rule changed).

        Restored rules hold their state until their longest window has refilled, so a
        restart neither re-fires a firing alert nor resolves it for lack of data.
        """
        if data.get("version") != 1:
            raise ValueError(f"unknown engine snapshot version {data.get('version')!r}")
        for name, dev in data["devices"].items():
            i = self.device_id(name)
            if i >= 0:
                seen = dev["last_seen"]
                self._last_seen[i] = -math.inf if seen is None else float(seen)
                self._offline[i] = bool(dev["offline"])
        dropped = []
        by_key = {r.key: r for r in self._rules}
        for key, saved in data["rules"].items():
            rule = by_key.get(key)
            if rule is None or rule.fp != saved["fingerprint"]:
                dropped.append(key)
                continue
            for name, row in saved["devices"].items():
                i = self.device_id(name)
                if i >= 0:
                    rule.table.load_row(i, row)
            rule.table.warm_until = now + rule.horizon
        return dropped
