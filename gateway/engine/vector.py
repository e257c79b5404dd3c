"""Evaluate parsed expressions for every device at once on the series store.

Each window function turns ``(devices, buckets)`` planes into one value per device;
values shared by several rules are computed once per tick (``TickValues`` caches them).

Missing data is *undefined* (NaN), never false: ``avg`` of an empty window, and every
function (``count`` and ``sum`` too) over a metric the device never sent. Conditions are
three-valued (1.0 true, 0.0 false, NaN undefined): a comparison with an undefined side is
undefined, ``not`` keeps it undefined, ``and``/``or`` follow Kleene's rules (false and x
is false, true or x is true). A rule fires only on true, so "no sample, no alert" as in
Prometheus: ``not avg(c, 20s) > 5`` does not fire for a device that never sent ``c``.
Only ``absent()`` speaks about missing data (true when the window is empty).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.engine import expr as ex
from gateway.engine.store import F64, SeriesStore

B = npt.NDArray[np.bool_]

# Variances below this fraction of mean² are rounding noise of sum-of-squares arithmetic
# (exact data would give 0); treating them as 0 keeps zscore undefined for flat series
# instead of huge. The reference evaluator applies the same cut-off.
VARIANCE_FLOOR = 1e-9

_BOOL = np.bool_


def stddev(cnt: F64, total: F64, sumsq: F64) -> F64:
    """Population standard deviation from window sums; NaN when there is no reading."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / cnt
        var = np.maximum(sumsq / cnt - mean * mean, 0.0)
        var = np.where(var <= VARIANCE_FLOOR * np.maximum(1.0, mean * mean), 0.0, var)
    return np.sqrt(var)


class TickValues:
    """Window-function values at one ``now``, shared by all rules of a tick."""

    def __init__(self, store: SeriesStore, metric_ids: dict[str, int], now: float,
                 devices: int) -> None:
        self.store = store
        self.metric_ids = metric_ids
        self.now = now
        self.devices = devices
        self._cache: dict[tuple[str, str, float], F64] = {}

    def _parts(self, metric: int, plane: str, seconds: float) -> list[F64]:
        return [p[: self.devices] for p in self.store.window(metric, plane, seconds, self.now)]

    def _reduce(self, metric: int, plane: str, seconds: float) -> F64:
        key = (str(metric), plane, seconds)
        if key not in self._cache:
            parts = self._parts(metric, plane, seconds)
            # One or two parts (a window that wraps around the ring), combined elementwise.
            if plane == "min":
                out = parts[0].min(axis=1, initial=np.inf)
                for p in parts[1:]:
                    out = np.minimum(out, p.min(axis=1, initial=np.inf))
            elif plane == "max":
                out = parts[0].max(axis=1, initial=-np.inf)
                for p in parts[1:]:
                    out = np.maximum(out, p.max(axis=1, initial=-np.inf))
            elif plane == "cnt":
                # Counts are small integers, whose sums are exact in any order: a
                # matrix-vector product (BLAS, strided rows) is several times faster
                # than ``sum(axis=1)`` and gives the same numbers.
                out = parts[0] @ np.ones(parts[0].shape[1])
                for p in parts[1:]:
                    out = out + p @ np.ones(p.shape[1])
            else:
                out = parts[0].sum(axis=1)
                for p in parts[1:]:
                    out = out + p.sum(axis=1)
            self._cache[key] = out
        return self._cache[key]

    def _pick(self, metric: int, seconds: float, which: str) -> tuple[F64, F64]:
        """Value and timestamp of the last (or first) reading in the window."""
        key_v, key_t = (str(metric), which, seconds), (str(metric), which + "_ts", seconds)
        if key_v not in self._cache:
            none = -np.inf if which == "last" else np.inf
            best_v = np.full(self.devices, np.nan)
            best_t = np.full(self.devices, none)
            rows = np.arange(self.devices)
            parts = [(ts, vals) for ts, vals in zip(
                self._parts(metric, which + "_ts", seconds),
                self._parts(metric, which, seconds), strict=True) if ts.shape[1]]
            for k, (ts, vals) in enumerate(parts):
                idx = ts.argmax(axis=1) if which == "last" else ts.argmin(axis=1)
                t, v = ts[rows, idx], vals[rows, idx]
                if k == 0:
                    # Against nothing yet: t is never worse than `none`, and is `none`
                    # only where the window is empty.
                    best_v, best_t = np.where(t != none, v, np.nan), t
                    continue
                # Parts hold different buckets, so timestamps never tie between them.
                better = t > best_t if which == "last" else t < best_t
                best_v = np.where(better, v, best_v)
                best_t = np.where(better, t, best_t)
            self._cache[key_v], self._cache[key_t] = best_v, best_t
        return self._cache[key_v], self._cache[key_t]

    def constant(self, value: float) -> F64:
        """``value`` for every device (shared: callers never write into it)."""
        key = ("", "num", value)
        if key not in self._cache:
            self._cache[key] = np.full(self.devices, value)
        return self._cache[key]

    def window(self, node: ex.Window) -> F64:
        """Value of ``func(metric, seconds)`` per device (1.0/0.0 for ``absent``)."""
        key = (node.func, node.metric, node.seconds)
        if key in self._cache:
            return self._cache[key]
        m = self.metric_ids.get(node.metric)
        if m is None or m not in self.store.seen:  # seen: the metrics with rings
            out = self._no_data(node.func)
        else:
            out = self._compute(node.func, m, node.seconds)
        self._cache[key] = out
        return out

    def _no_data(self, func: str) -> F64:
        return np.full(self.devices, 1.0 if func == "absent" else np.nan)

    def _if_seen(self, m: int, values: F64) -> F64:
        """``count``/``sum`` are 0 over an empty window, undefined for a device that never
        sent the metric."""
        return np.where(self.store.seen[m][: self.devices], values, np.nan)

    def _compute(self, func: str, m: int, s: float) -> F64:  # noqa: PLR0911 - a table of formulas
        with np.errstate(invalid="ignore", divide="ignore"):
            if func in ("count", "absent"):
                cnt = self._reduce(m, "cnt", s)
                return self._if_seen(m, cnt) if func == "count" else \
                    (cnt == 0).astype(np.float64)
            if func == "sum":
                return self._if_seen(m, self._reduce(m, "sum", s))
            if func == "avg":
                return self._reduce(m, "sum", s) / self._reduce(m, "cnt", s)
            if func in ("min", "max"):
                out = self._reduce(m, func, s)
                return np.where(np.isinf(out), np.nan, out)
            if func == "last":
                return self._pick(m, s, "last")[0]
            if func in ("delta", "rate"):
                last, last_ts = self._pick(m, s, "last")
                first, first_ts = self._pick(m, s, "first")
                if func == "delta":
                    return last - first
                span = last_ts - first_ts
                return np.where(span > 0, (last - first) / span, np.nan)
            cnt, total = self._reduce(m, "cnt", s), self._reduce(m, "sum", s)
            std = stddev(cnt, total, self._reduce(m, "sumsq", s))
            if func == "std":
                return std
            last = self._pick(m, s, "last")[0]
            return np.where(std > 0, (last - total / cnt) / std, np.nan)


