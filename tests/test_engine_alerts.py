"""Alert life cycle: for, hysteresis, flapping, cooldown, events, liveness, restart, reload."""

from __future__ import annotations

import json

import pytest

from gateway.engine import AlertEvent, CommandEvent, DeviceEvent, Engine, EngineConfig, Kind
from gateway.engine.rules import RuleFile
from tests.engine_helpers import feed, one_rule

CFG = EngineConfig(bucket_width=1.0, offline_after=None)


def run(engine: Engine, values: list[float | None], start: int = 0, device: str = "d1",
        metric: str = "temp") -> list[tuple[int, str]]:
    """One reading (or none) and one tick per second; returns (second, kind) of events."""
    out = []
    for i, v in enumerate(values):
        t = float(start + i)
        feed(engine, [] if v is None else [(device, metric, t, v)], t)
        out.extend((start + i, str(e.kind)) for e in engine.tick(t))
    return out


def test_for_delays_firing_and_a_dip_resets_it():
    engine = Engine(one_rule("temp > 30", **{"for": "3s"}), config=CFG)
    events = run(engine, [31, 31, 29, 31, 31, 31, 31, 20])
    assert events == [(6, "fired"), (7, "resolved")]


def test_without_for_fires_at_once_and_events_only_on_transitions():
    engine = Engine(one_rule("temp > 30"), config=CFG)
    assert run(engine, [31, 32, 33, 10, 10, 31]) == [(0, "fired"), (3, "resolved"),
                                                     (5, "fired")]


def test_clear_hysteresis_keeps_firing_inside_the_band():
    engine = Engine(one_rule("temp > 30", clear="temp < 28"), config=CFG)
    assert run(engine, [31, 29, 28.5, 30, 27.9, 29, 31]) == [(0, "fired"), (4, "resolved"),
                                                           (6, "fired")]


def test_flapping_suppresses_until_quiet_then_reconciles():
    engine = Engine(one_rule("temp > 30", flapping={"transitions": 3, "window": "10s"}),
                    config=CFG)
    values = [31, 20, 31, 20, 31, 20] + [20] * 12
    assert run(engine, values) == [(0, "fired"), (1, "resolved"), (2, "flapping")]
    engine2 = Engine(one_rule("temp > 30", flapping={"transitions": 3, "window": "10s"}),
                     config=CFG)
    # Settles firing: once the changes age out of the window the fired event comes.
    events = run(engine2, [31, 20, 31, 20, 31] + [31] * 12)
    assert events == [(0, "fired"), (1, "resolved"), (2, "flapping"), (13, "fired")]


def test_flapping_can_be_turned_off():
    engine = Engine(one_rule("temp > 30", flapping={"transitions": 0}), config=CFG)
    assert len(run(engine, [31, 20] * 10)) == 20


def test_actions_with_cooldown():
    actions = [{"on": "fire", "command": {"action": "fan", "params": {"state": "on",
                                                                    "why": "{alert}"}},
                "cooldown": "10s"},
               {"on": "resolve", "command": {"device": "hub-{device}", "action": "fan",
                                             "params": {"state": "off"}}}]
    engine = Engine(one_rule("temp > 30", actions=actions, flapping={"transitions": 0}),
                    config=CFG)
    commands = []
    for i, v in enumerate([31, 20, 31, 20, 20, 20, 20, 20, 20, 20, 20, 20, 31]):
        feed(engine, [("d1", "temp", float(i), v)], float(i))
        commands += [(i, c.device, c.params["state"], c.params.get("why"), str(c.trigger))
                     for c in engine.tick(float(i)) if isinstance(c, CommandEvent)]
    assert commands == [
        (0, "d1", "on", "A", "fired"), (1, "hub-d1", "off", None, "resolved"),
        (3, "hub-d1", "off", None, "resolved"),  # the fire at 2 s was inside the cooldown
        (12, "d1", "on", "A", "fired"),
    ]


