"""The vectorised rule engine: rule files in, alert/command/device events out.

Pure computation: no I/O besides reading rule files, no clock (callers pass ``now``).
"""

from gateway.engine.engine import Batch, Engine, EngineConfig, ReloadReport
from gateway.engine.events import AlertEvent, CommandEvent, DeviceEvent, Event, Kind
from gateway.engine.expr import ExprError, parse
from gateway.engine.rules import Group, Rule, RuleFile, load_rule_files, parse_rule_file
from gateway.engine.store import width_for

__all__ = [
    "AlertEvent", "Batch", "CommandEvent", "DeviceEvent", "Engine", "EngineConfig", "Event",
    "ExprError", "Group", "Kind", "ReloadReport", "Rule", "RuleFile", "load_rule_files",
    "parse", "parse_rule_file", "width_for",
]
