"""Rule tests beside the rule files, in the spirit of ``promtool test rules``.

A test file names rule files, input series per device and metric in a compact notation,
and the alerts and commands expected at given times. ``run_tests`` runs the engine
tick by tick over the series and returns one result per test with a readable diff. The
test file and its rule files arrive as text (gateway.rulefiles reads them).

Series notation (one value per ``interval``, starting at time 0)::

    20 21 22        three values        20+1x3     20 21 22 23
    5x2             5 5 5               30-2x2     30 28 26
    _               no reading          _x3        three missing readings
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fieldkit.units import Duration, format_duration
from gateway.engine.engine import Engine, EngineConfig
from gateway.engine.events import AlertEvent, CommandEvent, Event
from gateway.engine.rules import Group, load_yaml, locate
from gateway.errors import ConfigError

_ITEM_RE = re.compile(
    r"^(?P<start>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"(?:(?P<sign>[+-])(?P<step>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?))?(?:x(?P<n>\d+))?$")
_GAP_RE = re.compile(r"^_(?:x(?P<n>\d+))?$")


def expand_series(text: str) -> list[float | None]:
    """``"20+1x3 _ 5"`` -> ``[20, 21, 22, 23, None, 5]``; None is a missing reading."""
    out: list[float | None] = []
    for item in str(text).split():
        gap = _GAP_RE.match(item)
        if gap:
            out.extend([None] * int(gap["n"] or 1))
            continue
        m = _ITEM_RE.match(item)
        if m is None or (m["sign"] and m["n"] is None):
            raise ValueError(f"series item {item!r} is not a number, a+bxN, axN, _ or _xN")
        start = float(m["start"])
        step = float(m["step"] or 0) * (-1 if m["sign"] == "-" else 1)
        count = 1 if m["n"] is None else int(m["n"]) + 1
        out.extend(start + i * step for i in range(count))
    return out


class DeviceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: dict[str, str] = Field(default_factory=dict, description="Device labels.")
    series: dict[str, str] = Field(description="metric -> series in the compact notation.")


class AlertCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: Duration = Field(description="Test time of the check.")
    alert: str = Field(description="Alert name.")
    devices: list[str] = Field(description="Devices that must be firing (exactly).")


class EventCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: Duration = Field(description="Tick time of the event.")
    kind: Literal["fired", "resolved", "flapping", "command"]
    alert: str
    device: str = Field(description="Alerting device (for a command: its target).")
    action: str | None = Field(None, description="Command action (commands only).")
    params: dict[str, Any] | None = Field(None, description="Command params, when checked.")


class RuleTest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    interval: Duration = Field(1.0, gt=0, description="Time between series values.")
    devices: dict[str, DeviceInput]
    alerts: list[AlertCheck] = Field(default_factory=list)
    events: list[EventCheck] | None = Field(None, description="If given: every alert "
                                            "transition and command, exactly.")


class RuleTestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule_files: list[str] = Field(min_length=1, description="Relative to the test file.")
    evaluation_interval: Duration = Field(1.0, gt=0, description="Time between ticks.")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields.")
    tests: list[RuleTest] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    file: str
    name: str
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def _event_line(at: float, kind: str, alert: str, device: str, action: str | None) -> str:
    tail = f" {action}" if action else ""
    return f"{format_duration(at) if at else '0s'} {kind} {alert} {device}{tail}"


def parse_test_file(text: str, source: str) -> RuleTestFile:
    """A rule test file from its text; ``source`` names it in every problem (ConfigError)."""
    data = load_yaml(text, source)
    try:
        spec = RuleTestFile.model_validate(data)
        for test in spec.tests:
            for dev in test.devices.values():
                for series in dev.series.values():
                    expand_series(series)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
            line, _ = locate(data, loc)
            where = ".".join(str(p) for p in loc)
            problems.append(f"{source}:{line}: {where}: {err['msg']}")
        raise ConfigError(problems) from None
    except ValueError as exc:
        raise ConfigError([f"{source}: {exc}"]) from None
    return spec


def run_tests(spec: RuleTestFile, source: str, groups: list[Group]) -> list[RuleTestResult]:
    """Run every test of ``spec`` (from the file ``source``) against ``groups``, the rules
    of the files it names (gateway.rulefiles.run_test_file reads both from disk)."""
    config = EngineConfig.model_validate({"offline_after": None, **spec.engine})
    return [_run(source, spec, test, Engine(groups, config=config)) for test in spec.tests]


def _run(source: str, spec: RuleTestFile, test: RuleTest, engine: Engine) -> RuleTestResult:
    readings: list[tuple[float, str, str, float]] = []
    for device, inp in test.devices.items():
        engine.set_device_labels(device, inp.labels)
        for metric, text in inp.series.items():
            for i, value in enumerate(expand_series(text)):
                if value is not None:
                    readings.append((i * test.interval, device, metric, value))
    readings.sort(key=lambda r: r[0])
    checks = sorted(test.alerts, key=lambda c: c.at)
    end = max([r[0] for r in readings] + [c.at for c in test.alerts] +
              [e.at for e in test.events or []] + [0.0])
    step = spec.evaluation_interval
    known = {rule.alert for group in engine.groups for rule in group.rules}
    problems = [f"alert {name!r} is not defined in {', '.join(spec.rule_files)}"
                for name in sorted({c.alert for c in test.alerts} |
                                   {e.alert for e in test.events or []}) if name not in known]
    events: list[Event] = []
    pos, tick_no = 0, 0
    while tick_no * step <= end + 1e-9:
        now = tick_no * step
        batch = []
        while pos < len(readings) and readings[pos][0] <= now + 1e-9:
            ts, device, metric, value = readings[pos]
            batch.append((device, ts, {metric: value}))
            pos += 1
        engine.ingest(engine.batch(batch), now)
        events.extend(engine.tick(now))
        firing = engine.firing()
        while checks and checks[0].at <= now + 1e-9:
            check = checks.pop(0)
            got = sorted(d for key, d in firing if key.split("/", 1)[1] == check.alert)
            if got != sorted(check.devices):
                problems.append(f"at {format_duration(check.at)}: alert {check.alert} firing "
                                f"for {got}, expected {sorted(check.devices)}")
        tick_no += 1
    if test.events is not None:
        problems.extend(_compare_events(test.events, events))
    return RuleTestResult(source, test.name, tuple(problems))


def _compare_events(expected: list[EventCheck], events: list[Event]) -> list[str]:
    actual: list[tuple[str, dict[str, Any] | None]] = []
    for ev in events:
        if isinstance(ev, AlertEvent):
            actual.append((_event_line(ev.time, str(ev.kind), ev.rule, ev.device, None), None))
        elif isinstance(ev, CommandEvent):
            actual.append((_event_line(ev.time, "command", ev.rule, ev.device, ev.action),
                           dict(ev.params)))
    want = [_event_line(e.at, e.kind, e.alert, e.device, e.action) for e in expected]
    got = [line for line, _ in actual]
    if want != got:
        diff = difflib.unified_diff(want, got, "expected", "actual", lineterm="", n=2)
        return ["events differ:\n" + "\n".join(diff)]
    return [f"{line}: params {json.dumps(params, sort_keys=True)}, expected "
            f"{json.dumps(e.params, sort_keys=True)}"
            for e, (line, params) in zip(expected, actual, strict=True)
            if e.params is not None and e.params != params]

