"""`gateway rules …`: check rule files, run their tests, reload them, replay recordings, and
list the versions deployed from the cloud."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from gateway.cli.options import config_option, load
from gateway.cli.output import UsageMistake, exit_with_problems, fail, when
from gateway.errors import ConfigError, FieldgateError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.engine import Group


@click.group("rules")
def rules_group() -> None:
    """Rule files: check them, run their tests, replay recorded readings through them."""


@rules_group.command("check")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def rules_check(files: tuple[Path, ...]) -> None:
    """Validate rule files: "ok" or one line per problem (file, line, rule, what).

    A command's device must render to a device id (letters, digits and _ . - : @ ~, at
    most 128 characters): it becomes a topic level.

    \b
    Example:
      gateway rules check rules/*.yaml
    """
    from gateway.rule_service import device_check
    from gateway.rulefiles import load_rule_files

    files = tuple(f for f in files if not f.name.endswith(".test.yaml"))
    if not files:
        raise UsageMistake("no rule files given (test files are run by `gateway rules test`)")
    try:
        groups = load_rule_files(list(files), device_check=device_check())
    except ConfigError as err:
        exit_with_problems(err.problems)
    rules = sum(len(g.rules) for g in groups)
    click.echo(f"ok: {len(files)} file(s), {len(groups)} group(s), {rules} rule(s)")


@rules_group.command("test")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def rules_test(files: tuple[Path, ...]) -> None:
    """Run rule tests (input series in, expected alerts and commands out).

    A rule file `x.yaml` is tested by `x.test.yaml` beside it; test files can be named
    directly too.

    \b
    Example:
      gateway rules test rules/*.yaml
    """
    from gateway.rulefiles import companion_test, run_test_file

    tests: list[Path] = []
    for path in files:
        test = path if path.name.endswith(".test.yaml") else companion_test(path)
        if not test.exists():
            click.echo(f"{path}: no test file {test.name} beside it", err=True)
            raise SystemExit(1)
        if test not in tests:
            tests.append(test)
    failed = 0
    passed = 0
    for test in tests:
        try:
            results = run_test_file(test)
        except ConfigError as err:
            exit_with_problems(err.problems)
        for result in results:
            if result.passed:
                passed += 1
                click.echo(f"PASS {result.file}: {result.name}")
            else:
                failed += 1
                click.echo(f"FAIL {result.file}: {result.name}")
                for problem in result.problems:
                    click.echo(f"     {problem}")
    click.echo(f"{passed} passed, {failed} failed")
    if failed:
        raise SystemExit(1)


@rules_group.command("reload")
@config_option
def rules_reload(config_path: Path) -> None:
    """Make the running gateway re-read its rule files (as SIGHUP does).

    While a version deployed from the cloud runs (downlink.rules), that version's files are
    re-read, not the config's (see `gateway rules history`). The files are checked here
    first; a file with a mistake is reported and nothing is sent, and the running gateway
    keeps its rules either way if a reload fails.

    \b
    Example:
      gateway rules reload -c /etc/fieldgate/gateway.yaml
    """
    import os
    import signal

    from gateway.daemon import pid_path

    cfg = load(config_path)
    try:
        _check_running_version(cfg)
    except ConfigError as err:
        exit_with_problems(err.problems)
    if not cfg.rules and not cfg.downlink.rules:
        fail("rules: the config names no rule files; nothing to reload", 2)
    path = pid_path(cfg)
    missing = FieldgateError(f"no running gateway for this config (no usable {str(path)!r})")
    try:
        pid = int(path.read_text().strip())
        # A pid file left by a crash may name another process now: check it is ours.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        fail(missing)
    if b"gateway" not in cmdline:
        fail(missing)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        fail(missing)
    click.echo(f"reload sent to gateway pid {pid}")


def _check_running_version(cfg: GatewayConfig) -> None:
    """The files the gateway would re-read, checked; ConfigError with every problem."""
    from gateway.downlink.versions import RuleVersions, read_state
    from gateway.rule_service import device_check, load_groups
    from gateway.rulefiles import load_rule_files

    root = cfg.downlink.rules_path(cfg.log.path)
    state = read_state(root) if cfg.downlink.rules else None
    if state is None or state.current == 0:
        load_groups(cfg.rules, max_device_id=cfg.ingest.max_device_id)
        return
    paths = RuleVersions.files_of(root, state.running)
    load_rule_files(list(paths), device_check=device_check(cfg.ingest.max_device_id))


@rules_group.command("history")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the running version, "
              "the rollback stack, the history.")
def rules_history(config_path: Path, as_json: bool) -> None:
    """List the rule versions deployed from the cloud: when, by which request, which files,
    and which one runs.

    A version is deployed by a signed bundle on fieldgate/<gateway_id>/rules/set and rolled
    back by rules/rollback (`gateway cloud deploy-rules`, `gateway cloud rollback-rules`);
    "local" is the config's own rule files. Reads the files beside the log; fine while the
    gateway runs.

    \b
    Example:
      gateway rules history -c /etc/fieldgate/gateway.yaml
      gateway rules history -c gateway.yaml --json | jq .running
    """
    from gateway.downlink.versions import LOCAL, read_state

    cfg = load(config_path)
    root = cfg.downlink.rules_path(cfg.log.path)
    try:
        state = read_state(root)
    except ConfigError as err:
        exit_with_problems(err.problems)
    on = cfg.downlink.rules
    runs = state.running.name if state is not None and on else LOCAL
    if as_json:
        click.echo(orjson.dumps({
            "dir": str(root), "downlink_rules": on, "running": runs,
            "rollback_to": [] if state is None else
            [state.version(n).name for n in reversed(state.rollback)],
            "history": [] if state is None else [a.to_dict() for a in state.history],
        }, option=orjson.OPT_INDENT_2).decode())
        return
    if state is None or not state.history:
        why = "" if on else " (downlink.rules is off in this config)"
        click.echo(f"No rules deployed from the cloud{why}: the config's rule files run "
                   f"(version {LOCAL}). Deployed versions would be kept in {root}.")
        return
    click.echo(f"Rule versions deployed from the cloud (kept in {root}):")
    rows = [("time", "change", "version", "previous", "request", "files")]
    rows += [(when(line.time), line.action.value.replace("_", " "), line.version,
              line.previous, line.request,
              ", ".join(line.files) if line.files else "(the config's rule files)")
             for line in state.history]
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(5)]
    for i, row in enumerate(rows):
        mark = "   <- running" if i == len(rows) - 1 and on else ""
        click.echo("".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                   + row[5] + mark)
    stack = [state.version(n).name for n in reversed(state.rollback)]
    if on:
        back = ", then ".join(stack) if stack else "nothing (no version ran before it)"
        click.echo(f"Running: {runs}. A rollback returns to {back}.")
    else:
        click.echo(f"Running: {LOCAL} (downlink.rules is off in this config, so version "
                   f"{state.running.name!r} does not run).")


def _parse_labels(specs: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """``'gh-*=zone:north,row:3'`` -> ``[("gh-*", {"zone": "north", "row": "3"})]``."""
    out = []
    for spec in specs:
        glob, eq, pairs = spec.partition("=")
        labels: dict[str, str] = {}
        for pair in pairs.split(",") if pairs else []:
            key, colon, value = pair.partition(":")
            if not colon or not key.strip():
                labels = {}
                break
            labels[key.strip()] = value.strip()
        if not eq or not glob.strip() or not labels:
            raise click.BadParameter(f"{spec!r}: write DEVICE-GLOB=key:value[,key:value], "
                                     "e.g. 'gh-*=zone:north'", param_hint="'--labels'")
        out.append((glob.strip(), labels))
    return out


def _replay_groups(rule_files: tuple[Path, ...], cfg: GatewayConfig | None) -> list[Group]:
    """The rules to replay: --rules files, else the config's; one line per problem, exit 2."""
    from gateway.rule_service import device_check, load_groups
    from gateway.rulefiles import load_rule_files

    try:
        if rule_files:
            check = device_check() if cfg is None else device_check(cfg.ingest.max_device_id)
            return load_rule_files(list(rule_files), device_check=check)
        if cfg is not None and cfg.rules:
            return load_groups(cfg.rules, max_device_id=cfg.ingest.max_device_id)
    except ConfigError as err:
        exit_with_problems(err.problems)
    raise UsageMistake("no rules: give --rules FILE, or --config naming rule files")


@rules_group.command("replay")
@click.option("--rules", "rule_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rule file (repeatable); default: the rule files of --config.")
@click.option("-c", "--config", "config_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Gateway config: its rules, device_labels and engine settings (tick, "
              "late_tolerance, offline_after, max_devices) apply as in production.")
@click.option("--labels", "label_specs", multiple=True, metavar="GLOB=KEY:VALUE[,...]",
              help="Device labels, e.g. 'gh-*=zone:north' (repeatable; added after the "
              "config's device_labels).")
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Recorded readings: JSONL ({device, ts, metrics...}, as `devices simulate "
              "--record` writes) or CSV (device,ts,metric columns...); ts in epoch "
              "seconds or RFC 3339.")
@click.option("--interval", default=None,
              help="Evaluation interval  [default: the config's engine.tick, else 1s]")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl"]), default="table",
              show_default=True, help="table: one line per event and a summary; jsonl: "
              "one CloudEvents-like JSON object per event, the summary as JSON on stderr.")
def rules_replay(rule_files: tuple[Path, ...], config_path: Path | None,
                 label_specs: tuple[str, ...], input_path: Path, interval: str | None,
                 fmt: str) -> None:
    """Run rules over recorded readings and print the events, to tune thresholds.

    The replay clock follows the readings' timestamps (the median of neighbouring
    readings, so one skewed timestamp cannot move it); readings too late or too far
    ahead of it are set aside with the live engine's tolerances and counted in the
    summary, as are duplicates.

    \b
    Example:
      gateway rules replay --rules rules/greenhouse.yaml --labels 'gh-*=zone:north' \\
          --input record.jsonl
      gateway rules replay --config /etc/fieldgate/gateway.yaml --input record.jsonl
    """
    from fieldkit.units import parse_duration
    from gateway.engine import EngineConfig
    from gateway.engine.replay import Replay
    from gateway.recorded import read_columns

    labels = _parse_labels(label_specs)
    cfg = load(config_path) if config_path is not None else None
    groups = _replay_groups(rule_files, cfg)
    try:
        step = parse_duration(interval) if interval is not None else \
            cfg.engine.tick if cfg is not None else 1.0
    except ValueError as err:
        raise UsageMistake(str(err)) from err
    if cfg is not None:
        labels = [(glob, dict(values)) for glob, values in cfg.device_labels.items()] + labels
    try:  # a recording's mistakes (and a zero --interval) are one line, naming the line
        engine_cfg = EngineConfig() if cfg is None else EngineConfig(
            late_tolerance=cfg.engine.late_tolerance, offline_after=cfg.engine.offline_after,
            max_devices=cfg.engine.max_devices)
        run = Replay(groups, interval=step, config=engine_cfg, labels=labels)
        count = 0
        for chunk in read_columns(input_path):
            count += _print_events(run.feed(chunk), fmt)
        count += _print_events(run.finish(), fmt)
    except ValueError as err:
        fail(err, 2)
    summary = run.summary
    if fmt == "jsonl":
        click.echo(orjson.dumps({"type": "summary", **summary.to_dict()}).decode(), err=True)
        return
    data = summary.to_dict()
    aside = data["set_aside"]
    click.echo(f"{count} event(s)")
    click.echo(f"readings   {summary.readings} ({summary.values} values) from "
               f"{when(summary.first)} to {when(summary.last)}")
    click.echo(f"used       {summary.used} values")
    click.echo("set aside  " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in aside.items()))
    per_rule: dict[str, list[str]] = {}
    for item in data["events"]:
        per_rule.setdefault(item["rule"] or "(devices)", []).append(
            f"{item['kind']} {item['count']}")
    for rule, kinds in per_rule.items():
        click.echo(f"events     {rule}: {', '.join(kinds)}")


def _print_events(events: Any, fmt: str) -> int:
    count = 0
    for event in events:
        count += 1
        data = event.to_dict()
        if fmt == "jsonl":
            click.echo(orjson.dumps({"type": event.cloud_type, **data}).decode())
        else:
            what = data.get("rule") or data.get("action") or ""
            click.echo(f"{when(event.time)}  {event.cloud_type:<30} {event.device:<16} "
                       f"{what}  {data.get('message', '')}".rstrip())
    return count
