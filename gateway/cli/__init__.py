"""The `gateway` command."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import orjson

from gateway import __version__
from gateway.config import GatewayConfig, check_config, load_config, sample_config
from gateway.errors import ConfigError, FieldgateError
from gateway.site import DEFAULT_PASSWORD_FILE
from gateway.units import format_size

DEFAULT_CONFIG = "/etc/fieldgate/gateway.yaml"
_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="FIELDGATE_CONFIG", default=DEFAULT_CONFIG, show_default=True,
    help="Config file (YAML); also $FIELDGATE_CONFIG.",
)


def _load(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        for line in err.problems:
            click.echo(f"{path}: {line}", err=True)
        raise SystemExit(2) from None


def _fail(err: Exception, code: int = 1) -> NoReturn:
    click.echo(f"error: {err}", err=True)
    raise SystemExit(code)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gateway")
def main() -> None:
    """Fieldgate: site MQTT -> durable log -> cloud MQTT.

    \b
    Example:
      gateway config sample > gateway.yaml   # edit it
      gateway check -c gateway.yaml
      gateway run -c gateway.yaml
    """


@main.command()
@_config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, log_level: str) -> None:
    """Run the gateway until SIGTERM or Ctrl-C.

    \b
    Example:
      gateway run -c /etc/fieldgate/gateway.yaml
    """
    # Until the daemon's handlers are in place (opening the log, loading rules: seconds on a
    # Pi), a SIGHUP (`systemctl reload`) would kill it; note it and reload once running.
    early_reload: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: early_reload.append(signum))
    from gateway.daemon import Gateway  # the wiring imports paho etc.; keep --help fast

    cfg = _load(config_path)
    problems = check_config(cfg)
    if problems:
        for line in problems:
            click.echo(f"{config_path}: {line}", err=True)
        raise SystemExit(2)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        gw = Gateway(cfg)
        gw.install_signal_handlers()
        if early_reload:
            gw.request_reload()
        code = gw.run()
    except ConfigError as err:  # e.g. rules: what `check` reports, alike (line and code)
        for line in err.problems:
            click.echo(f"{config_path}: {line}", err=True)
        raise SystemExit(2) from None
    except FieldgateError as err:
        _fail(err)
    raise SystemExit(code)


@main.command()
@_config_option
def check(config_path: Path) -> None:
    """Validate a config file without touching the network; prints "ok" or one line per problem.

    \b
    Example:
      gateway check -c gateway.yaml
    """
    cfg = _load(config_path)
    problems = check_config(cfg)
    if cfg.rules:
        from gateway.rule_service import load_groups

        try:
            load_groups(cfg.rules, max_device_id=cfg.ingest.max_device_id)
        except ConfigError as err:
            problems.extend(err.problems)
    for line in problems:
        click.echo(f"{config_path}: {line}", err=True)
    if problems:
        raise SystemExit(2)
    click.echo("ok")


@main.command()
@click.option("--duration", default="30s", show_default=True, help="How long sensors publish.")
@click.option("--cut-cloud", default="0s", show_default=True,
              help="Stop the cloud broker this long (after 5 s) to show store-and-forward.")
def demo(duration: str, cut_cloud: str) -> None:
    """Run the whole path on this machine: brokers, gateway, InfluxDB, simulated sensors.

    Needs Mosquitto; with InfluxDB 1.x installed (sudo apt-get install -y mosquitto
    influxdb) the gateway also writes to an influxd it starts, and the demo ends with
    what `gateway query last` and `gateway query alerts` say. On a terminal it shows the
    `gateway status` view live. Everything is temporary and removed at the end. Exits 0
    when every logged reading arrived at the cloud broker (and InfluxDB holds every
    record and the same alerts).

    \b
    Example:
      gateway demo --duration 30s --cut-cloud 10s
    """
    from gateway.demo import run_demo
    from gateway.units import parse_duration

    try:
        seconds, cut = parse_duration(duration), parse_duration(cut_cloud)
    except ValueError as err:
        _fail(err, 2)
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise SystemExit(run_demo(seconds, cut))
    except FieldgateError as err:
        _fail(err)


@main.command()
@_config_option
@click.option("--once", is_flag=True,
              help="Print one snapshot and exit (for scripts and SSH sessions).")
@click.option("--interval", default="1s", show_default=True, help="Redraw this often (live).")
def status(config_path: Path, once: bool, interval: str) -> None:
    """Watch a running gateway: devices, sparklines, actuators, links, sink depths, events.

    A row per device with its latest values and a sparkline of the last minute, the
    state of its actuators (the last command and its answer), the site/cloud/influx
    links, readings per second, how many records each sink still owes, and a feed of
    alerts, commands and link changes. Everything comes from the gateway itself: its
    /metrics endpoint (metrics.listen) and its log file, read-only. Live until Ctrl-C;
    with --once (or when the output is not a terminal) one snapshot, plain text.

    \b
    Example:
      gateway status -c /etc/fieldgate/gateway.yaml
      gateway status -c gateway.yaml --once | grep waiting
    """
    import threading

    from rich.console import Console

    from gateway.status import StatusError, print_once, run_live, watcher_for
    every = _since_seconds(interval, "--interval")
    cfg = _load(config_path)
    try:
        watcher = watcher_for(cfg, str(config_path))
    except StatusError as err:
        _fail(err)
    console = Console()
    try:
        if once or not console.is_terminal:
            print_once(watcher, console)
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the way out
            run_live(watcher, console, interval=every, stop=stop)
    finally:
        watcher.close()


@main.group("site")
def site_group() -> None:
    """Provision the site broker: a user per device, the gateway's user.

    deploy/mosquitto-site.conf and deploy/mosquitto-site.acl lock the site broker down:
    each device may publish only as itself and read only its own commands.
    """


_password_file_option = click.option(
    "--password-file", type=click.Path(dir_okay=False, path_type=Path),
    default=str(DEFAULT_PASSWORD_FILE), show_default=True,
    help="Mosquitto password file (password_file in mosquitto-site.conf).")
_replace_option = click.option("--replace", is_flag=True,
                               help="Give a user that exists a new password.")
_RELOAD = "reload Mosquitto to use it: sudo systemctl reload mosquitto"


@site_group.command("add-device")
@click.argument("device")
@_config_option
@_password_file_option
@_replace_option
def site_add_device(device: str, config_path: Path, password_file: Path,
                    replace: bool) -> None:
    """Add DEVICE to the site broker; print its password and command key.

    The device connects with user name DEVICE and the password printed; it verifies
    commands and signs its answers with the command key printed (derived from the
    gateway's commands.key_file). Both are shown once: put them on the device.

    DEVICE is an id ingest accepts: up to ingest.max_device_id ASCII letters, digits and
    _ . - @ ~ (not "." or ".." alone); ':', which ingest accepts, cannot be in a Mosquitto
    user name.

    \b
    Example:
      sudo gateway site add-device gh-7 -c /etc/fieldgate/gateway.yaml
    """
    from gateway.site import add_device

    cfg = _load(config_path)
    try:
        done = add_device(password_file, device, cfg.commands.key(),
                          max_device_id=cfg.ingest.max_device_id, replace=replace)
    except (FieldgateError, OSError) as err:
        _fail(err, 2)
    click.echo(f"{device!r} added to {str(password_file)!r}; {_RELOAD}", err=True)
    click.echo(f"username:    {done.user}")
    click.echo(f"password:    {done.password}")
    unsigned = "none (commands.key_file is not set: commands go unsigned)"
    click.echo(f"command key: {done.command_key or unsigned}")


@site_group.command("add-gateway")
@_password_file_option
@_replace_option
def site_add_gateway(password_file: Path, replace: bool) -> None:
    """Add the gateway's own user ("fieldgate") to the site broker; print its password.

    Put the password in the file that site.password_file names, and set
    site.username: fieldgate in the gateway's config.

    \b
    Example:
      sudo gateway site add-gateway | sed -n 's/^password: *//p' |
        sudo install -o fieldgate -m 400 /dev/stdin /etc/fieldgate/site.pw
    """
    from gateway.site import add_gateway

    try:
        done = add_gateway(password_file, replace=replace)
    except (FieldgateError, OSError) as err:
        _fail(err, 2)
    click.echo(f"{done.user!r} added to {str(password_file)!r}; {_RELOAD}", err=True)
    click.echo(f"username:    {done.user}")
    click.echo(f"password:    {done.password}")


@main.group()
def config() -> None:
    """Config file helpers."""


@config.command("sample")
def config_sample() -> None:
    """Print a commented sample config built from the config models.

    \b
    Example:
      gateway config sample > /etc/fieldgate/gateway.yaml
    """
    click.echo(sample_config(), nl=False)


@main.group("rules")
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
    from gateway.engine import load_rule_files
    from gateway.rule_service import device_check

    files = tuple(f for f in files if not f.name.endswith(".test.yaml"))
    if not files:
        _fail(ConfigError(["no rule files given (test files are run by `gateway rules test`)"]),
              2)
    try:
        groups = load_rule_files(list(files), device_check=device_check())
    except ConfigError as err:
        for line in err.problems:
            click.echo(line, err=True)
        raise SystemExit(2) from None
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
    from gateway.engine.ruletest import companion_test, run_test_file

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
            for line in err.problems:
                click.echo(line, err=True)
            raise SystemExit(2) from None
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
@_config_option
def rules_reload(config_path: Path) -> None:
    """Make the running gateway re-read its rule files (as SIGHUP does).

    The files are checked here first; a file with a mistake is reported and nothing is
    sent, and the running gateway keeps its rules either way if a reload fails.

    \b
    Example:
      gateway rules reload -c /etc/fieldgate/gateway.yaml
    """
    import os
    import signal

    from gateway.daemon import pid_path
    from gateway.rule_service import load_groups

    cfg = _load(config_path)
    try:
        load_groups(cfg.rules, max_device_id=cfg.ingest.max_device_id)
    except ConfigError as err:
        for line in err.problems:
            click.echo(line, err=True)
        raise SystemExit(2) from None
    if not cfg.rules:
        _fail(ConfigError(["rules: the config names no rule files; nothing to reload"]), 2)
    path = pid_path(cfg)
    missing = FieldgateError(f"no running gateway for this config (no usable {str(path)!r})")
    try:
        pid = int(path.read_text().strip())
        # A pid file left by a crash may name another process now: check it is ours.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        _fail(missing)
    if b"gateway" not in cmdline:
        _fail(missing)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        _fail(missing)
    click.echo(f"reload sent to gateway pid {pid}")


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
    from gateway.engine import EngineConfig, load_rule_files
    from gateway.engine.replay import Replay
    from gateway.recorded import read_columns
    from gateway.units import parse_duration

    labels = _parse_labels(label_specs)
    cfg = _load(config_path) if config_path is not None else None
    try:
        if rule_files:
            from gateway.rule_service import device_check

            check = device_check() if cfg is None else device_check(cfg.ingest.max_device_id)
            groups = load_rule_files(list(rule_files), device_check=check)
        elif cfg is not None and cfg.rules:
            from gateway.rule_service import load_groups

            groups = load_groups(cfg.rules, max_device_id=cfg.ingest.max_device_id)
        else:
            _fail(ConfigError(["no rules: give --rules FILE, or --config naming rule files"]),
                  2)
        step = parse_duration(interval) if interval is not None else \
            cfg.engine.tick if cfg is not None else 1.0
        engine_cfg = EngineConfig() if cfg is None else EngineConfig(
            late_tolerance=cfg.engine.late_tolerance, offline_after=cfg.engine.offline_after,
            max_devices=cfg.engine.max_devices)
        if cfg is not None:
            labels = [(glob, dict(values)) for glob, values in cfg.device_labels.items()] + \
                labels
        run = Replay(groups, interval=step, config=engine_cfg, labels=labels)
        count = 0
        for chunk in read_columns(input_path):
            count += _print_events(run.feed(chunk), fmt)
        count += _print_events(run.finish(), fmt)
    except ConfigError as err:
        for line in err.problems:
            click.echo(line, err=True)
        raise SystemExit(2) from None
    except ValueError as err:
        _fail(err, 2)
    summary = run.summary
    if fmt == "jsonl":
        click.echo(orjson.dumps({"type": "summary", **summary.to_dict()}).decode(), err=True)
        return
    data = summary.to_dict()
    aside = data["set_aside"]
    click.echo(f"{count} event(s)")
    click.echo(f"readings   {summary.readings} ({summary.values} values) from "
               f"{_when(summary.first)} to {_when(summary.last)}")
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
            click.echo(f"{_when(event.time)}  {event.cloud_type:<30} {event.device:<16} "
                       f"{what}  {data.get('message', '')}".rstrip())
    return count


@main.group("log")
def log_group() -> None:
    """Inspect the durable log: stats, dead letters, replay."""


def _open_log(cfg: GatewayConfig, *, write: bool = False) -> Any:
    from gateway.log.schema import connect

    try:
        return connect(cfg.log.path, readonly=not write) if not write else \
            connect(cfg.log.path, synchronous="NORMAL")
    except FieldgateError as err:
        _fail(err)


@log_group.command("stats")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def log_stats_cmd(config_path: Path, as_json: bool) -> None:
    """Depth, bytes and oldest record per sink, dead-letter counts, drop counters.

    \b
    Example:
      gateway log stats -c gateway.yaml
    """
    from gateway.log.stats import log_stats

    cfg = _load(config_path)
    stats = log_stats(_open_log(cfg))
    if as_json:
        click.echo(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"log        {cfg.log.path}")
    click.echo(f"records    {stats['records']} rows, {stats['readings']} readings, "
               f"{format_size(stats['bytes'])} of {format_size(cfg.log.max_bytes)}")
    click.echo(f"oldest     {_when(stats['oldest'])}")
    for sink, info in stats["sinks"].items():
        click.echo(f"sink       {sink}: {info['undelivered']} undelivered, oldest "
                   f"{_when(info['oldest_undelivered'])}, next seq {info['next_seq']}")
    dlq = stats["dead_letters"]
    click.echo(f"dead       {sum(dlq.values())} "
               + (f"({', '.join(f'{k} {v}' for k, v in sorted(dlq.items()))})" if dlq else ""))
    for name, value in stats["counters"].items():
        if not name.startswith("dead_letters."):
            click.echo(f"counter    {name} {value}")


@log_group.command("dlq")
@_config_option
@click.option("--reason", help="Only this reason (e.g. bad_json, too_large).")
@click.option("--limit", default=50, show_default=True, help="Most entries to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (payload as text).")
def log_dlq(config_path: Path, reason: str | None, limit: int, as_json: bool) -> None:
    """List dead letters: id, time, reason, topic, detail.

    \b
    Example:
      gateway log dlq -c gateway.yaml --reason bad_json
    """
    from gateway import dlq

    cfg = _load(config_path)
    rows = dlq.select(_open_log(cfg), reason=reason, limit=limit)
    for row in rows:
        if as_json:
            click.echo(orjson.dumps({
                "id": row.id, "ts": row.ts, "topic": row.topic, "reason": row.reason,
                "detail": row.detail, "size": row.size, "replayed": row.replayed,
                "payload": row.payload.decode("utf-8", "backslashreplace"),
            }).decode())
        else:
            flag = " (replayed)" if row.replayed else ""
            click.echo(f"{row.id:>6}  {_when(row.ts)}  {row.reason:<18} {row.topic}  "
                       f"{row.detail}{flag}")
    if not rows and not as_json:
        click.echo("no dead letters")


@log_group.command("replay")
@_config_option
@click.option("--id", "ids", type=int, multiple=True, help="Dead letter id (repeatable).")
@click.option("--reason", help="All dead letters with this reason.")
@click.option("--since", type=float, help="Only those received at or after this epoch time.")
@click.option("--again", is_flag=True, help="Include entries that were replayed before.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed.")
def log_replay(config_path: Path, ids: tuple[int, ...], reason: str | None,
               since: float | None, again: bool, dry_run: bool) -> None:
    """Send selected dead letters to the site broker again, after a fix.

    They go through ingest like new messages: accepted now, or back in the dead-letter
    table with their reason. Truncated payloads (over log.dlq_max_payload) or topics, and
    records a sink's destination refused (uplink_rejected:*, sink_rejected), are skipped
    with a note: they are not site messages as they arrived.

    \b
    Example:
      gateway log replay -c gateway.yaml --reason unknown_topic
    """
    from gateway import dlq

    cfg = _load(config_path)
    if not ids and not reason and since is None:
        _fail(ValueError("say what to replay: --id N, --reason R or --since T"), 2)
    conn = _open_log(cfg, write=True)
    rows = dlq.select(conn, ids=ids, reason=reason, since=since, include_replayed=again)
    whole = []
    for row in rows:
        why = dlq.not_replayable(row)
        if why is None:
            whole.append(row)
        else:
            click.echo(why, err=True)
    if dry_run:
        for row in whole:
            click.echo(f"would replay {row.id} {row.topic}")
        return
    try:
        sent = dlq.replay(cfg, conn, whole)
    except FieldgateError as err:
        _fail(err)
    click.echo(f"replayed {sent} of {len(whole)}")
    if sent < len(whole):
        raise SystemExit(1)




# --- gateway query --------------------------------------------------------------------

class _QueryGroup(click.Group):
    """`gateway query "SELECT …"` runs a statement; `gateway query last` asks a question."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            # Options before the question (`gateway query -c x.yaml last`) move behind it;
            # no question named: the argument is an InfluxQL statement.
            named = next((i for i, a in enumerate(args) if a in self.commands), None)
            if named is not None and args[0].startswith("-"):
                args = [args[named], *args[:named], *args[named + 1:]]
            else:
                args = ["sql", *args]
        return super().parse_args(ctx, args)


_INFLUX_FIELDS = ("url", "api", "database", "retention_policy", "username", "password_file",
                  "password_env", "token_file", "token_env", "org", "bucket", "ca_file",
                  "verify", "timeout", "measurement")


_F = TypeVar("_F", bound=Callable[..., Any])


def _influx_options(func: _F) -> _F:
    options = [
        _config_option,
        click.option("--url", help="InfluxDB URL, e.g. http://127.0.0.1:8086; with it the "
                     "config file is not read."),
        click.option("--db", help="Database (1.x) or bucket (2.x/3.x); default: influx."
                     "database (v1) or influx.bucket (v2), or fieldgate."),
        click.option("--username", help="InfluxDB 1.x user."),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="File holding that user's password."),
        click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="File holding an InfluxDB 2.x/3.x token."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _format_option(choices: tuple[str, ...] = ("table", "csv", "json"),
                   default: str = "table") -> Callable[[_F], _F]:
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=default,
                        show_default=True, help="Output format.")


