"""Every window function and operator on small hand-checked series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine import Engine, EngineConfig, width_for
from gateway.engine import expr as ex
from gateway.engine.vector import TickValues, evaluate, falsity, truth
from tests.engine_helpers import feed, one_rule
from tests.test_engine_reference import condition, steps

CFG = EngineConfig(bucket_width=1.0, offline_after=None, lookback=60)
# temp readings at t = 0..9: 10, 12, ..., 28 (t=4 missing)
ROWS = [("d1", "temp", float(t), 10.0 + 2 * t) for t in range(10) if t != 4]


def value(text: str, rows=ROWS, now: float = 9.0, config: EngineConfig = CFG,
          extra: str = "") -> float:
    # The engine stores only metrics its rules read, so the rule names the expression.
    try:
        node = ex.parse(text, want="num", lookback=config.lookback)
        rule = f"({text}) > 0 or absent(temp, 1s)"
    except ex.ExprError:  # a condition: 1.0 when it holds
        node = ex.parse(text, lookback=config.lookback)
        rule = f"({text}) or absent(temp, 1s)"
    if extra:
        rule += f" or ({extra})"
    engine = Engine(one_rule(rule), config=config)
    feed(engine, rows, now)
    engine.store.advance(now)
    values = TickValues(engine.store, engine._metric_ids, now, len(engine.devices))
    return float(evaluate(node, values)[0])


@pytest.mark.parametrize(("text", "want"), [
    ("last(temp, 5s)", 28.0),
    ("temp", 28.0),
    ("count(temp, 5s)", 5.0),            # t = 5..9
    ("count(temp, 6s)", 5.0),            # t = 4 is missing
    ("sum(temp, 3s)", 24 + 26 + 28),
    ("avg(temp, 3s)", 26.0),
    ("min(temp, 10s)", 10.0),
    ("max(temp, 10s)", 28.0),
    ("delta(temp, 10s)", 18.0),
    ("rate(temp, 10s)", 2.0),
    ("std(temp, 3s)", math.sqrt(8 / 3)),
    ("zscore(temp, 3s)", 2 / math.sqrt(8 / 3)),
    ("abs(10 - temp)", 18.0),
    ("-temp + 2 * 3 / 2", -25.0),
    ("temp / 0", math.nan),
])
def test_window_functions(text, want):
    got = value(text)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_absent_and_empty_windows():
    rows = [("d1", "temp", 1.0, 5.0)]
    assert value("absent(temp, 3s)", rows=rows, now=9.0) == 1.0
    assert value("absent(temp, 10s)", rows=rows, now=9.0) == 0.0
    assert value("count(temp, 3s)", rows=rows, now=9.0) == 0.0
    assert value("sum(temp, 3s)", rows=rows, now=9.0) == 0.0
    for func in ("avg", "min", "max", "last", "std", "delta", "rate", "zscore"):
        assert math.isnan(value(f"{func}(temp, 3s)", rows=rows, now=9.0)), func


def test_single_reading_has_no_rate_and_flat_series_no_zscore():
    assert math.isnan(value("rate(temp, 5s)", rows=[("d1", "temp", 8.0, 3.0)]))
    flat = [("d1", "temp", float(t), 7.0) for t in range(10)]
    assert value("std(temp, 5s)", rows=flat) == 0.0
    assert math.isnan(value("zscore(temp, 5s)", rows=flat))


def test_bare_metric_looks_back_only_so_far():
    rows = [("d1", "temp", 1.0, 5.0)]
    assert value("temp", rows=rows, now=30.0) == 5.0
    assert math.isnan(value("temp", rows=rows, now=100.0))


def test_out_of_order_readings_keep_time_order_for_last_and_first():
    rows = [("d1", "temp", 9.0, 1.0), ("d1", "temp", 5.0, 100.0), ("d1", "temp", 7.0, 50.0),
            ("d1", "temp", 9.0, 2.0)]  # same timestamp: a duplicate, the first one counts
    assert value("last(temp, 10s)", rows=rows) == 1.0
    assert value("delta(temp, 10s)", rows=rows) == 1.0 - 100.0
    assert value("count(temp, 10s)", rows=rows) == 3.0


def test_comparisons_with_undefined_are_undefined():
    rows = [("d1", "temp", 1.0, 5.0)]
    for op in ("<", "<=", ">", ">=", "==", "!="):
        assert math.isnan(value(f"(avg(temp, 2s) {op} 1)", rows=rows))
    assert math.isnan(value("(not (avg(temp, 2s) > 1))", rows=rows))
    # Kleene: a decided side wins over an undefined one
    assert value("(avg(temp, 2s) > 1 and temp > 100)", rows=rows) == 0.0
    assert value("(avg(temp, 2s) > 1 or temp > 1)", rows=rows) == 1.0
    assert math.isnan(value("(avg(temp, 2s) > 1 or temp > 100)", rows=rows))


def test_logic_and_comparisons():
    assert value("(temp > 20 and temp < 30)") == 1.0
    assert value("(temp > 30 or temp == 28)") == 1.0
    assert value("(temp != 28)") == 0.0


def test_windows_are_bucket_aligned():
    # width 5 s: a 10 s window at t=12 covers buckets 1..2, i.e. readings at t = 5..12
    cfg = EngineConfig(bucket_width=5.0, offline_after=None)
    rows = [("d1", "temp", float(t), 1.0) for t in range(13)]
    assert value("count(temp, 10s)", rows=rows, now=12.0, config=cfg) == 8.0
    assert value("count(temp, 7s)", rows=rows, now=12.0, config=cfg) == 8.0


@pytest.mark.parametrize(("seconds", "width"), [
    (0.5, 0.05), (10, 1.0), (20, 2.0), (60, 5.0), (240, 15.0), (300, 30.0), (600, 60.0),
    (2400, 120.0), (3600, 300.0), (7 * 86400, 43200.0)])
def test_every_window_gets_its_own_resolution(seconds, width):
    """The README's rule: the largest round width giving the window at least 10 buckets."""
    assert width_for(seconds) == width
    assert 10 <= seconds / width < 25


