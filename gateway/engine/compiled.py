"""A rule ready to evaluate (parsed conditions, alert table) and the events it emits.

Event objects are built only for the few devices whose alert changed on a tick; their
numbers come from the tick's arrays in one conversion per rule, not per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.engine import expr as ex
from gateway.engine.alerts import AlertTable
from gateway.engine.events import AlertEvent, CommandEvent, Event, Kind
from gateway.engine.rules import Group, Rule
from gateway.engine.store import F64, I64
from gateway.engine.vector import TickValues, evaluate


@dataclass(slots=True)
class CompiledRule:
    key: str  # "group/alert"
    group: Group
    rule: Rule
    fp: str  # fingerprint: state survives reload/restore only while it is equal
    cond: ex.Node
    clear: ex.Node | None
    head: ex.Node | None  # what an event reports as its value
    threshold: str
    windows: list[ex.Window]
    horizon: float  # longest window: how long state is held after a restore
    table: AlertTable


def compile_rule(group: Group, rule: Rule, key: str, fp: str, table: AlertTable,
                 lookback: float) -> CompiledRule:
    cond = ex.parse(rule.expr, lookback=lookback)
    clear = None if rule.clear is None else ex.parse(rule.clear, lookback=lookback)
    windows = ex.windows(cond) + [w for w in ex.windows(clear or ex.Num(0))
                                  if w not in ex.windows(cond)]
    head, threshold = ex.headline(cond)
    horizon = max(w.seconds for w in windows) if windows else 0.0
    return CompiledRule(key, group, rule, fp, cond, clear, head, threshold, windows, horizon,
                        table)


def json_floats(values: F64) -> list[float | None]:
    """Python floats, with None for NaN and infinities (JSON has neither)."""
    boxed = values.astype(object)
    boxed[~np.isfinite(values)] = None
    out: list[float | None] = boxed.tolist()
    return out


def context(rule: CompiledRule, device: str, value: float | None) -> dict[str, Any]:
    """Names a message or command template may use (checked when the file loads)."""
    r = rule.rule
    return {**r.labels, "device": device, "alert": r.alert, "group": rule.group.name,
            "severity": str(r.severity), "threshold": rule.threshold,
            "value": math.nan if value is None else value}


def alert_events(rule: CompiledRule, kind: Kind, rows: I64, values: TickValues, now: float,
                 devices: list[str]) -> list[Event]:
    """Alert events for ``rows`` (device indices) and the commands their actions send."""
    r = rule.rule
    heads: list[float | None] = [None] * rows.size if rule.head is None else \
        json_floats(evaluate(rule.head, values)[rows])
    names = [w.text for w in rule.windows]
    columns = [json_floats(values.window(w)[rows]) for w in rule.windows]
    summaries = [dict(zip(names, vals, strict=True)) for vals in zip(*columns, strict=True)] \
        if columns else [{} for _ in range(rows.size)]
    since = json_floats(rule.table.since[rows])
    base = context(rule, "", None)
    labels, severity, group = dict(r.labels), str(r.severity), rule.group.name
    out: list[Event] = []
    for j, i in enumerate(rows.tolist()):
        device, value = devices[i], heads[j]
        ctx = {**base, "device": device, "value": math.nan if value is None else value}
        out.append(AlertEvent(
            kind=kind, time=now, group=group, rule=r.alert, device=device,
            severity=severity, labels=labels, value=value, expr=r.expr, clear=r.clear,
            threshold=rule.threshold, window=summaries[j],
            message=r.message.format_map(ctx), active_since=since[j]))
    if kind is Kind.FLAPPING:
        return out
    trigger = "fire" if kind is Kind.FIRED else "resolve"
    for a, action in enumerate(r.actions):
        if action.on != trigger:
            continue
        for i in rule.table.take_cooldown(a, rows, now, action.cooldown).tolist():
            ctx = context(rule, devices[i], None)
            cmd = action.command
            params = {k: v.format_map(ctx) if isinstance(v, str) else v
                      for k, v in cmd.params.items()}
            out.append(CommandEvent(
                time=now, group=rule.group.name, rule=r.alert,
                device=cmd.device.format_map(ctx), action=cmd.action, params=params,
                trigger=kind, source_device=devices[i]))
    return out
