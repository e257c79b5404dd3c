"""The deterministic heart of the emulator: readings, faults and payloads, without a broker.

Every device has its own random streams seeded from (fleet seed, device id), and values are
computed at scheduled simulated times, so the same fleet and seed give the same series
however fast or slow the machine publishes. Only commands from outside (actuators) change
the course of a run.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import orjson

from devices.fleet import DeviceType, Fault, FaultKind, Fleet, Malformed, Metric, PayloadFormat

# Normal draws made per numpy call; larger blocks amortise the call, cost memory per device.
_NORMALS_BLOCK = 256
# Batched devices refill their normals in larger blocks (each refill is a Python call per
# device): up to this many per block, within this many normals (8 bytes each) per type.
_BATCHED_BLOCK_MAX = 2048
_BATCHED_NORMALS_BUDGET = 4_000_000


class Outgoing(NamedTuple):
    """One MQTT message to publish (a NamedTuple: made once per message at up to ~100k/s,
    it is built several times faster than a frozen dataclass)."""

    t: float            # simulated seconds since start
    topic: str
    payload: bytes
    qos: int
    device: str
    reading: dict[str, Any] | None = None  # the reading(s) it carries, for --record
    fault: str | None = None               # fault kind, when one shaped this message


class _Normals:
    """Standard normal draws for one device, made in blocks by numpy: the same stream for
    the same seed, at a fraction of the cost of one `random.gauss` call per draw."""

    __slots__ = ("_at", "_block", "_gen")

    def __init__(self, seed: str) -> None:
        digest = hashlib.sha256(seed.encode()).digest()
        self._gen = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "big")))
        self._block: list[float] = []
        self._at = 0

    def block(self, size: int) -> np.ndarray:
        """The next ``size`` draws of the stream, for callers that keep their own buffer
        (the stream is the same whatever the block sizes: numpy draws one after another)."""
        return self._gen.standard_normal(size)

    def next(self) -> float:
        if self._at >= len(self._block):
            self._block = self._gen.standard_normal(_NORMALS_BLOCK).tolist()
            self._at = 0
        value = self._block[self._at]
        self._at += 1
        return value


@dataclass(slots=True)
class _Device:
    id: str
    kind: str
    spec: DeviceType
    rng: _Normals
    fault_rng: random.Random
    walk: dict[str, float] = field(default_factory=dict)
    effects: dict[tuple[str, str], float] = field(default_factory=dict)  # (metric, actuator)
    counters: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    actuators: dict[str, str] = field(default_factory=dict)
    last_t: float = 0.0
    pending: list[dict[str, Any]] = field(default_factory=list)  # array batches being filled
    step: int = 0
    # The fleet's faults that can hit this device, by kind, with their index in the fleet.
    faults: dict[FaultKind, list[tuple[int, Fault]]] = field(default_factory=dict)


class FleetModel:
    def __init__(self, fleet: Fleet, *, seed: int | None = None, start: float = 0.0,
                 scale: float = 1.0, batched: bool = True) -> None:
        """``start``: epoch of simulated time 0; ``scale``: simulated seconds per wall
        second (a fleet at scale 10 publishes ten times as often; timestamps stay wall
        time, the physics runs on simulated time); ``batched=False`` makes every reading
        on the per-reading path: the same messages, several times slower (the reference
        the batched path is tested against)."""
        self.fleet = fleet
        self.seed = fleet.seed if seed is None else seed
        self.start = start
        self.scale = scale
        self.devices: list[_Device] = []
        for kind, spec in fleet.types.items():
            for n in range(1, spec.count + 1):
                dev_id = spec.id.format(type=kind, n=n)
                self.devices.append(_Device(
                    id=dev_id, kind=kind, spec=spec,
                    rng=_Normals(f"{self.seed}:{dev_id}"),
                    fault_rng=random.Random(f"{self.seed}:{dev_id}:faults"),
                    actuators={a: spec.actuators[a].initial for a in spec.actuators},
                ))
        self.by_id = {d.id: d for d in self.devices}
        for index, fault in enumerate(fleet.faults):
            for device in ([self.by_id[fault.device]] if fault.device in self.by_id
                           else [] if fault.device else self.devices):
                device.faults.setdefault(fault.kind, []).append((index, fault))
        self.fault_log: list[dict[str, Any]] = []
        self._fired: set[tuple[int, str]] = set()
        # Devices start spread over their first interval, as real ones do. The next reading
        # of device i is due at _next[i]; each is the sum of the intervals so far (added one
        # at a time: the same floats whichever way the readings are taken).
        self._next = np.array([d.spec.interval * (i % 97) / 97
                               for i, d in enumerate(self.devices)], dtype=np.float64)
        self._interval = np.array([d.spec.interval for d in self.devices], dtype=np.float64)
        self._min_interval = float(self._interval.min()) if self.devices else 1.0
        self._kinds: list[_Kind] = []
        self._kind_of = np.zeros(len(self.devices), dtype=np.intp)
        first = 0
        for spec in fleet.types.values():
            members = self.devices[first:first + spec.count]
            self._kind_of[first:first + spec.count] = len(self._kinds)
            self._kinds.append(_Kind(spec, first, members))
            first += spec.count
        # Devices whose readings are made in batches: no faults, no actuator effects, no
        # counters (those depend on state that changes reading by reading, and stay on the
        # per-reading path below, which is the definition the batch path must match).
        self._batched = np.array([batched and not d.faults and not any(m.effects or m.counter
                                                           for m in d.spec.metrics.values())
                                  for d in self.devices], dtype=bool)
        self._all_batched = bool(self._batched.all())
        # Messages per reading of a batched device (array format: see _Kind.array_due).
        self._per_reading = np.array(
            [len(d.spec.metrics) if d.spec.format is PayloadFormat.NUMBER else 1
             for d in self.devices], dtype=np.int64)

    # -- time -------------------------------------------------------------------------------

    def wall(self, t: float) -> float:
        """Epoch time of simulated time ``t``."""
        return self.start + t / self.scale

    def next_due(self) -> float:
        return float(self._next.min()) if self.devices else math.inf

    def due(self, until: float, limit: int | None = None) -> list[Outgoing]:
        """Every message due at or before simulated time ``until``, in time order; with
        ``limit``, stop once that many are made (the rest come on the next call), so a
        publisher that fell behind takes its backlog in bounded bites."""
        out: list[Outgoing] = []
        if not self.devices:
            return out
        nxt = self._next
        while limit is None or len(out) < limit:
            low = float(nxt.min())
            if low > until:
                break
            # A window in which no device is due twice: its readings are independent of each
            # other and are made together, in (time, device) order, as one queue would.
            end = low + self._min_interval
            chosen = np.flatnonzero((nxt < end) & (nxt <= until))
            order = chosen[np.argsort(nxt[chosen], kind="stable")]
            done = self._window(order, out, limit)
            nxt[order[:done]] += self._interval[order[:done]]
            if done < len(order):
                break
        return out

    def _window(self, order: np.ndarray, out: list[Outgoing], limit: int | None) -> int:
        """Make the readings of ``order`` (devices due once each, in time order) into
        ``out`` until ``limit``; returns how many devices took their reading."""
        times = self._next[order]
        if self._all_batched:
            return self._batch(order, times, out, limit)
        batched = self._batched[order]
        at, n = 0, len(order)
        while at < n:
            if limit is not None and len(out) >= limit:
                return at
            if not batched[at]:
                index = int(order[at])
                out.extend(self._emit(self.devices[index], float(times[at])))
                at += 1
                continue
            stop = at + 1
            while stop < n and batched[stop]:
                stop += 1
            made = self._batch(order[at:stop], times[at:stop], out, limit)
            if made < stop - at:
                return at + made
            at = stop
        return at

    def _batch(self, order: np.ndarray, times: np.ndarray, out: list[Outgoing],
               limit: int | None) -> int:
        """Readings of batched devices (each once, in time order); returns how many."""
        kinds = self._kind_of[order]
        mixed = len(self._kinds) > 1 and not (kinds == kinds[0]).all()
        if limit is not None or mixed:
            per = self._per_reading[order]
            for k, kind in enumerate(self._kinds):
                if kind.spec.format is PayloadFormat.ARRAY:
                    mine = kinds == k
                    per[mine] = kind.array_due(order[mine] - kind.first)
            if limit is not None:
                before = np.cumsum(per) - per
                take = int(np.searchsorted(before, limit - len(out), side="left"))
                order, times, kinds, per = order[:take], times[:take], kinds[:take], per[:take]
        if len(order) == 0:
            return 0
        if not mixed:
            self._kinds[int(kinds[0])].readings(self, order, times, out)
            return len(order)
        # Several device types in one window: each makes its messages, then they are put
        # back in time order (``per`` messages per reading).
        made = {k: iter(self._kinds[k].readings(self, order[kinds == k], times[kinds == k], []))
                for k in np.unique(kinds).tolist()}
        for k, count in zip(kinds.tolist(), per.tolist(), strict=True):
            source = made[k]
            out.extend(next(source) for _ in range(count))
        return len(order)

    # -- actuators ----------------------------------------------------------------------------

    def set_actuator(self, device_id: str, actuator: str, state: str) -> str | None:
        """Apply a command; returns an error text, or None when done."""
        device = self.by_id.get(device_id)
        if device is None:
            return f"unknown device {device_id!r}"
        spec = device.spec.actuators.get(actuator)
        if spec is None:
            return f"device {device_id!r} has no actuator {actuator!r}"
        if state not in spec.states:
            return f"actuator {actuator!r} has no state {state!r} (one of {spec.states})"
        device.actuators[actuator] = state
        return None

    # -- readings -------------------------------------------------------------------------

    def _active(self, device: _Device, kind: FaultKind, t: float,
                metric: str | None = None) -> Fault | None:
        candidates = device.faults.get(kind)
        if not candidates:
            return None
        for index, fault in candidates:
            if metric is not None and fault.metric and fault.metric != metric:
                continue
            if fault.at is not None:
                window = fault.duration
                if window > 0:
                    if fault.at <= t < fault.at + window:
                        self._log_once(index, device, fault, t)
                        return fault
                elif t >= fault.at and (index, device.id) not in self._fired:
                    self._log_once(index, device, fault, t)
                    return fault
            elif fault.probability is not None and device.fault_rng.random() < fault.probability:
                self._log(device, fault, t)
                return fault
        return None

    def _log_once(self, index: int, device: _Device, fault: Fault, t: float) -> None:
        if (index, device.id) not in self._fired:
            self._fired.add((index, device.id))
            self._log(device, fault, t)

    def _log(self, device: _Device, fault: Fault, t: float) -> None:
        self.fault_log.append({
            "t": round(t, 3), "ts": round(self.wall(t), 3), "device": device.id,
            "kind": fault.kind.value, "metric": fault.metric,
            "variant": fault.variant.value if fault.kind is FaultKind.MALFORMED else None,
        })

    def _values(self, device: _Device, t: float, values: dict[str, Any]) -> dict[str, Any]:
        """The device's metrics at ``t``, added to ``values`` (which may hold "ts")."""
        # The hot path of a fleet at full speed: terms that are zero are skipped (adding
        # 0.0 changes nothing, so the series is the same), and the order of the sums and of
        # the random draws (walk, then noise) is fixed: the same seed gives the same series.
        dt_min = max(0.0, t - device.last_t) / 60.0
        device.last_t = t
        hour = ((self.start + t) / 3600.0) % 24.0  # the physics runs on simulated time
        walks, draw = device.walk, device.rng.next
        for name, m in device.spec.metrics.items():
            walk = walks.get(name, 0.0)
            if m.walk:
                walk += m.walk * draw()
            walks[name] = walk
            value = m.baseline
            if m.daily_amplitude:
                value += m.daily_amplitude * math.cos(2 * math.pi * (hour - m.peak_hour) / 24.0)
            if m.drift_per_hour:
                value += m.drift_per_hour * t / 3600.0
            value += walk
            if m.effects:
                value += self._effects(device, name, m, dt_min)
            if m.noise:
                value += m.noise * draw()
            if device.faults:
                value = self._metric_faults(device, name, m, value, t)
            if m.min is not None:
                value = max(m.min, value)
            if m.max is not None:
                value = min(m.max, value)
            device.last[name] = value  # the modelled value: what `stuck` holds still
            if m.counter:
                dt_h = device.spec.interval / 3600.0
                value = device.counters.get(name, 0.0) + abs(value) * dt_h
                device.counters[name] = value
            values[name] = round(value, m.digits)
        return values

    @staticmethod
    def _effects(device: _Device, name: str, m: Metric, dt_min: float) -> float:
        """The actuators' pull on metric ``name`` over the last ``dt_min`` minutes."""
        total = 0.0
        for actuator, states in m.effects.items():
            key = (name, actuator)
            effect = device.effects.get(key, 0.0)
            active = states.get(device.actuators.get(actuator, ""))
            if active is not None:
                effect += active.rate * dt_min
            else:
                relax = max((e.relax for e in states.values()), default=0.1)
                effect *= (1.0 - relax) ** dt_min
            device.effects[key] = effect
            total += effect
        return total

    def _metric_faults(self, device: _Device, name: str, m: Metric, value: float,
                       t: float) -> float:
        drift = self._active(device, FaultKind.DRIFT, t, name)
        if drift is not None and drift.at is not None:
            value += (drift.value or 1.0) * (t - drift.at) / 3600.0
        if self._active(device, FaultKind.STUCK, t, name) is not None and name in device.last:
            value = device.last[name]
        spike = self._active(device, FaultKind.SPIKE, t, name)
        if spike is not None:
            value = spike.value if spike.value is not None else m.baseline * 10 + 100
        return value

    def _emit(self, device: _Device, t: float) -> list[Outgoing]:
        spec = device.spec
        device.step += 1
        if not device.faults:
            return self._messages(device, t,
                                  self._values(device, t, {"ts": round(self.wall(t), 3)}))
        values = self._values(device, t, {})
        if self._active(device, FaultKind.DROPOUT, t) is not None:
            return []
        ts = self.wall(t)
        skew = self._active(device, FaultKind.SKEW, t)
        if skew is not None:
            ts += skew.value or 3600.0
        reading = {"ts": round(ts, 3), **values}
        malformed = self._active(device, FaultKind.MALFORMED, t)
        if malformed is not None:
            return [Outgoing(t, f"sensors/{device.id}/telemetry",
                             self._malformed(device, malformed.variant), spec.qos, device.id,
                             None, f"malformed:{malformed.variant.value}")]
        out = self._messages(device, t, reading)
        if self._active(device, FaultKind.DUPLICATE, t) is not None and out:
            out.append(Outgoing(out[-1].t, out[-1].topic, out[-1].payload, out[-1].qos,
                                device.id, None, "duplicate"))
        burst = self._active(device, FaultKind.BURST, t)
        if burst is not None:
            for k in range(burst.count):
                extra = {"ts": round(ts + (k + 1) * 0.001, 3), **self._values(device, t, {})}
                out.extend(self._messages(device, t, extra, fault="burst"))
        return out

    def _messages(self, device: _Device, t: float, reading: dict[str, Any],
                  fault: str | None = None) -> list[Outgoing]:
        spec = device.spec
        topic = f"sensors/{device.id}/telemetry"
        if spec.format is PayloadFormat.JSON:
            return [Outgoing(t, topic, orjson.dumps(reading), spec.qos, device.id,
                             reading, fault)]
        if spec.format is PayloadFormat.ARRAY:
            device.pending.append(reading)
            if len(device.pending) < spec.batch:
                return []
            batch, device.pending = device.pending, []
            return [Outgoing(t, topic, orjson.dumps(batch), spec.qos, device.id,
                             {"batch": batch}, fault)]
        return [Outgoing(t, f"sensors/{device.id}/{name}", orjson.dumps(value), spec.qos,
                         device.id, {"ts": reading["ts"], name: value}, fault)
                for name, value in reading.items() if name != "ts"]

    @staticmethod
    def _malformed(device: _Device, variant: Malformed) -> bytes:
        metric = next(iter(device.spec.metrics))
        if variant is Malformed.BAD_JSON:
            return b'{"' + metric.encode() + b'": 21.5,'
        if variant is Malformed.NAN:
            return b'{"' + metric.encode() + b'": NaN}'
        if variant is Malformed.WRONG_TYPE:
            return orjson.dumps({metric: "hot"})
        if variant is Malformed.OVERSIZED:
            return orjson.dumps({metric: 1.0, "pad": "x" * 200_000})
        return bytes(device.fault_rng.getrandbits(8) for _ in range(64))