def _query_client(config_path: Path, url: str | None, db: str | None, username: str | None,
                  password_file: Path | None, token_file: Path | None) -> Any:
    from gateway.query import InfluxQLClient, connection_from

    settings: dict[str, Any]
    if url is not None:
        settings = {"url": url, "api": "v2" if token_file else "v1"}
    else:
        section = getattr(_load(config_path), "influx", None)
        if section is None:
            _fail(ConfigError([f"no influx section in {config_path.name}; add one (see "
                               f"gateway config sample), or give --url"]), 2)
        settings = {name: getattr(section, name, None) for name in _INFLUX_FIELDS}
    for name, value in (("database", db), ("username", username),
                        ("password_file", password_file), ("token_file", token_file)):
        if value is not None:
            settings[name] = value
    if password_file is not None:
        settings["password_env"] = None
    if token_file is not None:
        settings["token_env"] = None
    try:
        return InfluxQLClient(connection_from(settings))
    except ConfigError as err:
        for line in err.problems:
            click.echo(f"error: {line}", err=True)
        raise SystemExit(2) from None
    except FieldgateError as err:
        _fail(err, 2)


def _since_seconds(value: str, name: str = "--since") -> float:
    """A positive duration from an option, or one clear line and exit 2."""
    from gateway.units import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as err:
        _fail(ValueError(f"{name}: {err}"), 2)
    if seconds <= 0:
        _fail(ValueError(f"{name}: {value!r} must be longer than 0s"), 2)
    return seconds


