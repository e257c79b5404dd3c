"""Rule tests (promtool style): the series notation, the runner, and every example in rules/."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.engine.rules import parse_rule_files
from gateway.engine.ruletest import expand_series, parse_test_file, run_tests
from gateway.errors import ConfigError
from gateway.rulefiles import companion_test, load_rule_files, run_test_file

RULES = Path(__file__).resolve().parents[1] / "rules"


@pytest.mark.parametrize(("text", "values"), [
    ("20+1x3", [20, 21, 22, 23]),
    ("30-2x2", [30, 28, 26]),
    ("5x2", [5, 5, 5]),
    ("1 _ 2", [1, None, 2]),
    ("_x3 -1.5", [None, None, None, -1.5]),
    ("1e2 0.5+0.25x1", [100, 0.5, 0.75]),
    ("", []),
])
def test_series_notation(text, values):
    assert expand_series(text) == values


@pytest.mark.parametrize("text", ["x", "1+2", "1x", "_2", "1..2"])
def test_series_notation_errors(text):
    with pytest.raises(ValueError, match="series item"):
        expand_series(text)


def example_rule_files() -> list[Path]:
    return sorted(p for p in RULES.glob("*.yaml") if not p.name.endswith(".test.yaml"))


def test_there_are_examples():
    assert len(example_rule_files()) >= 3


@pytest.mark.parametrize("rule_file", example_rule_files(), ids=lambda p: p.name)
def test_every_example_loads_and_its_tests_pass(rule_file: Path):
    load_rule_files([rule_file])
    test_file = companion_test(rule_file)
    assert test_file.exists(), f"{rule_file.name} has no {test_file.name}"
    results = run_test_file(test_file)
    assert results
    failed = [f"{r.name}: {'; '.join(r.problems)}" for r in results if not r.passed]
    assert not failed, "\n".join(failed)


RULE = """\
groups:
  - name: g
    rules:
      - alert: Hot
        expr: temp > 30
        actions:
          - {on: fire, command: {action: fan, params: {state: on}}}
"""


def write(tmp_path: Path, test_yaml: str) -> Path:
    (tmp_path / "r.yaml").write_text(RULE)
    path = tmp_path / "r.test.yaml"
    path.write_text(test_yaml)
    return path


def test_failures_are_readable_diffs(tmp_path: Path):
    path = write(tmp_path, """\
rule_files: [r.yaml]
tests:
  - name: wrong on purpose
    devices: {d1: {series: {temp: "29 31 31"}}}
    alerts:
      - {at: 1s, alert: Hot, devices: []}
    events:
      - {at: 2s, kind: fired, alert: Hot, device: d1}
      - {at: 2s, kind: command, alert: Hot, device: d1, action: fan, params: {state: "on"}}
""")
    (result,) = run_test_file(path)
    assert not result.passed
    assert result.problems[0] == "at 1s: alert Hot firing for ['d1'], expected []"
    diff = result.problems[1]
    assert "-2s fired Hot d1" in diff and "+1s fired Hot d1" in diff


def test_params_are_checked_when_given(tmp_path: Path):
    path = write(tmp_path, """\
rule_files: [r.yaml]
tests:
  - name: params
    devices: {d1: {series: {temp: "31"}}}
    events:
      - {at: 0s, kind: fired, alert: Hot, device: d1}
      - {at: 0s, kind: command, alert: Hot, device: d1, action: fan, params: {state: "off"}}
""")
    (result,) = run_test_file(path)
    assert result.problems == ('0s command Hot d1 fan: params {"state": "on"}, expected '
                               '{"state": "off"}',)


def test_unknown_alert_names_are_reported(tmp_path: Path):
    path = write(tmp_path, """\
rule_files: [r.yaml]
tests:
  - name: typo
    devices: {d1: {series: {temp: "20"}}}
    alerts:
      - {at: 0s, alert: Hott, devices: []}
""")
    (result,) = run_test_file(path)
    assert result.problems == ("alert 'Hott' is not defined in r.yaml",)


def test_a_test_runs_from_text_alone():
    """The engine runs a rule test given the test file's text and the rules it names, as
    text; no file is read (gateway.rulefiles does that for `gateway rules test`)."""
    spec = parse_test_file("""\
rule_files: [r.yaml]
tests:
  - name: hot
    devices: {d1: {series: {temp: "29 31"}}}
    alerts:
      - {at: 1s, alert: Hot, devices: [d1]}
  - name: cold
    devices: {d1: {series: {temp: "20"}}}
    alerts:
      - {at: 0s, alert: Hot, devices: [d1]}
""", "mem/r.test.yaml")
    results = run_tests(spec, "mem/r.test.yaml", parse_rule_files([("mem/r.yaml", RULE)]))
    assert [(r.file, r.name, r.passed) for r in results] == [
        ("mem/r.test.yaml", "hot", True), ("mem/r.test.yaml", "cold", False)]
    with pytest.raises(ConfigError, match=r"^mem/t\.yaml:1: rule_files: Field required"):
        parse_test_file("tests: []\n", "mem/t.yaml")

def test_broken_test_file_names_file_and_line(tmp_path: Path):
    path = write(tmp_path, """\
rule_files: [r.yaml]
tests:
  - name: bad
    devices: {d1: {series: {temp: "31"}}}
    alerts:
      - {at: soon, alert: Hot, devices: []}
""")
    with pytest.raises(ConfigError, match=r"r\.test\.yaml:6: tests\.0\.alerts\.0\.at"):
        run_test_file(path)
    path.write_text(path.read_text().replace('"31"', '"3 1+"').replace("soon", "1s"))
    with pytest.raises(ConfigError, match="series item '1\\+'"):
        run_test_file(path)


def test_replay_follows_reading_time():
    from gateway.engine.replay import replay

    groups = load_rule_files([RULES / "machines.yaml"])
    values = [10, 25, 10, 10, 10, 10, 10, 10, 10]
    readings = [("press-1", 1000.0 + 10 * i, {"current": v}) for i, v in enumerate(values)]
    events = [(e.time, str(e.kind)) for e in replay(groups, readings, interval=10)]
    assert events == [(1010.0, "fired"), (1010.0, "command"), (1070.0, "resolved")]
    assert list(replay(groups, [])) == []
    with pytest.raises(ValueError, match="interval"):
        list(replay(groups, readings, interval=0))
