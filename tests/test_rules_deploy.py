"""Rule bundles from the cloud, without MQTT: the gateway's own wiring (Gateway(cfg), its
RuleService and engine, its log) and a RuleDeployer over real files in a tmp dir. The
router's checks and the MQTT round trip are tested with the router (test_downlink*)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.cli.output import when
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.downlink.rules import MAX_BUNDLE_FILES, RuleDeployer
from gateway.downlink.versions import MAX_KEPT_VERSIONS, STATE_FILE, VERSIONS_DIR
from gateway.errors import ConfigError
from tests.tools import gateway as gateway_cli

# Any 32 bytes in base64: the deployer never checks signatures (the router does).
PUBLIC_KEY = "3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def rule(name: str, threshold: float, group: str = "house") -> str:
    return f"""\
groups:
  - name: {group}
    match: {{device: "gh-*"}}
    rules:
      - alert: {name}
        expr: last(temp, 60s) > {threshold}
        severity: warning
        message: "{{device}} at {{value:.1f}}"
"""


BROKEN = """\
groups:
  - name: broken
    rules:
      - alert: Oops
        expr: last(temp, 60s) >> 3
        severity: warning
"""


def config(tmp_path: Path, *, local: str | None = rule("Hot", 30), deploy: bool = True,
           **extra: Any) -> Path:
    """A gateway config file (brokers never dialled here), its local rules if any."""
    rules: list[str] = []
    if local is not None:
        (tmp_path / "local").mkdir(exist_ok=True)
        (tmp_path / "local" / "house.yaml").write_text(local)
        rules = [str(tmp_path / "local" / "*.yaml")]
    data = {"gateway_id": "gw-rd", "site": {"url": "mqtt://127.0.0.1:1"},
            "cloud": {"url": "mqtt://127.0.0.1:1"}, "log": {"path": str(tmp_path / "log.db")},
            "metrics": {"listen": None}, "rules": rules,
            "engine": {"tick": "100ms", "offline_after": None},
            "downlink": {"public_keys": [PUBLIC_KEY], "rules": deploy}, **extra}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Running:
    """A gateway built from its config as `gateway run` builds it (its loop not run): the
    test feeds its rule engine readings and steps it, as the loop would."""

    def __init__(self, path: Path) -> None:
        self.cfg = GatewayConfig.model_validate(yaml.safe_load(path.read_text()))
        self.gw = Gateway(self.cfg)
        assert self.gw.rules is not None
        self.rules = self.gw.rules
        self.deployer = RuleDeployer(self.rules) if self.cfg.downlink.rules else None
        self._clock = 0.0

    @property
    def root(self) -> Path:
        return self.cfg.downlink.rules_path(self.cfg.log.path)

    def fired(self, temp: float, device: str = "gh-1") -> set[str]:
        """Feed one reading, run one tick; the alerts that fired in it."""
        before = len(self.events())
        self.rules.on_readings([(device, time.time(), {"temp": temp})])
        self._clock += 10.0
        self.rules.step(self._clock)
        return {e["data"]["rule"] for e in self.events()[before:]
                if e["type"] == "io.fieldgate.alert.fired"}

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for (body,) in self.gw.store._conn.execute(
            "SELECT body FROM records WHERE kind = 1 ORDER BY seq")]

    def deploy(self, request: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.deployer is not None
        outcome = self.deployer.deploy(request, body, time.time())
        self.gw.store.append_events_with_state(outcome.events, [])
        return outcome.reply

    def rollback(self, request: str) -> dict[str, Any]:
        assert self.deployer is not None
        outcome = self.deployer.rollback(request, time.time())
        self.gw.store.append_events_with_state(outcome.events, [])
        return outcome.reply

    def close(self) -> None:
        self.rules.save()
        self.gw.store.close()
        self.gw._pid.release()


@pytest.fixture
def gw(tmp_path: Path):
    running = Running(config(tmp_path))
    yield running
    running.close()


def on_disk(root: Path) -> dict[str, bytes]:
    """Every file under the deployed-rules directory, with its bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_good_bundle_is_stored_applied_and_runs_instead_of_the_local_rules(gw):
    assert gw.deployer.version == "local"
    assert gw.fired(25.0) == set()                      # local: Hot above 30
    reply = gw.deploy("r-1", {"version": "2026-11-29.1",
                              "files": {"north.yaml": rule("Warm", 20)}})
    assert reply == {"id": "r-1", "status": "applied", "version": "2026-11-29.1",
                     "previous": "local"}
    assert gw.deployer.version == "2026-11-29.1"
    assert gw.fired(25.0, "gh-2") == {"Warm"}           # the new threshold fires
    assert gw.fired(35.0, "gh-3") == {"Warm"}           # and the local rule no longer runs
    applied = [e for e in gw.events() if e["type"] == "io.fieldgate.rules.applied"]
    assert [e["data"] for e in applied] == [{"request": "r-1", "version": "2026-11-29.1",
                                             "previous": "local", "files": ["north.yaml"]}]
    assert applied[0]["subject"] == "rules"
    stored = gw.root / VERSIONS_DIR / "0001-2026-11-29.1" / "north.yaml"
    assert stored.read_text() == rule("Warm", 20)
    state = orjson.loads((gw.root / STATE_FILE).read_bytes())
    assert state["current"] == 1 and state["rollback"] == [0]
    # Nothing half-written is left beside it.
    assert sorted(p.name for p in (gw.root / VERSIONS_DIR).iterdir()) == ["0001-2026-11-29.1"]
    assert sorted(p.name for p in gw.root.iterdir()) == [STATE_FILE, VERSIONS_DIR]