_TWO_PI = 2 * math.pi
# Beyond this, value x 10^digits has no fractional part left to round: Python's round is used.
_ROUND_EXACT = 2.0 ** 50


def _round(values: np.ndarray, digits: int) -> list[float]:
    """``[round(v, digits) for v in values]``, the same floats, made by numpy.

    Python rounds the exact decimal value of ``v``; rint(v x 10^d) / 10^d gives the same
    float unless v x 10^d lies within a rounding error of a half (or is huge), and those
    few are rounded by Python itself."""
    scale = 10.0 ** digits
    with np.errstate(invalid="ignore", over="ignore"):  # inf and nan go to Python below
        scaled = values * scale
        # fl(v x 10^d) is within |v x 10^d| x 2^-53 of the exact product: a wide margin.
        near = np.abs(scaled - np.floor(scaled) - 0.5) < np.abs(scaled) * 1e-14 + 1e-9
        near |= ~(np.abs(scaled) < _ROUND_EXACT)
        result: list[float] = (np.rint(scaled) / scale).tolist()
    if near.any():
        for i in np.flatnonzero(near).tolist():
            result[i] = round(float(values[i]), digits)
    return result


def _reading_maker(keys: tuple[str, ...]) -> Callable[..., list[dict[str, Any]]]:
    """A function making readings from columns of values, one dict per row, by a dict
    display with ``keys`` as literals (their repr): about three times as fast as
    ``dict(zip(keys, row))``, which is a third of the cost of a reading."""
    params = [f"c{i}" for i in range(len(keys))]
    names = [f"v{i}" for i in range(len(keys))]
    display = ", ".join(f"{key!r}: {name}" for key, name in zip(keys, names, strict=True))
    source = (f"lambda {', '.join(params)}: [{{{display}}} "
              f"for {', '.join(names)}, in zip({', '.join(params)}, strict=True)]")
    maker: Callable[..., list[dict[str, Any]]] = eval(source, {"zip": zip})  # noqa: S307
    return maker


