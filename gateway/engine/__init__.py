"""The vectorised rule engine: rule files in, alert/command/device events out.

Pure computation: no I/O (rules arrive as text; gateway.rulefiles reads the files), no
clock (callers pass ``now``).
"""

from gateway.engine.engine import Batch, Engine, EngineConfig, ReloadReport
from gateway.engine.events import AlertEvent, CommandEvent, DeviceEvent, Event, Kind
from gateway.engine.expr import ExprError, parse
from gateway.engine.rules import Group, Rule, RuleFile, RuleSet, parse_rule_file, parse_rule_files
from gateway.engine.store import width_for

__all__ = [
    "AlertEvent", "Batch", "CommandEvent", "DeviceEvent", "Engine", "EngineConfig", "Event",
    "ExprError", "Group", "Kind", "ReloadReport", "Rule", "RuleFile", "RuleSet", "parse",
    "parse_rule_file", "parse_rule_files", "width_for",
]
