"""Rule files: YAML shaped like Prometheus alerting rules, validated by pydantic models.

A mistake is reported as ``file:line: rule NAME: field: what is wrong`` using the YAML
node marks, so an operator can jump to it. Loading parses every expression; nothing is
evaluated here. Rules arrive as text with a source name; gateway.rulefiles reads the files.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fieldkit.units import Duration
from gateway.engine import expr as ex
from gateway.errors import ConfigError

# Placeholders a message or command template may use besides the rule's labels.
TEMPLATE_FIELDS = frozenset({"device", "value", "alert", "group", "severity", "threshold"})
# Widest field width or precision in a template format spec: a message is a line, and an
# unbounded width ({value:>2000000000}) would allocate gigabytes at the first alert.
MAX_FORMAT_WIDTH = 100
_SPEC_NUMBER_RE = re.compile(r"\d+")
# Says what is wrong with a device id ("" when it is usable). The engine does no I/O and
# knows no ingest rules: the gateway passes ingest's own check (gateway.ingest.decode).
DeviceCheck = Callable[[str], str | None]  # what is wrong with a device id, or None
# The device a command's device template is rendered with to check it: any valid id.
_SAMPLE_DEVICE = "d"


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
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS | extra or conversion not in (None, "s", "r"):
            known = ", ".join(sorted(TEMPLATE_FIELDS | extra))
            raise ValueError(f"template field {{{field}}} is unknown; use one of {known}")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"template field {{{field}:{spec}}}: a format spec cannot "
                             "contain another field")
        numbers = _SPEC_NUMBER_RE.findall(spec or "")
        if any(len(n) > 6 or int(n) > MAX_FORMAT_WIDTH for n in numbers):
            raise ValueError(f"template field {{{field}:{spec}}}: width and precision can be "
                             f"at most {MAX_FORMAT_WIDTH}")
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

    @field_validator("message")
    @classmethod
    def _message(cls, value: str, info: ValidationInfo) -> str:
        # Labels come before message in the model, so they are known here; a mistake is
        # then reported at the message's own line.
        check_template(value, frozenset(info.data.get("labels") or {}))
        return value

    @model_validator(mode="after")
    def _templates(self) -> Rule:
        extra = frozenset(self.labels)
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
        if not isinstance(key, str | int | float | bool | None):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be plain text", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML keeping line numbers; a syntax error becomes a ConfigError."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except RecursionError:
        # PyYAML composes and constructs recursively: thousands of nested [ or { end here.
        raise ConfigError([f"{source}:1: YAML nested too deeply"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or " ")
        raise ConfigError([f"{source}:{line}: YAML syntax error: unacceptable character "
                           f"#x{char:04x}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        problem = " ".join(str(problem).split())  # one line, whatever PyYAML says
        raise ConfigError([f"{source}:{line}: YAML syntax error: {problem}"]) from None


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


def parse_rule_file(text: str, source: str, *,
                    device_check: DeviceCheck | None = None) -> RuleFile:
    """Validate one rule file; every problem is one line naming file, line and rule.
    ``device_check``: when given, every command's device template, rendered, must pass it."""
    return _parse(text, source, device_check)[0]


def _command_devices(data: Any, parsed: RuleFile, source: str,
                     device_check: DeviceCheck) -> list[str]:
    """A problem for each command whose device template does not render to a device id
    (``+``, ``#`` or ``/`` would make the command topic a wildcard or another topic)."""
    problems = []
    for gi, group in enumerate(parsed.groups):
        for ri, rule in enumerate(group.rules):
            sample: dict[str, object] = {
                **rule.labels, "device": _SAMPLE_DEVICE, "alert": rule.alert,
                "group": group.name, "severity": str(rule.severity), "threshold": "x",
                "value": 1.0}
            for ai, action in enumerate(rule.actions):
                template = action.command.device
                problem = device_check(template.format_map(sample))
                if problem:
                    loc = ("groups", gi, "rules", ri, "actions", ai, "command", "device")
                    line, _ = locate(data, loc)
                    problems.append(_one_line(
                        f"{source}:{line}: rule {rule.alert}: {'.'.join(map(str, loc))}: "
                        f"{template!r} does not make a device id: {problem}; write "
                        "{device}, or a template such as fan-{device}"))
    return problems


def _parse(text: str, source: str,
           device_check: DeviceCheck | None = None) -> tuple[RuleFile, list[int]]:
    """The file and the line of each group's name (for duplicate reports)."""
    data = load_yaml(text, source)
    try:
        parsed = RuleFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
            line, rule = locate(data, loc)
            where = ".".join(str(p) for p in loc) or "file"
            what = f"rule {rule}: " if rule else ""
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(_one_line(f"{source}:{line}: {what}{where}: {msg}"))
        raise ConfigError(problems) from None
    if device_check is not None:
        problems = _command_devices(data, parsed, source, device_check)
        if problems:
            raise ConfigError(problems)
    return parsed, [locate(data, ("groups", i, "name"))[0] for i in range(len(parsed.groups))]


def _one_line(text: str) -> str:
    """A problem stays one line even when a key or value from the file holds line breaks."""
    if len(text.splitlines()) <= 1:
        return text
    return "".join(repr(part)[1:-1] if part.splitlines() != [part] else part
                   for part in text)


class RuleSet:
    """Rule files added one at a time, as text; group names must be unique across all of
    them, and every repeat is reported at its own line. ``device_check``: as for
    parse_rule_file. Problems are kept in the order the files were added."""

    def __init__(self, *, device_check: DeviceCheck | None = None) -> None:
        self._device_check = device_check
        self._groups: list[Group] = []
        self._problems: list[str] = []
        self._seen: dict[str, str] = {}

    def add(self, text: str, source: str) -> None:
        """Parse and check one file's text; ``source`` names it in every problem."""
        try:
            parsed, lines = _parse(text, source, self._device_check)
        except ConfigError as exc:
            self._problems.extend(exc.problems)
            return
        for group, line in zip(parsed.groups, lines, strict=True):
            where = f"{source}:{line}"
            if group.name in self._seen:
                self._problems.append(f"{where}: group {group.name!r} is also defined at "
                                      f"{self._seen[group.name]}; group names must be unique")
            else:
                self._seen[group.name] = where
            self._groups.append(group)

    def add_problems(self, problems: list[str]) -> None:
        """Problems found before parsing (a file that could not be read)."""
        self._problems.extend(problems)

    def groups(self) -> list[Group]:
        """Every group added; ConfigError with every problem when there was any."""
        if self._problems:
            raise ConfigError(list(self._problems))
        return list(self._groups)


def parse_rule_files(files: Iterable[tuple[str, str]], *,
                     device_check: DeviceCheck | None = None) -> list[Group]:
    """The groups of several rule files given as ``(source, text)`` pairs; see RuleSet."""
    rules = RuleSet(device_check=device_check)
    for source, text in files:
        rules.add(text, source)
    return rules.groups()
