"""A fleet of simulated gateways' uplinks: what each would publish on the cloud broker, when.

What is modelled (the gateway's defaults, README "Latency"): a gateway takes ``rate``
readings/s from its devices and writes them to its log in group commits every
``ingest.commit_interval`` (100 ms); with ``uplink.batching: adaptive`` and a near broker the
uplink sends one telemetry batch per commit (what the commit holds, at most
``batch_max_readings`` = 500 per message). So a gateway at R readings/s sends about 10
batches/s of R/10 readings each, and none in a commit that holds nothing (R < 10). Every
gateway commits on its own phase (seeded), so a fleet's batches are spread evenly over time.
An event (``--events-every N``: one after every N readings of a gateway, alternately
``io.fieldgate.alert.fired`` and ``…resolved``) takes the next seq, cuts the batch it falls
in (the uplink sends the readings before it, then the event, then the rest) and goes as its
own message; readings and events share one seq space per gateway, from 1.

Not modelled: a far broker's larger batches (adaptive batching grows them with the round
trip), ``batching: delay``, the uplink's backlog after an outage, rule engine behaviour.

Everything here is a function of the seed and the start epoch (no clock, no I/O): the same
arguments make the same messages, byte for byte, in the same order.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import orjson

from devices import uplink_wire as wire

# A gateway's group commit interval (ingest.commit_interval's default): one batch per commit.
COMMIT_INTERVAL = 0.1
# uplink.batch_max_readings's default: a commit with more readings goes as several messages.
BATCH_MAX_READINGS = 500
# Devices behind each gateway, each reporting temp and hum in turn.
DEVICES_PER_GATEWAY = 10


@dataclass(slots=True)
class Uplink:
    """One message a gateway publishes (or withholds, with --gap-every)."""

    t: float                 # seconds after the run's start when it is due
    gw: int                  # index of the gateway in the fleet
    topic: str
    payload: bytes
    props: wire.Properties
    content_type: str
    first: int               # seq_first
    last: int                # seq_last
    readings: int            # readings in it (0: an event)
    withheld: bool = False   # not published: a gap the cloud sees (kept for resend)


@dataclass(slots=True)
class Gateway:
    id: str
    phase: float
    head: bytes
    temp: list[float]
    hum: list[float]
    made: int = 0            # readings made so far
    seq: int = 1             # next seq
    batches: int = 0         # telemetry batches made
    events: int = 0
    alert_on: bool = False
    history: deque[Uplink] = field(default_factory=deque)
    forgotten_to: int = 0    # the highest seq no longer in the history (0: none)
    withheld: list[tuple[int, int]] = field(default_factory=list)


# One process simulates at most this many gateways (state per gateway: ~1 KiB; more, from
# one process, would not keep their rate anyway).
MAX_GATEWAYS = 100_000


class GatewayFleet:
    def __init__(self, *, count: int, rate: float, seed: int, start: float,
                 prefix: str = "gw-", use_gzip: bool = False, events_every: int = 0,
                 gap_every: int = 0, history: int = 0, interval: float = COMMIT_INTERVAL,
                 batch_max: int = BATCH_MAX_READINGS,
                 devices: int = DEVICES_PER_GATEWAY) -> None:
        """``history``: seqs per gateway kept for resend requests (0: none kept);
        ``interval``: seconds between a gateway's batches; ``batch_max``: most readings in
        one telemetry message."""
        if not 1 <= count <= MAX_GATEWAYS:
            raise ValueError(f"--count must be 1..{MAX_GATEWAYS:,} (more: run several "
                             "generators, each with its own --prefix)")
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError("--rate must be a positive number of readings/s per gateway")
        if events_every < 0:
            raise ValueError("--events-every must be 0 (none) or more")
        if gap_every < 0 or gap_every == 1:
            raise ValueError("--gap-every must be 0 (no gaps) or 2 or more")
        if history < 0:
            raise ValueError("--history must be 0 or more")
        if not 0.001 <= interval <= 3600:
            raise ValueError("--batch-interval must be 1ms..1h")
        if batch_max < 1:
            raise ValueError("--batch must be at least 1")
        self.interval, self.batch_max = interval, batch_max
        self.count, self.rate, self.seed, self.start = count, rate, seed, start
        self.gzip, self.events_every, self.gap_every = use_gzip, events_every, gap_every
        self.history = history
        self._rng = rng = random.Random(seed)
        width = len(str(count))
        self.gateways = [
            Gateway(id=f"{prefix}{i + 1:0{width}d}", phase=rng.uniform(0, interval),
                    head=b"", temp=[rng.uniform(18, 24) for _ in range(devices)],
                    hum=[rng.uniform(35, 55) for _ in range(devices)])
            for i in range(count)]
        for gw in self.gateways:
            gw.head = wire.telemetry_head(gw.id)
        self.devices = [f"dev-{d + 1}" for d in range(devices)]
        # The schedule: commit k of gateway g is due at k * interval + phase(g);
        # within a round the gateways go in phase order.
        self._order = sorted(range(count), key=lambda i: self.gateways[i].phase)
        self._round = 0
        self._pos = 0

    # -- the schedule ------------------------------------------------------------------------

    def next_due(self) -> float:
        return self._round * self.interval + self.gateways[self._order[self._pos]].phase

    def due(self, until: float, limit: int = 1 << 30) -> list[Uplink]:
        """The messages due up to ``until`` seconds after the start, in order (whole commits,
        as many as stay within about ``limit`` messages)."""
        out: list[Uplink] = []
        order, gateways = self._order, self.gateways
        while len(out) < limit:
            gw = order[self._pos]
            t = self._round * self.interval + gateways[gw].phase
            if t > until:
                break
            self._commit(gw, t, out)
            self._pos += 1
            if self._pos == self.count:
                self._pos = 0
                self._round += 1
        return out

    def _commit(self, index: int, t: float, out: list[Uplink]) -> None:
        gw = self.gateways[index]
        rate = self.rate
        upto = math.floor(rate * t) + 1   # reading i is made at i / rate
        rnd = self._rng.random
        devices = self.devices
        ndev = len(devices)
        every = self.events_every
        batch: list[bytes] = []
        first = gw.seq
        start = self.start
        for i in range(gw.made, upto):
            d = i % ndev
            temp = gw.temp[d] = gw.temp[d] + (rnd() - 0.5) * 0.1
            hum = gw.hum[d] = min(100.0, max(0.0, gw.hum[d] + (rnd() - 0.5) * 0.3))
            batch.append(orjson.dumps({"seq": gw.seq, "device": devices[d],
                                       "ts": round(start + i / rate, 3),
                                       "temp": round(temp + (rnd() - 0.5) * 0.2, 2),
                                       "hum": round(hum, 1)}))
            gw.seq += 1
            if len(batch) == self.batch_max:
                self._telemetry(gw, index, t, first, batch, out)
                batch, first = [], gw.seq
            if every and (i + 1) % every == 0:
                if batch:
                    self._telemetry(gw, index, t, first, batch, out)
                    batch = []
                self._event(gw, index, t, devices[d], start + i / rate, temp, out)
                first = gw.seq
        gw.made = max(gw.made, upto)
        if batch:
            self._telemetry(gw, index, t, first, batch, out)

    def _telemetry(self, gw: Gateway, index: int, t: float, first: int, batch: list[bytes],
                   out: list[Uplink]) -> None:
        last = first + len(batch) - 1
        payload = gw.head + b",".join(batch) + b"]}"
        if self.gzip:
            payload = wire.compress(payload)
        gw.batches += 1
        withheld = bool(self.gap_every) and gw.batches % self.gap_every == 0
        if withheld:
            gw.withheld.append((first, last))
        self._keep(gw, Uplink(t, index, wire.telemetry_topic(gw.id), payload,
                              wire.seq_properties(first, last, compressed=self.gzip),
                              wire.TELEMETRY_TYPE, first, last, len(batch), withheld), out)

    def _event(self, gw: Gateway, index: int, t: float, device: str, when: float,
               value: float, out: list[Uplink]) -> None:
        seq = gw.seq
        gw.seq += 1
        gw.events += 1
        gw.alert_on = not gw.alert_on
        kind = "fired" if gw.alert_on else "resolved"
        event_type = f"io.fieldgate.alert.{kind}"
        value = round(value, 2)
        data = {"kind": kind, "time": when, "group": "fleetgen", "rule": "temp_high",
                "device": device, "severity": "warning", "labels": {"site": gw.id},
                "value": value, "expr": "avg(temp, 60s) > 30", "clear": "avg(temp, 60s) < 28",
                "threshold": "> 30", "window": {"avg(temp, 60s)": value},
                "message": f"{device}: temperature {value} ({kind})",
                "active_since": when if gw.alert_on else None}
        payload = wire.cloud_event(gw.id, seq, event_type, device, when, data)
        self._keep(gw, Uplink(t, index, wire.event_topic(gw.id, event_type), payload,
                              wire.seq_properties(seq, seq, compressed=False),
                              wire.EVENT_TYPE, seq, seq, 0), out)

    def _keep(self, gw: Gateway, message: Uplink, out: list[Uplink]) -> None:
        out.append(message)
        if not self.history:
            if message.withheld:
                gw.forgotten_to = message.last
            return
        history = gw.history
        history.append(message)
        oldest = gw.seq - self.history   # keep the last `history` seqs
        while history and history[0].last < oldest:
            gw.forgotten_to = history.popleft().last

    # -- gap repair ----------------------------------------------------------------------------

    def resend(self, index: int, first: int, last: int, request_id: str
               ) -> tuple[list[Uplink], list[list[int]]]:
        """What gateway ``index`` re-sends for seqs ``first``..``last`` (from its history,
        cut to the range, each message with user property ``resend``), and the ranges it
        no longer (or never) had."""
        gw = self.gateways[index]
        again: list[Uplink] = []
        held_from = gw.forgotten_to + 1
        for message in gw.history:
            if message.last < first or message.first > last:
                continue
            again.append(self._cut(gw, message, first, last, request_id))
        missing = []
        if first < held_from:
            missing.append([first, min(last, held_from - 1)])
        if last >= gw.seq:
            missing.append([max(first, gw.seq, held_from), last])
        return again, missing

    def _cut(self, gw: Gateway, message: Uplink, first: int, last: int, request_id: str
             ) -> Uplink:
        props = [*message.props, ("resend", request_id)]
        if first <= message.first and message.last <= last:
            return Uplink(message.t, message.gw, message.topic, message.payload, props,
                          message.content_type, message.first, message.last,
                          message.readings)
        readings = [r for r in wire.decode_telemetry(message.payload, message.props)
                    ["readings"] if first <= r["seq"] <= last]
        lo, hi = readings[0]["seq"], readings[-1]["seq"]
        payload = gw.head + b",".join(orjson.dumps(r) for r in readings) + b"]}"
        if self.gzip:
            payload = wire.compress(payload)
        props = [*wire.seq_properties(lo, hi, compressed=self.gzip), ("resend", request_id)]
        return Uplink(message.t, message.gw, message.topic, payload, props,
                      message.content_type, lo, hi, len(readings))
