"""The vectorised engine against the slow reference evaluator on random rules and series.

Values are small integers and thresholds sit at k + 0.318, so no comparison depends on the
last bit of a float sum; any disagreement is a real difference in semantics.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.engine import EngineConfig
from gateway.engine.expr import WINDOW_FUNCS
from gateway.engine.rules import RuleFile
from tests.engine_helpers import run_both

NUM_FUNCS = sorted(f for f, kind in WINDOW_FUNCS.items() if kind == "num")
METRICS = ["temp", "hum"]
DEVICES = ["a", "b", "c"]


@st.composite
def condition(draw: st.DrawFn) -> str:
    def term() -> str:
        func = draw(st.sampled_from([*NUM_FUNCS, "bare"]))
        metric = draw(st.sampled_from(METRICS))
        if func == "bare":
            return metric
        return f"{func}({metric}, {draw(st.sampled_from([1, 2, 3, 5, 8, 13]))}s)"

    def compare() -> str:
        if draw(st.integers(0, 9)) == 0:
            return f"absent({draw(st.sampled_from(METRICS))}, {draw(st.integers(1, 6))}s)"
        left = term()
        if draw(st.booleans()):
            left = f"{left} {draw(st.sampled_from('+-*/'))} {term()}"
        if draw(st.integers(0, 5)) == 0:
            left = f"abs({left})"
        threshold = draw(st.integers(-5, 25)) + 0.318
        return f"{left} {draw(st.sampled_from(['>', '>=', '<', '<=', '!=']))} {threshold}"

    text = compare()
    if draw(st.booleans()):
        text = f"{text} {draw(st.sampled_from(['and', 'or']))} {compare()}"
    if draw(st.integers(0, 6)) == 0:
        text = f"not ({text})"
    return text


@st.composite
def rule_set(draw: st.DrawFn) -> list:
    rules = []
    for i in range(draw(st.integers(1, 3))):
        rule: dict[str, object] = {"alert": f"R{i}", "expr": draw(condition())}
        if draw(st.booleans()):
            rule["clear"] = draw(condition())
        rule["for"] = f"{draw(st.sampled_from([0, 0, 1, 2, 3.5]))}s"
        rule["flapping"] = {"transitions": draw(st.sampled_from([0, 2, 3, 6])),
                            "window": f"{draw(st.integers(2, 12))}s"}
        rule["actions"] = [{"on": draw(st.sampled_from(["fire", "resolve"])),
                            "command": {"action": "x"},
                            "cooldown": f"{draw(st.integers(0, 6))}s"}]
        rules.append(rule)
    match = draw(st.sampled_from(["*", "a", "[ab]"]))
    return list(RuleFile.model_validate(
        {"groups": [{"name": "g", "match": {"device": match}, "rules": rules}]}).groups)


@st.composite
def steps(draw: st.DrawFn) -> list:
    now = 1000.0
    out: list = []
    sent: list = []
    for _ in range(draw(st.integers(5, 40))):
        now += draw(st.sampled_from([0.5, 1.0, 1.0, 1.0, 2.0, 3.0]))
        rows = []
        for _ in range(draw(st.integers(0, 4))):
            if sent and draw(st.integers(0, 5)) == 0:
                # a duplicate: a reading sent before (same device, metric, ts), again
                rows.append(draw(st.sampled_from(sent[-12:])))
                continue
            # mostly fresh, some late (within and beyond tolerance), some from the future
            offset = draw(st.sampled_from([0, 0, 0, 0.25, 1, 2.5, 3.7, 9, 40, -0.5, -2]))
            rows.append((draw(st.sampled_from(DEVICES)), draw(st.sampled_from(METRICS)),
                         now - offset, float(draw(st.integers(0, 20)))))
        sent.extend(rows)
        out.append((now, rows))
    return out


@st.composite
def mixed_windows(draw: st.DrawFn) -> list:
    """Windows of very different lengths on one metric: each gets its own resolution."""
    rules = []
    for i in range(draw(st.integers(1, 4))):
        func = draw(st.sampled_from([*NUM_FUNCS, "absent"]))
        seconds = draw(st.sampled_from([2, 3, 7, 20, 45, 120, 600]))
        window = f"{func}({draw(st.sampled_from(METRICS))}, {seconds}s)"
        expr = window if func == "absent" else \
            f"{window} {draw(st.sampled_from(['>', '<']))} {draw(st.integers(0, 20)) + 0.318}"
        if draw(st.booleans()):
            expr = f"not ({expr})" if draw(st.booleans()) else f"{expr} or temp > 15.318"
        rules.append({"alert": f"W{i}", "expr": expr})
    return list(RuleFile.model_validate({"groups": [{"name": "g", "rules": rules}]}).groups)


@st.composite
def configs(draw: st.DrawFn) -> EngineConfig:
    return EngineConfig(
        bucket_width=draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
        late_tolerance=draw(st.sampled_from([1.0, 5.0, 30.0])),
        future_tolerance=draw(st.sampled_from([0.0, 1.0])),
        lookback=draw(st.sampled_from([3.0, 10.0])),
        offline_after=draw(st.sampled_from([None, 2.0, 4.0])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_set(), steps(), configs())
def test_engine_matches_reference(groups, timeline, config):
    got, want = run_both(groups, timeline, config)
    assert got == want


@settings(max_examples=50, deadline=None)
@given(steps())
def test_engine_matches_reference_on_many_rules(timeline):
    """Every function on both metrics at once, sharing cached windows."""
    rules = [{"alert": f"F{i}", "expr": f"{f}({m}, 4s) > 6.318"}
             for i, (f, m) in enumerate((f, m) for f in NUM_FUNCS for m in METRICS)]
    rules.append({"alert": "Abs", "expr": "absent(temp, 3s)"})
    groups = list(RuleFile.model_validate({"groups": [{"name": "g", "rules": rules}]}).groups)
    got, want = run_both(groups, timeline, EngineConfig(bucket_width=1.0, offline_after=3.0))
    assert got == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_windows(), steps())
def test_engine_matches_reference_with_mixed_window_lengths(groups, timeline):
    got, want = run_both(groups, timeline, EngineConfig(offline_after=None))
    assert got == want