def test_a_bad_bundle_is_refused_with_file_and_line_and_the_old_rules_keep_running(gw):
    gw.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    before = on_disk(gw.root)
    reply = gw.deploy("r-2", {"version": "v2", "files": {"good.yaml": rule("Cold", 5, "g2"),
                                                         "bad.yaml": BROKEN}})
    assert reply["status"] == "refused" and reply["reason"] == "rule errors"
    assert reply["version"] == "v1"                     # what runs after the request
    assert len(reply["errors"]) == 1
    assert reply["errors"][0].startswith("bad.yaml:5: rule Oops: "), reply["errors"]
    refused = [e["data"] for e in gw.events() if e["type"] == "io.fieldgate.rules.refused"]
    assert refused == [{"request": "r-2", "version": "v2", "reason": "rule errors",
                        "errors": reply["errors"], "running": "v1"}]
    assert on_disk(gw.root) == before                   # nothing changed on disk
    assert gw.deployer.version == "v1"
    assert gw.fired(25.0) == {"Warm"}                   # the old rules still fire


def test_the_errors_are_the_lines_gateway_rules_check_prints(gw, tmp_path):
    bundle = {"one.yaml": rule("Dup", 1, "same"), "two.yaml": rule("Dup2", 2, "same"),
              "three.yaml": BROKEN}
    reply = gw.deploy("r-1", {"version": "v1", "files": bundle})
    (tmp_path / "bundle").mkdir()
    for name, text in bundle.items():
        (tmp_path / "bundle" / name).write_text(text)
    out = gateway_cli("rules", "check", *sorted(str(tmp_path / "bundle" / n) for n in bundle))
    assert out.returncode == 2
    printed = [line.replace(str(tmp_path / "bundle") + "/", "")
               for line in out.stderr.splitlines()]
    assert reply["errors"] == printed
    assert any("group 'same' is also defined at one.yaml:2" in e for e in reply["errors"])


def test_rollback_is_a_stack_back_to_local_then_refused(gw):
    gw.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("One", 10)}})
    gw.deploy("r-2", {"version": "v2", "files": {"a.yaml": rule("Two", 20)}})
    assert gw.fired(15.0, "gh-a") == set()              # v2 runs: 15 is below 20
    assert gw.rollback("b-1") == {"id": "b-1", "status": "rolled_back", "version": "v1",
                                  "previous": "v2"}
    assert gw.fired(15.0, "gh-b") == {"One"}
    assert gw.rollback("b-2") == {"id": "b-2", "status": "rolled_back", "version": "local",
                                  "previous": "v1"}
    assert gw.fired(25.0, "gh-c") == set() and gw.fired(35.0, "gh-d") == {"Hot"}
    reply = gw.rollback("b-3")
    assert reply["status"] == "refused" and reply["version"] == "local"
    assert reply["reason"].startswith("nothing to roll back to")
    rolled = [e["data"] for e in gw.events() if e["type"] == "io.fieldgate.rules.rolled_back"]
    assert rolled == [{"request": "b-1", "version": "v1", "previous": "v2"},
                      {"request": "b-2", "version": "local", "previous": "v1"}]


