"""Rule files: YAML shaped like Prometheus alerting rules, validated by pydantic models.

A mistake is reported as ``file:line: rule NAME: field: what is wrong`` using the YAML
node marks, so an operator can jump to it. Loading parses every expression; nothing is
evaluated here.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.engine import expr as ex
from gateway.errors import ConfigError
from gateway.units import Duration

# Placeholders a message or command template may use besides the rule's labels.
TEMPLATE_FIELDS = frozenset({"device", "value", "alert", "group", "severity", "threshold"})


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


def check_template(text: str, extra: frozenset[str]) -> None:
    """Allow only plain ``{name}`` / ``{name:spec}`` fields: no attribute or index access."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"template {text!r} is malformed: {exc}") from None
    for _, field, _, conversion in parts:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS | extra or conversion not in (None, "s", "r"):
            known = ", ".join(sorted(TEMPLATE_FIELDS | extra))
            raise ValueError(f"template field {{{field}}} is unknown; use one of {known}")
    # Render once with sample values so a bad format spec fails here, not at the first alert.
    sample: dict[str, object] = dict.fromkeys(TEMPLATE_FIELDS | extra, "x")
    sample["value"] = 1.0
    try:
        text.format_map(sample)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"template {text!r} cannot be rendered: {exc}") from None


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str = Field("{device}", description="Target device (a template).")
    action: str = Field(description="Action name the device understands, e.g. fan.")
    params: dict[str, Any] = Field(default_factory=dict, description="Action parameters.")


class Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    on: Literal["fire", "resolve"] = Field(description="Issue on firing or on resolving.")
    command: Command = Field(description="The command sent to the device.")
    cooldown: Duration = Field(0.0, ge=0, description="Least time between two sends.")


class Flapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    transitions: int = Field(6, ge=0, description="Changes within `window` that mean "
                             "flapping; 0 turns suppression off.")
    window: Duration = Field(600.0, gt=0, description="How far back changes are counted.")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    alert: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Alert name.")
    expr: str = Field(description="Condition that makes the alert pending/firing.")
    clear: str | None = Field(None, description="Condition that resolves a firing alert "
                              "(hysteresis); default: expr no longer holds.")
    for_: Duration = Field(0.0, alias="for", ge=0, description="How long expr must hold.")
    severity: Severity = Field(Severity.WARNING, description="info, warning or critical.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels.")
    message: str = Field("{alert} on {device}", description="Event message template.")
    actions: list[Action] = Field(default_factory=list, description="Commands to issue.")
    flapping: Flapping = Field(default_factory=Flapping, description="Flap suppression.")

    @field_validator("expr", "clear")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            ex.parse(value)
        return value

    @model_validator(mode="after")
    def _templates(self) -> Rule:
        extra = frozenset(self.labels)
        check_template(self.message, extra)
        for action in self.actions:
            check_template(action.command.device, extra)
            for value in action.command.params.values():
                if isinstance(value, str):
                    check_template(value, extra)
        return self

    def condition(self) -> ex.Node:
        return ex.parse(self.expr)

    def clear_condition(self) -> ex.Node | None:
        return None if self.clear is None else ex.parse(self.clear)


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str = Field("*", description="Glob over device ids, e.g. gh-*.")
    labels: dict[str, str] = Field(default_factory=dict, description="Device labels "
                                   "that must all be equal.")


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, description="Group name, unique over all files.")
    match: Match = Field(default_factory=Match, description="Devices the rules apply to.")
    rules: list[Rule] = Field(min_length=1, description="The rules.")

    @model_validator(mode="after")
    def _unique(self) -> Group:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.alert in seen:
                raise ValueError(f"alert {rule.alert!r} appears twice in group {self.name!r}")
            seen.add(rule.alert)
        return self


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    groups: list[Group] = Field(description="Rule groups.")


def fingerprint(group: Group, rule: Rule) -> str:
    """Changes whenever anything that decides the rule's alerts changes."""
    body = {"match": group.match.model_dump(), "rule": rule.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class _Located(dict[Any, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    line = 0
    key_lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    """Safe loader where only true/false are booleans (``on:`` and ``state: on`` stay text)."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Located:
    loader.flatten_mapping(node)
    out = _Located()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML keeping line numbers; a syntax error becomes a ConfigError."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}{line}: YAML syntax error: {problem}"]) from None


def locate(data: Any, loc: tuple[int | str, ...]) -> tuple[int, str | None]:
    """Line of the deepest node on ``loc`` and the rule name on the way, if any."""
    line, rule, node = 1, None, data
    for part in loc:
        if isinstance(node, _Located):
            line = node.key_lines.get(part, node.line)
            if isinstance(node.get("alert"), str):
                rule = node["alert"]
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            if isinstance(node, _Located):
                line = node.line
        else:
            break
    if isinstance(node, _Located) and isinstance(node.get("alert"), str):
        rule = node["alert"]
    return line, rule


def parse_rule_file(text: str, source: str) -> RuleFile:
    """Validate one rule file; every problem is one line naming file, line and rule."""
    data = load_yaml(text, source)
    try:
        return RuleFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
            line, rule = locate(data, loc)
            where = ".".join(str(p) for p in loc) or "file"
            what = f"rule {rule}: " if rule else ""
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{source}:{line}: {what}{where}: {msg}")
        raise ConfigError(problems) from None


def load_rule_files(paths: list[str | Path]) -> list[Group]:
    """Load and check files; group names must be unique across all of them."""
    groups: list[Group] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{path}: cannot read rule file ({exc.strerror})")
            continue
        try:
            parsed = parse_rule_file(text, str(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        for group in parsed.groups:
            if group.name in seen:
                problems.append(f"{path}: group {group.name!r} is also defined in "
                                f"{seen[group.name]}; group names must be unique")
            seen[group.name] = str(path)
            groups.append(group)
    if problems:
        raise ConfigError(problems)
    return groups