class _Kind:
    """The batched readings of one device type: the state of its devices as arrays, one
    row per device (rows of devices on the per-reading path are left unused)."""

    def __init__(self, spec: DeviceType, first: int, members: list[_Device]) -> None:
        self.spec = spec
        self.first = first
        self.members = members
        self.ids = [d.id for d in members]
        self.topics = [f"sensors/{d.id}/telemetry" for d in members]
        self.metric_topics = [[f"sensors/{d.id}/{name}" for name in spec.metrics]
                              for d in members]
        self.keys = ("ts", *spec.metrics)
        self.make_readings = _reading_maker(self.keys)
        # Readings are split at "},{", which only a metric name could hold otherwise.
        self.splittable = not any("}" in key for key in self.keys)
        self.metrics = list(spec.metrics.items())
        self.draws = sum((m.walk != 0) + (m.noise != 0) for m in spec.metrics.values())
        self.walks = {name: np.zeros(len(members)) for name, m in self.metrics if m.walk}
        # Each device's normals, in the order its own generator makes them: a row holds
        # what is left of the last block plus a new one (see _refill).
        self.block = max(_NORMALS_BLOCK,
                         min(_BATCHED_BLOCK_MAX, _BATCHED_NORMALS_BUDGET // len(members)))
        self.normals = np.zeros((len(members), self.block + self.draws))
        self.sizes = np.full(len(members), min(_NORMALS_BLOCK, self.block), dtype=np.intp)
        self.used = np.zeros(len(members), dtype=np.intp)
        self.made = np.zeros(len(members), dtype=np.intp)
        self.steps = np.arange(self.draws)

    def array_due(self, rows: np.ndarray) -> np.ndarray:
        """1 where the next reading of ``rows`` completes an array message, else 0."""
        batch = self.spec.batch
        return np.array([len(self.members[r].pending) + 1 >= batch for r in rows.tolist()],
                        dtype=np.int64)

    def _refill(self, row: int) -> None:
        used, made = int(self.used[row]), int(self.made[row])
        normals = self.normals[row]
        left = made - used
        normals[:left] = normals[used:made]
        size = int(self.sizes[row])
        normals[left:left + size] = self.members[row].rng.block(size)
        self.used[row], self.made[row] = 0, left + size
        # Blocks grow from the per-reading path's size: a short run draws (and touches the
        # memory of) few normals, a long one few blocks.
        self.sizes[row] = min(2 * size, self.block)

    def readings(self, model: FleetModel, order: np.ndarray, times: np.ndarray,
                 out: list[Outgoing]) -> list[Outgoing]:
        """One reading of each device ``order`` at ``times`` (no device twice), as
        FleetModel._values and _messages make it, appended to ``out``."""
        rows = order - self.first
        draws: np.ndarray | None = None
        if self.draws:
            used = self.used[rows]
            short = used + self.draws > self.made[rows]
            if short.any():
                for row in rows[short].tolist():
                    self._refill(row)
                used = self.used[rows]
            draws = self.normals[rows[:, None], used[:, None] + self.steps]
            self.used[rows] = used + self.draws
        hour = ((model.start + times) / 3600.0) % 24.0
        columns = [_round(model.start + times / model.scale, 3)]
        j = 0
        for name, m in self.metrics:
            value = np.full(len(rows), m.baseline)
            if m.daily_amplitude:
                angle = (_TWO_PI * (hour - m.peak_hour) / 24.0).tolist()
                value = value + m.daily_amplitude * np.array(list(map(math.cos, angle)))
            if m.drift_per_hour:
                value = value + m.drift_per_hour * times / 3600.0
            if m.walk:
                assert draws is not None
                walk = self.walks[name][rows] + m.walk * draws[:, j]
                self.walks[name][rows] = walk
                j += 1
                value = value + walk
            else:
                value = value + 0.0
            if m.noise:
                assert draws is not None
                value = value + m.noise * draws[:, j]
                j += 1
            if m.min is not None:
                value = np.where(value > m.min, value, m.min)
            if m.max is not None:
                value = np.where(value < m.max, value, m.max)
            columns.append(_round(value, m.digits))
        keys, qos, spec = self.keys, self.spec.qos, self.spec
        readings = self.make_readings(*columns)
        rows_l, times_l = rows.tolist(), times.tolist()
        ids = [self.ids[r] for r in rows_l]
        if spec.format is PayloadFormat.JSON:
            # tuple.__new__ skips Outgoing's Python-level __new__ (a third of the cost).
            out.extend(map(tuple.__new__, repeat(Outgoing), zip(
                times_l, [self.topics[r] for r in rows_l], self._payloads(readings),
                repeat(qos), ids, readings, repeat(None))))
        elif spec.format is PayloadFormat.ARRAY:
            for t, row, reading in zip(times_l, rows_l, readings, strict=True):
                device = self.members[row]
                device.pending.append(reading)
                if len(device.pending) >= spec.batch:
                    batch, device.pending = device.pending, []
                    out.append(Outgoing(t, self.topics[row], orjson.dumps(batch), qos,
                                        device.id, {"batch": batch}))
        else:
            names = keys[1:]
            # Each value as orjson writes it: one call for all, split at the commas.
            numbers = iter(orjson.dumps(
                [reading[name] for reading in readings for name in names])[1:-1].split(b","))
            for t, row, reading in zip(times_l, rows_l, readings, strict=True):
                ts = reading["ts"]
                for name, topic in zip(names, self.metric_topics[row], strict=True):
                    value = reading[name]
                    out.append(Outgoing(t, topic, next(numbers), qos, self.ids[row],
                                        {"ts": ts, name: value}))
        return out

    def _payloads(self, readings: list[dict[str, Any]]) -> list[bytes]:
        """``[orjson.dumps(r) for r in readings]``, made by one orjson call split at the
        braces. Not only faster: orjson starts each output at 1 KiB of malloc'ed memory, and
        a few thousand of those per batch make glibc give the heap back to the system and
        fault it in again on every batch (three times the cost of the readings here)."""
        if not self.splittable or not readings:
            return list(map(orjson.dumps, readings))
        return list(map(b"{%b}".__mod__, orjson.dumps(readings)[2:-2].split(b"},{")))