def test_a_short_window_keeps_its_resolution_beside_long_ones():
    """Issue 8: a bare metric (5 min look-back) used to make avg(a, 20s) run on 5 s
    buckets, so readings 20-25 s old still counted; now it runs on 2 s buckets."""
    rules = one_rule("avg(a, 20s) > 3.55 and b > 0 and max(a, 40m) > 0")
    engine = Engine(rules, config=EngineConfig(offline_after=None))
    assert engine.widths == {"avg(a, 20s)": 2.0, "b": 30.0, "max(a, 40m)": 120.0}
    # One width for all (the old way) was 60 s here: avg(a, 20s) then averaged t = 0..25.
    rows = [("d", "a", float(t), 1.0 if t <= 7 else 4.0) for t in range(26)]
    rows += [("d", "b", 25.0, 1.0)]
    got = value("avg(a, 20s)", rows=rows, now=25.0, config=EngineConfig(offline_after=None),
                extra="b > 0 and max(a, 40m) > 0")
    # 2 s buckets: window = buckets 3..12 = t 6..25: 1 1 (t=6,7) and 18 x 4 -> 3.7
    assert got == pytest.approx((2 * 1 + 18 * 4) / 20)


def test_late_future_and_unused_readings_are_counted():
    engine = Engine(one_rule("avg(temp, 1m) > 1"), config=CFG)
    feed(engine, [("d", "temp", 100.0, 1.0), ("d", "temp", 10.0, 1.0),
                  ("d", "temp", 200.0, 1.0), ("d", "hum", 100.0, 1.0)], now=100.0)
    assert (engine.drops.late, engine.drops.future, engine.drops.unused) == (1, 1, 1)


def test_state_is_bounded_by_max_devices():
    engine = Engine(one_rule("avg(temp, 1m) > 1"),
                    config=EngineConfig(max_devices=2, offline_after=None))
    feed(engine, [(f"d{i}", "temp", 1.0, 1.0) for i in range(5)], now=1.0)
    assert engine.devices == ["d0", "d1"]
    assert engine.dropped_devices == 3
    assert np.all(engine.store.rings[engine.metric_id("temp")].planes["cnt"][:2].sum(1) == 1)


@settings(max_examples=200, deadline=None)
@given(condition(), steps(), st.sampled_from(["==", "!="]))
def test_truth_masks_agree_with_three_valued_evaluation(text, series, eq):
    """The tick decides conditions on masks (vector.truth); they must be exactly where
    the three-valued value is 1.0 (true) or 0.0 (false), NaN sides and all."""
    text = f"({text}) or (hum {eq} 7)"
    node = ex.parse(text, lookback=CFG.lookback)
    engine = Engine(one_rule(text), config=CFG)
    now = 0.0
    for now, rows in series:
        feed(engine, rows, now)
    engine.store.advance(now)
    values = TickValues(engine.store, engine._metric_ids, now, len(engine.devices))
    for part in (node, node.left, node.right, ex.Not(node)):
        value = evaluate(part, values)
        assert np.array_equal(truth(part, values), value > 0), part
        assert np.array_equal(falsity(part, values), value == 0), part