def _print_table(table: Any, fmt: str) -> None:
    from gateway.query.render import Format, render

    click.echo(render(table, Format(fmt)), nl=False)


@main.group("query", cls=_QueryGroup)
def query_group() -> None:
    """Ask InfluxDB what the gateway wrote there (InfluxQL; InfluxDB 1.x, 2.x, 3.x).

    Connection settings come from the config's `influx` section (-c), or from --url and
    friends (then no config file is read). Exits 1 with one line when InfluxDB is down,
    refuses the query, lacks the measurement, or nothing matched.

    \b
    Examples:
      gateway query -c gateway.yaml "SELECT mean(temp) FROM telemetry GROUP BY device"
      gateway query last -c gateway.yaml
      gateway query alerts --since 24h
      gateway query series --device gh-1 --metric temp --since 6h --png temp.png
    """


@query_group.command("sql")
@click.argument("statement")
@_influx_options
@_format_option()
def query_sql(statement: str, config_path: Path, url: str | None, db: str | None,
              username: str | None, password_file: Path | None, token_file: Path | None,
              fmt: str) -> None:
    """Run an InfluxQL statement and print its rows (the default: `sql` may be left out).

    Read-only: statements go as GET, which InfluxDB answers only for SELECT and SHOW.
    Exits 1 with one line when the server is down, the statement is wrong, a measurement
    does not exist, or nothing matched.

    \b
    Example:
      gateway query --url http://127.0.0.1:8086 --db fieldgate --format csv \\
        "SELECT temp, hum FROM telemetry WHERE device = 'gh-1' AND time > now() - 10m"
    """
    from gateway.query import QueryError
    from gateway.query.canned import adhoc

    if statement in query_group.commands:
        _fail(ValueError(f"{statement!r} is a question, not InfluxQL: run gateway query "
                         f"{statement} -c FILE ..."), 2)
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        _print_table(adhoc(client, statement), fmt)
    except QueryError as err:
        _fail(err)


