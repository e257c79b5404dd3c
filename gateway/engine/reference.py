"""A slow, obviously correct evaluator: plain Python, one reading and one device at a time.

It exists to check the vectorised engine (property tests, the benchmark baseline). It keeps
every accepted reading and recomputes each window from them at every tick. It follows the
same documented semantics: each window at its own bucket width (``store.width_for``),
bucket-aligned windows, late/future tolerances, duplicates counted once, undefined values
for missing data with three-valued conditions, the alert state machine, flapping and
cooldowns.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.engine import expr as ex
from gateway.engine.engine import EngineConfig
from gateway.engine.rules import Group, Rule
from gateway.engine.store import DEDUP_DEPTH, buckets_for, width_for
from gateway.engine.vector import VARIANCE_FLOOR

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "<": operator.lt,
        "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}

# (kind, time, "group/alert" or "", device, value or command action)
RefEvent = tuple[str, float, str, str, object]


@dataclass
class _Alert:
    state: str = "inactive"
    since: float = math.nan
    emitted: bool = False
    flapping: bool = False
    transitions: list[float] = field(default_factory=list)
    sent: dict[int, float] = field(default_factory=dict)


class ReferenceEvaluator:
    """Same inputs as ``Engine`` (rows instead of batches), events as plain tuples."""

    def __init__(self, groups: Sequence[Group], *, config: EngineConfig | None = None,
                 device_labels: dict[str, dict[str, str]] | None = None) -> None:
        self.config = config or EngineConfig()
        self.labels = device_labels or {}
        self.rules: list[tuple[Group, Rule, ex.Node, ex.Node | None]] = []
        look = self.config.lookback
        for g in groups:
            for r in g.rules:
                clear = None if r.clear is None else ex.parse(r.clear, lookback=look)
                self.rules.append((g, r, ex.parse(r.expr, lookback=look), clear))
        nodes = [n for _, _, c, k in self.rules for n in (c, k) if n is not None]
        wins = [w for n in nodes for w in ex.windows(n)]
        self.metrics = {w.metric for w in wins}
        self.devices: list[str] = []
        self.readings: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.newest: dict[tuple[str, str], list[float]] = {}  # DEDUP_DEPTH newest timestamps
        self.last_seen: dict[str, float] = {}
        self.offline: dict[str, bool] = {}
        self.alerts: dict[tuple[str, str], _Alert] = {}

    def ingest(self, rows: Sequence[tuple[str, str, float, float]], now: float) -> None:
        """One batch. A reading repeating (device, metric, ts) of an earlier one in the
        batch, or of one of the DEDUP_DEPTH newest counted before it, is left out."""
        this_batch: set[tuple[str, str, float]] = set()
        for device, metric, ts, _ in rows:
            if device not in self.devices:
                self.devices.append(device)
            if ts <= now + self.config.future_tolerance:
                self.last_seen[device] = max(self.last_seen.get(device, -math.inf), ts)
            too_late = ts < now - self.config.late_tolerance
            too_new = ts > now + self.config.future_tolerance
            if metric in self.metrics and not too_late and not too_new:
                newest = self.newest.get((device, metric), [])
                if (device, metric, ts) in this_batch or ts in newest:
                    continue
                this_batch.add((device, metric, ts))
        for device, metric, ts, value in rows:
            if (device, metric, ts) in this_batch:
                this_batch.discard((device, metric, ts))
                self.readings.setdefault((device, metric), []).append((ts, value))
                newest = self.newest.setdefault((device, metric), [])
                newest.append(ts)
                newest.sort(reverse=True)
                del newest[DEDUP_DEPTH:]

    # -- expressions --------------------------------------------------------------

    def _window(self, device: str, w: ex.Window, now: float) -> list[tuple[float, float]]:
        width = self.config.bucket_width or width_for(w.seconds)
        now_b = math.floor(now / width)
        k = buckets_for(w.seconds, width)
        return [(t, v) for t, v in self.readings.get((device, w.metric), [])
                if now_b - k < math.floor(t / width) <= now_b]

    def function(self, device: str, w: ex.Window, now: float) -> float:  # noqa: PLR0911 - a table of formulas
        got = self._window(device, w, now)
        vals = [v for _, v in got]
        if w.func == "absent":
            return 1.0 if not vals else 0.0
        if (device, w.metric) not in self.readings:
            return math.nan  # never sent: no sample, so nothing to say
        if w.func == "count":
            return float(len(vals))
        if w.func == "sum":
            return float(sum(vals))
        if not vals:
            return math.nan
        last_t, last_v = got[0]
        first_t, first_v = got[0]
        for t, v in got:
            if t >= last_t:
                last_t, last_v = t, v
            if t < first_t:
                first_t, first_v = t, v
        mean = sum(vals) / len(vals)
        if w.func == "avg":
            return mean
        if w.func in ("min", "max"):
            return float(min(vals) if w.func == "min" else max(vals))
        if w.func == "last":
            return last_v
        if w.func == "delta":
            return last_v - first_v
        if w.func == "rate":
            return (last_v - first_v) / (last_t - first_t) if last_t > first_t else math.nan
        var = statistics.pvariance(vals)
        std = 0.0 if var <= VARIANCE_FLOOR * max(1.0, mean * mean) else math.sqrt(var)
        if w.func == "std":
            return std
        return (last_v - mean) / std if std > 0 else math.nan

    def value(self, device: str, node: ex.Node, now: float) -> float:  # noqa: PLR0911 - one return per node type is the plainest form
        if isinstance(node, ex.Num):
            return node.value
        if isinstance(node, ex.Window):
            return self.function(device, node, now)
        if isinstance(node, ex.Abs):
            return abs(self.value(device, node.arg, now))
        if isinstance(node, ex.Neg):
            return -self.value(device, node.arg, now)
        if isinstance(node, ex.Not):
            arg = self.value(device, node.arg, now)
            return math.nan if math.isnan(arg) else 1.0 - arg
        a, b = self.value(device, node.left, now), self.value(device, node.right, now)
        if node.op == "and":
            if a == 0 or b == 0:
                return 0.0
            return math.nan if math.isnan(a) or math.isnan(b) else 1.0
        if node.op == "or":
            if a == 1 or b == 1:
                return 1.0
            return math.nan if math.isnan(a) or math.isnan(b) else 0.0
        if node.op == "/":
            return a / b if b != 0 and not math.isnan(b) else math.nan
        if math.isnan(a) or math.isnan(b):
            return math.nan
        if node.op == "!=":
            return float(a != b)
        return float(_OPS[node.op](a, b))

    # -- alerts ---------------------------------------------------------------------

    def _matches(self, group: Group, device: str) -> bool:
        labels = self.labels.get(device, {})
        return fnmatch.fnmatchcase(device, group.match.device) and all(
            labels.get(k) == v for k, v in group.match.labels.items())

    def tick(self, now: float) -> list[RefEvent]:
        out: list[RefEvent] = []
        for group, rule, cond_node, clear_node in self.rules:
            key = f"{group.name}/{rule.alert}"
            for device in self.devices:
                if not self._matches(group, device):
                    continue
                out.extend(self._step(key, rule, device, cond_node, clear_node, now))
        after = self.config.offline_after
        for device in self.devices:
            seen = self.last_seen.get(device, -math.inf)
            if after is None or math.isinf(seen):
                continue
            silent = now - seen > after
            if silent != self.offline.get(device, False):
                out.append(("offline" if silent else "online", now, "", device, None))
            self.offline[device] = silent
        return out

    def _step(self, key: str, rule: Rule, device: str, cond_node: ex.Node,
              clear_node: ex.Node | None, now: float) -> list[RefEvent]:
        a = self.alerts.setdefault((key, device), _Alert())
        cond = self.value(device, cond_node, now) > 0
        changed = False
        if a.state == "inactive" and cond:
            a.since = now
            a.state = "firing" if rule.for_ <= 0 else "pending"
            changed = a.state == "firing"
        elif a.state == "pending" and not cond:
            a.state, a.since = "inactive", math.nan
        elif a.state == "pending" and now - a.since >= rule.for_:
            a.state, changed = "firing", True
        elif a.state == "firing":
            ends = (self.value(device, clear_node, now) > 0) if clear_node else not cond
            if ends:
                a.state, a.since, changed = "inactive", math.nan, True
        out: list[RefEvent] = []
        k = rule.flapping.transitions
        if k > 0:
            if changed:
                a.transitions.append(now)
            flapping = len(a.transitions) >= k and a.transitions[-k] >= now - rule.flapping.window
            if flapping and not a.flapping:
                out.append(("flapping", now, key, device, None))
            a.flapping = flapping
        if a.flapping:
            return out
        firing = a.state == "firing"
        if firing == a.emitted:
            return out
        a.emitted = firing
        kind = "fired" if firing else "resolved"
        out.append((kind, now, key, device, None))
        for i, action in enumerate(rule.actions):
            if action.on == ("fire" if firing else "resolve") and \
                    now - a.sent.get(i, -math.inf) >= action.cooldown:
                a.sent[i] = now
                out.append(("command", now, key, device, action.command.action))
        return out
