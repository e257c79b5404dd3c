"""`gateway rules check|test|replay` as an operator runs them."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.tools import gateway

ROOT = Path(__file__).resolve().parents[1]
RULE = """\
groups:
  - name: house
    rules:
      - alert: Hot
        expr: avg(temp, 10s) > 30
        severity: warning
        message: "{device} mean {value:.1f}"
"""


def test_check_names_file_line_and_rule(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(RULE)
    out = gateway("rules", "check", str(good))
    assert (out.returncode, out.stdout.strip()) == (0, "ok: 1 file(s), 1 group(s), 1 rule(s)")
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULE.replace("avg(temp, 10s) > 30", "avg(temp, 10s) >> 30"))
    out = gateway("rules", "check", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "Hot" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_example_rule_file_passes_its_tests():
    files = sorted(str(p) for p in (ROOT / "rules").glob("*.yaml")
                   if not p.name.endswith(".test.yaml"))
    assert len(files) >= 2
    out = gateway("rules", "test", *files)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith(" 0 failed")


def test_replay_prints_the_events_of_recorded_readings(tmp_path):
    rule = tmp_path / "hot.yaml"
    rule.write_text(RULE)
    rec = tmp_path / "rec.jsonl"
    t0 = 1_800_000_000
    rec.write_text("".join(
        orjson.dumps({"device": "gh-1", "ts": t0 + i, "temp": 20 + i}).decode() + "\n"
        for i in range(40)))
    out = gateway("rules", "replay", "--rules", str(rule), "--input", str(rec),
                  "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    events = [orjson.loads(line) for line in out.stdout.splitlines()]
    fired = [e for e in events if e["type"] == "io.fieldgate.alert.fired"]
    assert len(fired) == 1
    assert fired[0]["device"] == "gh-1" and fired[0]["rule"] == "Hot"
    # avg over 10 s of 20, 21, ... passes 30 once the window holds readings above ~25..35
    assert t0 + 14 <= fired[0]["time"] <= t0 + 17
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"device": "d", "ts": "soon", "temp": 1}\n')
    out = gateway("rules", "replay", "--rules", str(rule), "--input", str(bad))
    assert out.returncode == 2
    assert "bad.jsonl:1: ts 'soon' is not epoch seconds" in out.stderr


def test_gateway_check_covers_the_rule_files(tmp_path):
    import yaml

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text(RULE.replace("avg(temp, 10s)", "avg(temp)"))
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                                   "rules": [str(rules / "*.yaml"), str(tmp_path / "none*.yaml")]}))
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "matches no file" in out.stderr
    assert "bad.yaml" in out.stderr        # and the file that was found is checked too