@query_group.command("last")
@_influx_options
@click.option("--device", help="Only this device.")
@click.option("--gateway", "gateway_id", help="Only devices of this gateway.")
@click.option("--since", help="Only readings newer than this (e.g. 1h); default: any age.")
@_format_option()
def query_last(config_path: Path, url: str | None, db: str | None, username: str | None,
               password_file: Path | None, token_file: Path | None, device: str | None,
               gateway_id: str | None, since: str | None, fmt: str) -> None:
    """Latest value of each metric per device, with its time and age.

    \b
    Example:
      gateway query last -c gateway.yaml --gateway gh-site-1
    """
    from gateway.query import QueryError
    from gateway.query.canned import last

    seconds = _since_seconds(since) if since is not None else None
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        _print_table(last(client, device=device, gateway=gateway_id, since=seconds), fmt)
    except QueryError as err:
        _fail(err)


@query_group.command("alerts")
@_influx_options
@click.option("--since", default="24h", show_default=True, help="How far back.")
@click.option("--device", help="Only this device.")
@click.option("--gateway", "gateway_id", help="Only this gateway.")
@click.option("--all", "all_events", is_flag=True,
              help="Every event (commands, device offline/online), not only alerts.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000),
              help="The newest this many.")
@_format_option()
def query_alerts(config_path: Path, url: str | None, db: str | None, username: str | None,
                 password_file: Path | None, token_file: Path | None, since: str,
                 device: str | None, gateway_id: str | None, all_events: bool, limit: int,
                 fmt: str) -> None:
    """Alerts fired and resolved (from the `events` measurement), oldest first.

    \b
    Example:
      gateway query alerts -c gateway.yaml --since 24h --device gh-1
    """
    from gateway.query import QueryError
    from gateway.query.canned import alerts

    seconds = _since_seconds(since)
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        table = alerts(client, since=seconds, device=device, gateway=gateway_id,
                       all_events=all_events, limit=limit)
    except QueryError as err:
        _fail(err)
    _print_table(table, fmt)
    if fmt == "table":
        click.echo(f"{len(table.rows)} event(s)")


