"""Shared helpers for the engine tests: build rules from text, run engine and reference."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.engine import Engine, EngineConfig
from gateway.engine.events import AlertEvent, CommandEvent, DeviceEvent, Event
from gateway.engine.reference import ReferenceEvaluator, RefEvent
from gateway.engine.rules import Group, parse_rule_file

Row = tuple[str, str, float, float]  # device, metric, ts, value


def groups(text: str) -> list[Group]:
    return list(parse_rule_file(text, "test.yaml").groups)


def one_rule(expr: str, **fields: object) -> list[Group]:
    """A single-group, single-rule set for ``expr`` with extra rule fields."""
    rule: dict[str, object] = {"alert": "A", "expr": expr, **fields}
    from gateway.engine.rules import RuleFile

    return list(RuleFile.model_validate({"groups": [{"name": "g", "rules": [rule]}]}).groups)


def as_tuple(ev: Event) -> RefEvent:
    if isinstance(ev, AlertEvent):
        return (str(ev.kind), ev.time, f"{ev.group}/{ev.rule}", ev.device, None)
    if isinstance(ev, CommandEvent):
        return ("command", ev.time, f"{ev.group}/{ev.rule}", ev.source_device, ev.action)
    assert isinstance(ev, DeviceEvent)
    return (str(ev.kind), ev.time, "", ev.device, None)


def feed(engine: Engine, rows: Sequence[Row], now: float) -> None:
    engine.ingest(engine.batch([(d, ts, {m: v}) for d, m, ts, v in rows]), now)


def run_both(grps: list[Group], steps: Sequence[tuple[float, Sequence[Row]]],
             config: EngineConfig | None = None) -> tuple[list[RefEvent], list[RefEvent]]:
    """Feed the same (now, rows) steps to both, ticking after each; sorted event tuples."""
    engine = Engine(grps, config=config)
    ref = ReferenceEvaluator(grps, config=config)
    got: list[RefEvent] = []
    want: list[RefEvent] = []
    for now, rows in steps:
        feed(engine, rows, now)
        ref.ingest(rows, now)
        got.extend(sorted(as_tuple(e) for e in engine.tick(now)))
        want.extend(sorted(ref.tick(now), key=repr))
    return sorted(got, key=repr), sorted(want, key=repr)
