"""The deterministic heart of the emulator: readings, faults and payloads, without a broker.

Every device has its own random streams seeded from (fleet seed, device id), and values are
computed at scheduled simulated times, so the same fleet and seed give the same series
however fast or slow the machine publishes. Only commands from outside (actuators) change
the course of a run.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

from devices.fleet import DeviceType, Fault, FaultKind, Fleet, Malformed, Metric, PayloadFormat

# Normal draws made per numpy call; larger blocks amortise the call, cost memory per device.
_NORMALS_BLOCK = 256


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
                 scale: float = 1.0) -> None:
        """``start``: epoch of simulated time 0; ``scale``: simulated seconds per wall
        second (a fleet at scale 10 publishes ten times as often; timestamps stay wall
        time, the physics runs on simulated time)."""
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
        # Devices start spread over their first interval, as real ones do.
        self._heap = [(d.spec.interval * (i % 97) / 97, i) for i, d in enumerate(self.devices)]
        heapq.heapify(self._heap)

    # -- time -------------------------------------------------------------------------------

    def wall(self, t: float) -> float:
        """Epoch time of simulated time ``t``."""
        return self.start + t / self.scale

    def next_due(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def due(self, until: float, limit: int | None = None) -> list[Outgoing]:
        """Every message due at or before simulated time ``until``, in time order; with
        ``limit``, stop once that many are made (the rest come on the next call), so a
        publisher that fell behind takes its backlog in bounded bites."""
        out: list[Outgoing] = []
        while self._heap and self._heap[0][0] <= until:
            if limit is not None and len(out) >= limit:
                break
            t, index = self._heap[0]
            device = self.devices[index]
            out.extend(self._emit(device, t))
            heapq.heapreplace(self._heap, (t + device.spec.interval, index))
        return out

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