@query_group.command("series")
@_influx_options
@click.option("--device", required=True, help="Device id, e.g. gh-1.")
@click.option("--metric", required=True, help="Metric (a field of telemetry), e.g. temp.")
@click.option("--since", default="6h", show_default=True, help="How far back.")
@click.option("--every", help="Step of the mean (e.g. 1m); default: about 240 points.")
@click.option("--png", "png", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the chart to this PNG file (needs fieldgate[plot]).")
@click.option("--color/--no-color", default=None,
              help="Colour the terminal chart; default: when the output is a terminal.")
@_format_option(("chart", "table", "csv", "json"), "chart")
def query_series(config_path: Path, url: str | None, db: str | None, username: str | None,
                 password_file: Path | None, token_file: Path | None, device: str,
                 metric: str, since: str, every: str | None, png: Path | None,
                 color: bool | None, fmt: str) -> None:
    """One device's metric over time: a chart in the terminal, or its points.

    Alerts fired and resolved in the window are drawn as vertical lines.

    \b
    Example:
      gateway query series -c gateway.yaml --device gh-1 --metric temp --since 6h
      gateway query series --device gh-1 --metric temp --png gh-1-temp.png
    """
    from gateway.query import QueryError
    from gateway.query.canned import series

    seconds = _since_seconds(since)
    step = max(1, round(_since_seconds(every, "--every"))) if every is not None else None
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        data = series(client, device=device, metric=metric, since=seconds, step=step)
        if png is not None:
            from gateway.query.chart import write_png

            write_png(data, png)
            click.echo(f"wrote {png} ({len(data.values)} points)")
            return
    except QueryError as err:
        _fail(err)
    if fmt == "chart":
        from gateway.query.chart import terminal_chart

        click.echo(terminal_chart(data, color=sys.stdout.isatty() if color is None else color),
                   nl=False)
    else:
        _print_table(data.table(), fmt)