def alerts(gw: Running) -> list[str]:
    return [r.alert for g in gw.rules.engine.groups for r in g.rules]


def test_a_restart_runs_the_deployed_version_and_keeps_its_rollback(tmp_path):
    path = config(tmp_path)
    first = Running(path)
    first.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("One", 10)}})
    first.deploy("r-2", {"version": "v2", "files": {"a.yaml": rule("Two", 20)}})
    first.close()
    again = Running(path)
    try:
        # The deployed version runs, not the config's files (a restored rule's alerts are
        # held until its window refilled, as after any restart: so no firing asserted here).
        assert again.deployer.version == "v2" and alerts(again) == ["Two"]
        assert again.rollback("b-1")["version"] == "v1"
        assert again.fired(15.0) == {"One"}
    finally:
        again.close()
    third = Running(path)
    try:
        assert third.deployer.version == "v1" and alerts(third) == ["One"]
        assert third.rollback("b-2")["version"] == "local"
        assert alerts(third) == ["Hot"]
    finally:
        third.close()


def test_with_no_local_rules_the_engine_runs_and_takes_a_bundle(tmp_path):
    gw = Running(config(tmp_path, local=None))
    try:
        assert gw.fired(99.0) == set()
        assert gw.deploy("r-1", {"version": "v1", "files": {"a.yml": rule("Warm", 20)}}
                         )["status"] == "applied"
        assert gw.fired(25.0) == {"Warm"}
    finally:
        gw.close()


@pytest.mark.parametrize("name", [
    "../x.yaml", "/etc/x.yaml", "a/b.yaml", "x\x00.yaml", "..yaml", ".hidden.yaml",
    "x.txt", "", "x.test.yaml", "C:\\x.yaml", "x.yaml/", "x" * 200 + ".yaml",
])
def test_a_file_name_that_is_not_a_plain_rule_file_is_refused(gw, tmp_path, name):
    reply = gw.deploy("r-1", {"version": "v1", "files": {"ok.yaml": rule("Warm", 20),
                                                         name: rule("Evil", 1, "g2")}})
    assert reply["status"] == "refused" and reply["reason"].startswith("malformed: ")
    assert "Traceback" not in reply["reason"] and "\x00" not in reply["reason"]
    assert on_disk(gw.root) == {}
    assert not (tmp_path / "x.yaml").exists() and not Path("/etc/x.yaml").exists()
    assert gw.deployer.version == "local" and gw.fired(35.0) == {"Hot"}


@pytest.mark.parametrize(("body", "says"), [
    ({"files": {"a.yaml": "groups: []"}}, "version must be"),
    ({"version": "", "files": {"a.yaml": "groups: []"}}, "version must be"),
    ({"version": "../v", "files": {"a.yaml": "groups: []"}}, "version must be"),
    ({"version": "v" * 65, "files": {"a.yaml": "groups: []"}}, "version must be"),
    ({"version": 3, "files": {"a.yaml": "groups: []"}}, "version must be"),
    ({"version": "local", "files": {"a.yaml": "groups: []"}}, "the config's own rule files"),
    ({"version": "v1"}, "files must be"),
    ({"version": "v1", "files": {}}, "files must be"),
    ({"version": "v1", "files": ["a.yaml"]}, "files must be"),
    ({"version": "v1", "files": {"a.yaml": 7}}, "must be the file's text"),
    ({"version": "v1", "files": {"a.yaml": "\ud800"}}, "not UTF-8"),
    ({"version": "v1", "files": {"a.yaml": "#" * (1024 * 1024 + 1)}}, "larger than 1024 KiB"),
    ({"version": "v1", "files": {f"f{i}.yaml": "groups: []"
                                 for i in range(MAX_BUNDLE_FILES + 1)}}, "at most 64"),
])
def test_a_malformed_body_is_refused_and_changes_nothing(gw, body, says):
    reply = gw.deploy("r-1", body)
    assert reply["status"] == "refused" and says in reply["reason"], reply
    assert on_disk(gw.root) == {}
    assert gw.deployer.version == "local"


