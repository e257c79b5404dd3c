"""`gateway rules check` on hostile files: one line with file:line, exit 2, never a traceback.

Each case here crashed or misled before (RecursionError, UnicodeDecodeError, a 2 GB
message at the first alert, a duplicate without its line); the fuzz test feeds random YAML
and expression text and asserts the same contract for whatever it finds.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.engine import expr as ex
from tests.test_rules_cli import gateway

RULE = """\
groups:
  - name: house
    rules:
      - alert: Hot
        expr: {expr}
        message: {message}
"""


def rule_text(expr: str = "avg(temp, 10s) > 30", message: str = '"{device} hot"') -> str:
    return RULE.format(expr=expr, message=message)


def check_in_process(path: Path) -> tuple[int, str]:
    """Exit code and stderr of `gateway rules check path`; an escaped exception fails."""
    result = CliRunner().invoke(main, ["rules", "check", str(path)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr if result.exit_code else result.stdout


def one_problem(path: Path) -> str:
    code, err = check_in_process(path)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}:")
    return lines[0]


@pytest.mark.parametrize(("expr", "problem"), [
    ("(" * 10_000 + "temp" + ")" * 10_000 + " > 1", "expression too long"),
    ("(" * 150 + "temp" + ")" * 150 + " > 1", "expression nested too deeply"),
    ("temp + " * 200 + "temp > 1", "expression nested too deeply"),
    ("temp + " * 20_000 + "temp > 1", "expression too long"),
    ("not " * 400 + "temp > 1", "expression nested too deeply"),
    ("- " * 400 + "temp > 1", "expression nested too deeply"),
    ("avg(temp, 99999999999999d) > 1", "a window can be at most 7d"),
])
def test_deep_or_long_expressions_are_one_line(tmp_path, expr, problem):
    path = tmp_path / "deep.yaml"
    path.write_text(rule_text(expr=f"'{expr}'"))
    line = one_problem(path)
    assert problem in line
    assert f"{path}:5: rule Hot" in line


def test_expression_limits_are_where_the_readme_says():
    ok = "(" * (ex.MAX_DEPTH - 2) + "temp" + ")" * (ex.MAX_DEPTH - 2) + " > 1"
    ex.parse(ok)
    with pytest.raises(ex.ExprError, match="nested too deeply"):
        ex.parse("(" * (ex.MAX_DEPTH + 1) + "temp" + ")" * (ex.MAX_DEPTH + 1) + " > 1")
    with pytest.raises(ex.ExprError, match="too long"):
        ex.parse("temp > " + "1" * ex.MAX_LENGTH)
    readme = (Path(__file__).resolve().parents[1] / "rules" / "README.md").read_text()
    assert f"{ex.MAX_LENGTH:,} characters" in readme and f"{ex.MAX_DEPTH} levels" in readme


def test_non_utf8_file_names_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(rule_text().encode().replace(b'"{device} hot"', b'"{device} \xe9t\xe9"'))
    line = one_problem(path)
    assert line.startswith(f"{path}:6: not UTF-8 text")


@pytest.mark.parametrize("message", [
    '"{value:>2000000000}"', '"{value:.999999}"', '"{device:{device}}"',
    '"{value:>' + "9" * 5000 + '}"'])
def test_format_specs_are_bounded(tmp_path, message):
    path = tmp_path / "wide.yaml"
    path.write_text(rule_text(message=message))
    line = one_problem(path)
    assert f"{path}:6: rule Hot" in line and "message" in line


def test_sensible_format_specs_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(rule_text(message='"{device:>12} {value:8.2f} {value:.1f}"'))
    assert check_in_process(path)[0] == 0


def test_every_duplicate_group_is_reported_at_its_line(tmp_path):
    body = "groups:\n" + "".join(
        f"  - name: {name}\n    rules:\n      - alert: A\n        expr: t > 1\n"
        for name in ("a", "b", "a", "a"))
    path = tmp_path / "dup.yaml"
    path.write_text(body)
    other = tmp_path / "other.yaml"
    other.write_text(body.split("  - name: b")[0])
    result = CliRunner().invoke(main, ["rules", "check", str(path), str(other)])
    code, err = result.exit_code, result.stderr
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"{path}:10: group 'a' is also defined at {path}:2; group names must be unique",
        f"{path}:14: group 'a' is also defined at {path}:2; group names must be unique",
        f"{other}:2: group 'a' is also defined at {path}:2; group names must be unique",
    ]


def test_deeply_nested_yaml_is_one_line(tmp_path):
    path = tmp_path / "nest.yaml"
    path.write_text("groups: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in one_problem(path)


def test_a_fifo_or_a_link_to_one_is_refused_not_waited_on(tmp_path):
    """Reading a FIFO blocks until a writer comes; `rules check` hung forever on one."""
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    link = tmp_path / "link.yaml"
    link.symlink_to(fifo)
    for path in (fifo, link):
        out = gateway("rules", "check", str(path))  # its timeout catches a hang
        assert (out.returncode, out.stderr.strip()) == (2, f"{path}: not a regular file")
    good = tmp_path / "good.yaml"
    good.write_text(rule_text())
    link.unlink()
    link.symlink_to(good)
    assert gateway("rules", "check", str(link)).returncode == 0


def test_hostile_file_through_the_real_command(tmp_path):
    """The same contract from the installed entry point, not only in-process."""
    path = tmp_path / "deep.yaml"
    path.write_text(rule_text(expr="'" + "(" * 10_000 + "temp" + ")" * 10_000 + " > 1'"))
    out = gateway("rules", "check", str(path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith(f"{path}:5: rule Hot")


EXPR_PIECES = st.sampled_from([
    "temp", "avg(temp, 10s)", "rate(e, 5m)", "absent(t, 1s)", "abs(", "(", ")", "not", "and",
    "or", "+", "-", "*", "/", ">", ">=", "==", "!=", "1", "1e999", "0.5", ",", "10s", "9999999d",
    "zscore(", "\\", "'", '"', "{", "}", "é", "\x00", " "])
expressions = st.one_of(
    st.lists(EXPR_PIECES, max_size=60).map(" ".join),
    st.text(max_size=200),
    st.integers(1, 3000).map(lambda n: "(" * n + "t" + ")" * n + " > 1"),
    st.integers(1, 3000).map(lambda n: "t + " * n + "t > 1"),
)
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | expressions,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


@st.composite
def rule_documents(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a plausible rule file with hostile fields
        rule = {"alert": draw(st.sampled_from(["A", "B", "bad name", ""])),
                "expr": draw(expressions)}
        if draw(st.booleans()):
            rule["clear"] = draw(expressions)
        if draw(st.booleans()):
            rule["message"] = draw(st.text(max_size=40))
        if draw(st.booleans()):
            rule[draw(st.sampled_from(["for", "severity", "labels", "actions"]))] = \
                draw(yaml_values)
        doc = {"groups": [{"name": draw(st.sampled_from(["g", "h", ""])), "rules": [rule]}
                          for _ in range(draw(st.integers(1, 3)))]}
        return yaml.safe_dump(doc, allow_unicode=True).encode()
    if kind == 1:  # random YAML structure
        return yaml.safe_dump({"groups": draw(yaml_values)}, allow_unicode=True).encode()
    if kind == 2:  # random text
        return draw(st.text(max_size=400)).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=400))  # random bytes


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rule_documents())
def test_fuzz_rules_check_never_crashes(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(document)
    tracemalloc.start()
    try:
        code, out = check_in_process(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code in (0, 2), out
    assert "Traceback" not in out
    if code == 2:
        assert all(line.startswith(f"{path}") for line in out.strip().splitlines()), out
    assert peak < 64 * 1024 * 1024