def test_event_carries_rule_device_values_and_message():
    rules = RuleFile.model_validate({"groups": [{
        "name": "gh", "match": {"device": "gh-*"}, "rules": [{
            "alert": "TooHot", "expr": "avg(temp, 3s) > 30 and hum < 50",
            "severity": "critical", "labels": {"team": "ops"},
            "message": "{device}: {value:.1f} C ({team}, {severity}, {threshold})"}]}]}).groups
    engine = Engine(rules, config=CFG)
    feed(engine, [("gh-1", "temp", 0.0, 31.0), ("gh-1", "temp", 1.0, 32.0),
                  ("gh-1", "hum", 1.0, 40.0), ("xx-1", "temp", 1.0, 90.0),
                  ("xx-1", "hum", 1.0, 1.0)], 1.0)
    (event,) = engine.tick(1.0)
    assert isinstance(event, AlertEvent)
    assert (event.kind, event.group, event.rule, event.device) == (Kind.FIRED, "gh", "TooHot",
                                                                   "gh-1")
    assert event.value == 31.5 and event.threshold == "> 30"
    assert event.window == {"avg(temp, 3s)": 31.5, "hum": 40.0}
    assert event.message == "gh-1: 31.5 C (ops, critical, > 30)"
    assert event.labels == {"team": "ops"} and event.severity == "critical"
    assert event.cloud_type == "io.fieldgate.alert.fired"
    json.dumps(event.to_dict(), allow_nan=False)  # ready for a CloudEvent data field
    with pytest.raises(AttributeError):
        event.value = 1.0  # type: ignore[misc]


def test_device_labels_select_devices():
    rules = RuleFile.model_validate({"groups": [{
        "name": "g", "match": {"labels": {"zone": "north"}},
        "rules": [{"alert": "A", "expr": "temp > 1"}]}]}).groups
    engine = Engine(rules, config=CFG, device_labels={"n1": {"zone": "north"}})
    engine.set_device_labels("n2", {"zone": "north"})
    feed(engine, [(d, "temp", 0.0, 5.0) for d in ("n1", "n2", "s1")], 0.0)
    assert sorted(e.device for e in engine.tick(0.0)) == ["n1", "n2"]


def test_offline_and_online_events():
    engine = Engine(one_rule("temp > 100"), config=EngineConfig(bucket_width=1.0,
                                                                 offline_after=5.0))
    seen = []
    for t in range(20):
        rows = [("d1", "temp", float(t), 1.0)] if t < 3 or t > 15 else []
        feed(engine, rows, float(t))
        seen += [(t, str(e.kind), e.device) for e in engine.tick(float(t))
                 if isinstance(e, DeviceEvent)]
    assert seen == [(8, "offline", "d1"), (16, "online", "d1")]


def test_snapshot_restore_neither_refires_nor_forgets():
    rule = one_rule("avg(temp, 5s) > 30", actions=[{"on": "fire",
                                                    "command": {"action": "fan"}}])
    engine = Engine(rule, config=CFG)
    assert run(engine, [31, 31, 31]) == [(0, "fired"), (0, "command")]
    saved = json.loads(json.dumps(engine.snapshot(), allow_nan=False))  # strict JSON
    fresh = Engine(rule, config=CFG)
    assert fresh.restore(saved, now=3.0) == []
    assert fresh.firing() == [("g/A", "d1")]
    # Windows are empty after the restart: nothing resolves while they refill ...
    assert run(fresh, [31, 31, 31, 31, 31, 31], start=3) == []
    # ... and it resolves normally once the data says so.
    assert run(fresh, [10] * 6, start=9)[0][1] == "resolved"


def test_restore_drops_state_of_changed_rules():
    engine = Engine(one_rule("temp > 30"), config=CFG)
    run(engine, [31])
    fresh = Engine(one_rule("temp > 35"), config=CFG)
    assert fresh.restore(engine.snapshot(), now=1.0) == ["g/A"]
    assert fresh.firing() == []