def evaluate(node: ex.Node, values: TickValues) -> F64:  # noqa: PLR0911 - one per node type
    """Numbers for ``num`` nodes; 1.0/0.0/NaN (true/false/undefined) for conditions."""
    if isinstance(node, ex.Num):
        return values.constant(node.value)
    if isinstance(node, ex.Window):
        return values.window(node)
    if isinstance(node, ex.Abs):
        return np.abs(evaluate(node.arg, values))
    if isinstance(node, ex.Neg):
        return -evaluate(node.arg, values)
    if isinstance(node, ex.Not):
        return 1.0 - evaluate(node.arg, values)
    left, right = evaluate(node.left, values), evaluate(node.right, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        if isinstance(node, ex.Logic):
            return _kleene(node.op, left, right)
        return _binary(node.op, left, right)


def _kleene(op: str, a: F64, b: F64) -> F64:
    """Three-valued and/or: a decided side wins over an undefined one."""
    unknown = np.isnan(a) | np.isnan(b)
    if op == "and":
        decided = (a == 0) | (b == 0)
        return np.where(decided, 0.0, np.where(unknown, np.nan, 1.0))
    decided = (a == 1) | (b == 1)
    return np.where(decided, 1.0, np.where(unknown, np.nan, 0.0))


def _binary(op: str, a: F64, b: F64) -> F64:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)
    out = _COMPARE[op](a, b).astype(np.float64)
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


_COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
            "==": np.equal, "!=": np.not_equal}


def truth(node: ex.Node, values: TickValues) -> B:
    """Where condition ``node`` is true: ``evaluate(node, values) > 0``, decided on masks.

    A condition is 1.0, 0.0 or NaN, so it is true where it is 1.0: ``a and b`` where both
    are true, ``a or b`` where either is, ``not a`` where ``a`` is false, a comparison
    where it holds (a comparison with NaN never holds, except ``!=``). This skips the
    three-valued arithmetic the rule step does not need.
    """
    if isinstance(node, ex.Logic):
        left, right = truth(node.left, values), truth(node.right, values)
        return left & right if node.op == "and" else left | right
    if isinstance(node, ex.Not):
        return falsity(node.arg, values)
    if isinstance(node, ex.Binary) and node.op in _COMPARE:
        a, b = _operand(node.left, values), _operand(node.right, values)
        held = _COMPARE[node.op](a, b)
        if node.op == "!=":
            held = held & ~np.isnan(a) & ~np.isnan(b)
        return _per_device(held, values)
    out: B = evaluate(node, values) > 0
    return out


def falsity(node: ex.Node, values: TickValues) -> B:
    """Where condition ``node`` is false (0.0; not where it is undefined)."""
    if isinstance(node, ex.Logic):
        left, right = falsity(node.left, values), falsity(node.right, values)
        return left | right if node.op == "and" else left & right
    if isinstance(node, ex.Not):
        return truth(node.arg, values)
    if isinstance(node, ex.Binary) and node.op in _COMPARE:
        a, b = _operand(node.left, values), _operand(node.right, values)
        if node.op == "!=":
            return _per_device(np.equal(a, b), values)
        return _per_device(~_COMPARE[node.op](a, b) & ~np.isnan(a) & ~np.isnan(b), values)
    out: B = evaluate(node, values) == 0
    return out


def _operand(node: ex.Node, values: TickValues) -> F64 | float:
    """A comparison's side: a number stays a scalar (numpy broadcasts it)."""
    return node.value if isinstance(node, ex.Num) else evaluate(node, values)


def _per_device(mask: Any, values: TickValues) -> B:
    """One entry per device (a comparison of two numbers gives one bool)."""
    out: B = np.asarray(mask, dtype=np.bool_)
    if out.ndim == 0:
        out = np.full(values.devices, bool(out))
    return out