def test_a_huge_bundle_of_many_files_is_refused_before_anything_is_written(gw):
    files = {f"f{i:05d}.yaml": rule(f"R{i}", i, f"g{i}") for i in range(10_000)}
    reply = gw.deploy("r-1", {"version": "v1", "files": files})
    assert reply["status"] == "refused" and "at most 64" in reply["reason"]
    assert on_disk(gw.root) == {}


def test_a_rollback_whose_files_no_longer_load_is_refused_and_the_pointer_stays(gw, tmp_path):
    gw.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    state = (gw.root / STATE_FILE).read_bytes()
    (tmp_path / "local" / "house.yaml").write_text(BROKEN)   # someone edits the local file
    reply = gw.rollback("b-1")
    assert reply["status"] == "refused" and reply["reason"] == "rule errors"
    assert reply["errors"][0].startswith(str(tmp_path / "local" / "house.yaml") + ":5:")
    assert (gw.root / STATE_FILE).read_bytes() == state
    assert gw.deployer.version == "v1" and gw.fired(25.0) == {"Warm"}


def test_old_versions_are_pruned_but_never_the_running_one_nor_the_rollback_stack(gw):
    total = MAX_KEPT_VERSIONS + 5
    for i in range(1, total + 1):
        assert gw.deploy(f"r-{i}", {"version": f"v{i}", "files": {
            "a.yaml": rule(f"R{i}", i)}})["status"] == "applied"
    dirs = sorted(p.name for p in (gw.root / VERSIONS_DIR).iterdir())
    assert len(dirs) == MAX_KEPT_VERSIONS
    assert dirs[-1] == f"{total:04d}-v{total}" and dirs[0] == f"{total - 19:04d}-v{total - 19}"
    for i in range(total - 1, total - MAX_KEPT_VERSIONS, -1):   # every kept one rolls back
        assert gw.rollback(f"b-{i}")["version"] == f"v{i}"
    assert gw.rollback("b-last")["reason"].startswith("nothing to roll back to")
    assert gw.fired(total - 19 + 0.5) == {f"R{total - 19}"}


def test_a_corrupt_state_file_stops_the_start_naming_it(tmp_path):
    path = config(tmp_path)
    first = Running(path)
    first.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    first.close()
    state = first.root / STATE_FILE
    state.write_bytes(b"{not json")
    with pytest.raises(ConfigError) as err:
        Running(path)
    assert str(state) in str(err.value) and "downlink.rules: false" in str(err.value)


def test_a_missing_deployed_file_stops_the_start_rather_than_run_other_rules(tmp_path):
    path = config(tmp_path)
    first = Running(path)
    first.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    first.close()
    (first.root / VERSIONS_DIR / "0001-v1" / "a.yaml").unlink()
    with pytest.raises(ConfigError) as err:
        Running(path)
    assert "rules version 'v1'" in err.value.problems[0]
    assert "a.yaml: cannot read rule file" in err.value.problems[1]


def test_with_downlink_rules_off_the_config_rules_run_and_the_log_says_why(tmp_path, caplog):
    path = config(tmp_path)
    first = Running(path)
    first.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    first.close()
    off = Running(config(tmp_path, deploy=False))
    try:
        assert off.rules.version == "local" and off.fired(35.0) == {"Hot"}
        assert "Rules version 'v1' deployed from the cloud is not run" in caplog.text
    finally:
        off.close()


def test_a_leftover_of_a_crashed_write_is_removed_at_start(tmp_path):
    path = config(tmp_path)
    first = Running(path)
    first.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    first.close()
    versions = first.root / VERSIONS_DIR
    (versions / ".tmp-0002-v2").mkdir()
    (versions / ".tmp-0002-v2" / "a.yaml").write_text("half")
    (versions / "0002-v2").mkdir()                      # renamed, state never committed
    again = Running(path)
    try:
        assert sorted(p.name for p in versions.iterdir()) == ["0001-v1"]
        assert again.deploy("r-2", {"version": "v2", "files": {"b.yaml": rule("Two", 2)}}
                            )["status"] == "applied"
        assert sorted(os.listdir(versions / "0002-v2")) == ["b.yaml"]
    finally:
        again.close()


