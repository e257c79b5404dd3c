"""Rule files: valid files load; each mistake names file, line, rule and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.engine.rules import RuleSet, parse_rule_file, parse_rule_files
from gateway.errors import ConfigError
from gateway.rulefiles import load_rule_files

GOOD = """\
groups:
  - name: greenhouse
    match: {device: "gh-*", labels: {zone: north}}
    rules:
      - alert: TooHot
        expr: avg(temp, 60s) > 30
        clear: avg(temp, 60s) < 28
        for: 10s
        severity: critical
        labels: {team: ops}
        message: "{device}: {value:.1f} for {team}"
        actions:
          - on: fire
            command: {device: "{device}", action: fan, params: {state: on}}
            cooldown: 5m
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_rule_file(text, "rules/x.yaml")
    return info.value.problems


def test_good_file_loads_with_yaml_on_kept_as_text():
    (group,) = parse_rule_file(GOOD, "x.yaml").groups
    (rule,) = group.rules
    assert rule.for_ == 10 and rule.severity == "critical"
    (action,) = rule.actions
    assert action.on == "fire" and action.cooldown == 300
    assert action.command.params == {"state": "on"}  # YAML 1.1 would make this True


def test_expression_error_names_file_line_rule_and_column():
    text = GOOD.replace("expr: avg(temp, 60s) > 30", "expr: avg(temp, 60s)) > 30")
    (line,) = problems(text)
    assert line.startswith("rules/x.yaml:6: rule TooHot: groups.0.rules.0.expr: ")
    assert "unexpected ')' at column 15" in line


def test_every_problem_is_reported_with_its_own_line():
    text = GOOD.replace("for: 10s", "for: soon").replace("severity: critical",
                                                         "severity: dire")
    found = problems(text)
    assert len(found) == 2
    assert found[0].startswith("rules/x.yaml:8: rule TooHot: groups.0.rules.0.for: ")
    assert "'soon' is not a duration" in found[0]
    assert found[1].startswith("rules/x.yaml:9: rule TooHot: groups.0.rules.0.severity")


@pytest.mark.parametrize(("change", "needle"), [
    (("alert: TooHot", "alert: Too Hot"), "should match pattern"),
    (("cooldown: 5m", "cooldown: -1s"), "'-1s' is not a duration"),
    (("for: 10s", "for: -1"), "greater than or equal to 0"),
    (("on: fire", "on: always"), "'fire' or 'resolve'"),
    (("{value:.1f}", "{value.__class__}"), "template field {value.__class__} is unknown"),
    (("{team}", "{owner}"), "template field {owner} is unknown"),
    (("{team}", "{device:.1f}"), "cannot be rendered"),
    (("{state: on}", "{state: \"{nope}\"}"), "template field {nope} is unknown"),
    (("        for: 10s\n", "        for: 10s\n        colour: red\n"), "Extra inputs"),
    (("expr: avg(temp, 60s) > 30", "expr: avg(temp, 60s)"), "must be a condition"),
])
def test_rule_mistakes(change, needle):
    (line,) = problems(GOOD.replace(*change))
    assert line.startswith("rules/x.yaml:") and "rule Too" in line
    assert needle in line


def test_duplicate_alert_in_group():
    text = GOOD + GOOD.split("    rules:\n")[1]
    (line,) = problems(text)
    assert "alert 'TooHot' appears twice" in line


def test_yaml_syntax_error_has_line():
    (line,) = problems("groups:\n  - name: [unclosed\n")
    assert line.startswith("rules/x.yaml:3: YAML syntax error")


def test_files_and_unique_group_names(tmp_path: Path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(GOOD)
    b.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_rule_files([a, b, tmp_path / "missing.yaml"])
    text = "\n".join(info.value.problems)
    assert "group 'greenhouse' is also defined at" in text
    assert "missing.yaml: cannot read rule file" in text
    assert len(load_rule_files([a])) == 1


def test_rules_come_as_text_with_a_source_name():
    """The engine reads no file: several rule texts, each named by its source, are checked
    together, a repeated group reported where it repeats and where it was first defined."""
    assert len(parse_rule_files([("a.yaml", GOOD)])) == 1
    with pytest.raises(ConfigError) as info:
        parse_rule_files([("site/a.yaml", GOOD), ("site/b.yaml", "groups: [\n"),
                          ("site/c.yaml", GOOD)])
    assert info.value.problems[0].startswith("site/b.yaml:")
    assert info.value.problems[1] == ("site/c.yaml:2: group 'greenhouse' is also defined at "
                                      "site/a.yaml:2; group names must be unique")


def test_problems_keep_file_order_across_unreadable_files(tmp_path: Path):
    """A file that cannot be read is reported in its place among the others' mistakes."""
    bad = "groups:\n  - name: g\n    rules: []\n"
    a, c = tmp_path / "a.yaml", tmp_path / "c.yaml"
    a.write_text(bad)
    c.write_text(bad)
    missing = tmp_path / "b.yaml"
    with pytest.raises(ConfigError) as info:
        load_rule_files([a, missing, c])
    assert [p.split(":")[0] for p in info.value.problems] == [str(a), str(missing), str(c)]
    rules = RuleSet()
    rules.add(GOOD, "x.yaml")
    assert [g.name for g in rules.groups()] == ["greenhouse"]