def test_snapshot_version_is_checked():
    with pytest.raises(ValueError, match="snapshot version"):
        Engine(one_rule("temp > 1"), config=CFG).restore({"version": 99}, 0.0)


def _two_rules(second_expr: str) -> list:
    return list(RuleFile.model_validate({"groups": [{"name": "g", "rules": [
        {"alert": "Keep", "expr": "temp > 30"},
        {"alert": "Edit", "expr": second_expr}]}]}).groups)


def test_reload_keeps_state_of_unchanged_rules_and_data():
    engine = Engine(_two_rules("temp > 20"), config=CFG)
    run(engine, [31])
    assert sorted(engine.firing()) == [("g/Edit", "d1"), ("g/Keep", "d1")]
    report = engine.reload(_two_rules("temp > 25") + list(RuleFile.model_validate(
        {"groups": [{"name": "h", "rules": [{"alert": "New", "expr": "temp > 0"}]}]}).groups))
    assert (report.kept, report.changed, report.added) == (["g/Keep"], ["g/Edit"], ["h/New"])
    assert engine.firing() == [("g/Keep", "d1")]
    # Series data survived the reload: the new rule sees the earlier reading.
    kinds = {(e.rule, str(e.kind)) for e in engine.tick(1.0)}
    assert kinds == {("Edit", "fired"), ("New", "fired")}
    report = engine.reload(list(RuleFile.model_validate({"groups": [{"name": "g", "rules": [
        {"alert": "Keep", "expr": "temp > 30"}]}]}).groups))
    assert (report.kept, report.removed) == (["g/Keep"], ["g/Edit", "h/New"])
    assert engine.firing() == [("g/Keep", "d1")]


def test_failed_reload_keeps_old_rules(tmp_path):
    from gateway.errors import ConfigError
    from gateway.rulefiles import load_rule_files

    path = tmp_path / "r.yaml"
    path.write_text("groups: [{name: g, rules: [{alert: A, expr: temp > 30}]}]\n")
    engine = Engine(load_rule_files([path]), config=CFG)
    run(engine, [31])
    path.write_text("groups: [{name: g, rules: [{alert: A, expr: temp >}]}]\n")
    with pytest.raises(ConfigError, match="ends too early"):
        engine.reload(load_rule_files([path]))
    assert [r.alert for g in engine.groups for r in g.rules] == ["A"]
    assert engine.firing() == [("g/A", "d1")]


def test_batch_from_ingest_readings():
    engine = Engine(one_rule("door > 0"), config=CFG)
    batch = engine.batch([("d1", 5.0, {"door": True, "temp": 21.5}), ("d2", 6.0, {"door": 0})])
    assert batch.value.tolist() == [1.0, 21.5, 0.0]
    assert batch.device.tolist() == [0, 0, 1] and batch.ts.tolist() == [5.0, 5.0, 6.0]
    engine.ingest(batch, 6.0)
    assert [e.device for e in engine.tick(6.0)] == ["d1"]


def test_reload_that_loses_series_data_holds_kept_alerts():
    config = EngineConfig(offline_after=None)
    engine = Engine(one_rule("avg(temp, 1m) > 30"), config=config)
    run(engine, [31, 31])
    bigger = list(RuleFile.model_validate({"groups": [
        {"name": "g", "rules": [{"alert": "A", "expr": "avg(temp, 1m) > 30"}]},
        {"name": "h", "rules": [{"alert": "Fast", "expr": "avg(temp, 500ms) > 100"}]}]}).groups)
    report = engine.reload(bigger)
    assert report.kept == ["g/A"]
    assert engine.widths == {"avg(temp, 1m)": 5.0, "avg(temp, 500ms)": 0.05}
    # The new, finer buckets start empty; the firing alert is held, not resolved.
    assert run(engine, [None, None], start=2) == []
    assert engine.firing() == [("g/A", "d1")]