def test_history_lists_versions_time_origin_files_and_what_runs(tmp_path):
    path = config(tmp_path)
    out = gateway_cli("rules", "history", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("No rules deployed from the cloud: the config's rule files "
                                 "run (version local).")
    gw = Running(path)
    try:
        gw.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("One", 10),
                                                     "b.yaml": rule("B", 1, "g2")}})
        gw.deploy("r-2", {"version": "v2", "files": {"a.yaml": rule("Two", 20)}})
        gw.rollback("b-1")
        out = gateway_cli("rules", "history", "-c", str(path))    # while it "runs"
    finally:
        gw.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert str(gw.root) in lines[0]
    rows = [line.split() for line in lines[2:5]]
    assert [r[3:8] for r in rows] == [["deployed", "v1", "local", "r-1", "a.yaml,"],
                                      ["deployed", "v2", "v1", "r-2", "a.yaml"],
                                      ["rolled", "back", "v1", "v2", "b-1"]]
    assert lines[2].split("   ")[-1].strip().endswith("a.yaml, b.yaml")
    assert lines[4].endswith("a.yaml, b.yaml   <- running")
    assert "<- running" not in "\n".join(lines[2:4])
    assert lines[5] == "Running: v1. A rollback returns to local."
    js = orjson.loads(gateway_cli("rules", "history", "-c", str(path), "--json").stdout)
    assert js["running"] == "v1" and js["rollback_to"] == ["local"]
    assert [(h["action"], h["version"], h["request"]) for h in js["history"]] == [
        ("deployed", "v1", "r-1"), ("deployed", "v2", "r-2"), ("rolled_back", "v1", "b-1")]
    assert [" ".join(r[:3]) for r in rows] == [when(h["time"]) for h in js["history"]]


def test_history_says_when_the_downlink_is_off(tmp_path):
    out = gateway_cli("rules", "history", "-c", str(config(tmp_path, deploy=False)))
    assert out.returncode == 0
    assert "(downlink.rules is off in this config)" in out.stdout


def test_gateway_status_shows_the_running_rules_version(tmp_path):
    from rich.console import Console

    from gateway.status.view import render
    from gateway.status.watch import StatusWatcher

    gw = Running(config(tmp_path))
    gw.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    gw.close()

    def shown() -> str:
        watcher = StatusWatcher("http://127.0.0.1:1/metrics", gw.cfg.log.path,
                                rules_dir=gw.root)
        try:
            watcher.poll()
            console = Console(record=True, width=160)
            console.print(render(watcher.snapshot(), width=160, height=None))
            return console.export_text()
        finally:
            watcher.close()

    line = next(x for x in shown().splitlines() if "rules" in x)
    assert "version v1 (deployed" in line and "by request r-1" in line
    again = Running(config(tmp_path))
    again.rollback("b-1")
    again.close()
    line = next(x for x in shown().splitlines() if "rules" in x)
    assert "version local (rolled back to" in line and "by request b-1" in line


def test_rules_reload_checks_the_version_that_runs(tmp_path):
    path = config(tmp_path)
    gw = Running(path)
    gw.deploy("r-1", {"version": "v1", "files": {"a.yaml": rule("Warm", 20)}})
    gw.close()
    (tmp_path / "local" / "house.yaml").write_text(BROKEN)   # not what runs: not checked
    out = gateway_cli("rules", "reload", "-c", str(path))
    assert out.returncode == 1 and "no running gateway" in out.stderr, out.stderr
    (gw.root / VERSIONS_DIR / "0001-v1" / "a.yaml").write_text(BROKEN)
    out = gateway_cli("rules", "reload", "-c", str(path))
    assert out.returncode == 2 and "0001-v1/a.yaml:5: rule Oops" in out.stderr, out.stderr
