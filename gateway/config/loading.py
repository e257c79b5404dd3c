"""Loading a config file: YAML read with duplicate keys refused, then validated against the
models, every problem one line that names the field (or the line) and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fieldkit.problems import validation_problems as problems
from gateway.config.models import GatewayConfig
from gateway.errors import ConfigError


def validation_problems(err: ValidationError) -> list[str]:
    """One line per pydantic error: the field's dotted path, what is wrong, and the fix."""
    return problems(err, unknown="unknown field; check the spelling against "
                    "`gateway config sample`", missing="required; see `gateway config sample`")


def parse_config(data: object) -> GatewayConfig:
    """Validate parsed YAML; raises ConfigError with one line per problem."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of sections, e.g. gateway_id: ..."])
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_problems(err)) from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key twice in one YAML mapping: which value was meant cannot be known."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key twice in one mapping (PyYAML keeps the last one
    silently). Keys brought in by a merge (``<<: *anchor``) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKeyError(
                        None, None, f"{key!r} appears twice in one mapping (which one was "
                        "meant is unknown); keep one", key_node.start_mark)
                seen.add(key)
            except TypeError:
                continue  # unhashable: SafeLoader refuses it itself
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path) -> GatewayConfig:
    """Load and validate a YAML config file; raises ConfigError with one line per problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read the file ({err.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as err:
        line = err.problem_mark.line + 1 if err.problem_mark is not None else 0
        raise ConfigError([f"line {line}: {err.problem}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(err, 'problem', err)})"]) from None
    return parse_config(data)
