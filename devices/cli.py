"""The `devices` command: simulated sensors and actuators that talk MQTT."""

from __future__ import annotations

import gzip
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import orjson

from devices import __version__
from devices.fleet import Fleet, FleetError, load_fleet, parse_fleet
from devices.gateway_model import BATCH_MAX_READINGS, GatewayFleet
from devices.gateways import FleetStats, GatewaySimulator
from devices.generator import FleetModel
from devices.simulator import Simulator
from fieldkit.units import parse_duration
from fieldmqtt import MqttError


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _builtin_fleet(count: int, rate: float, fmt: str, qos: int) -> Fleet:
    """--devices/--rate without a fleet file: temperature and humidity sensors."""
    return parse_fleet({"types": {"dev": {
        "count": count, "interval": count / rate, "qos": qos,
        "format": "number" if fmt == "number" else "json",
        "id": "dev-{n}",
        "metrics": {
            "temp": {"baseline": 21.0, "noise": 0.1, "walk": 0.05, "daily_amplitude": 3},
            "hum": {"baseline": 45.0, "noise": 0.3, "walk": 0.1, "min": 0, "max": 100},
        },
    }}})


def _read_secret(path: Path | None, env: str | None, option: str) -> bytes | None:
    """A secret from ``--<option>-file`` (its first line, stripped, as the gateway reads
    commands.key_file) or ``--<option>-env``; never from the command line, which others
    on the machine can read."""
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            _fail(f"cannot read --{option}-file {str(path)!r}: {err.strerror}", 2)
        if not lines or not lines[0].strip():
            _fail(f"--{option}-file {str(path)!r} is empty", 2)
        return lines[0].strip().encode()
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            _fail(f"environment variable {env!r} (--{option}-env) is not set", 2)
        return value.encode() if value is not None else None
    return None


_F = TypeVar("_F", bound=Callable[..., Any])


def _broker_login_options(func: _F) -> _F:
    """--username, --password-file, --password-env, --ca-file: how both run commands log in
    to the broker."""
    for option in reversed([
        click.option("--username", help="Broker user name."),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Broker password (first line of the file); needs --username."),
        click.option("--password-env", help="Broker password (environment variable)."),
        click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="CA certificate(s) to check an mqtts:// broker with (default: "
                     "the system's)."),
    ]):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="devices")
def main() -> None:
    """Fieldgate device emulator: simulated sensors and actuators talking MQTT.

    \b
    Example:
      devices simulate --fleet devices/fleets/greenhouse.yaml --duration 60s
    """



def _stop_on_signals() -> threading.Event:
    """Set by SIGINT or SIGTERM: the run ends cleanly (last PUBACKs, a clean disconnect)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    return stop

@main.command()
@click.option("--fleet", "fleet_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Fleet file (YAML); without it, --devices sensors at --rate.")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="Site broker URL.")
@click.option("--seed", type=int, help="Random seed (default: the fleet's); same seed, "
              "same series.")
@click.option("--duration", default="0s", show_default=True,
              help="How long to run (wall time); 0s runs until Ctrl-C.")
@click.option("--rate-scale", default=1.0, show_default=True,
              help="Publish X times as often (simulated time runs X times faster).")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every published reading as JSONL (for `gateway rules replay`).")
@click.option("--fault-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the faults injected as JSONL.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Site master key (the gateway's commands.key_file): each device "
              "verifies commands and signs answers with its key derived from it.")
@click.option("--key-env", help="Site master key (environment variable).")
@_broker_login_options
@click.option("--start", type=float, help="Epoch of the first reading (default: now).")
@click.option("--dry-run", is_flag=True,
              help="Print the messages as JSONL instead of publishing (no broker).")
@click.option("--devices", "count", default=10, show_default=True,
              help="Without --fleet: number of devices.")
@click.option("--rate", default=10.0, show_default=True,
              help="Without --fleet: messages per second, all devices together.")
@click.option("--format", "fmt", type=click.Choice(["json", "number"]), default="json",
              show_default=True, help="Without --fleet: payload format.")
@click.option("--qos", type=click.IntRange(0, 1), default=1, show_default=True,
              help="Without --fleet: QoS.")
def simulate(fleet_path: Path | None, broker: str, seed: int | None, duration: str,
             rate_scale: float, record: Path | None, fault_log: Path | None,
             key_file: Path | None, key_env: str | None, username: str | None,
             password_file: Path | None, password_env: str | None, ca_file: Path | None,
             start: float | None, dry_run: bool, count: int, rate: float, fmt: str,
             qos: int) -> None:
    """Publish readings from a simulated fleet; actuators obey verified commands.

    \b
    Examples:
      devices simulate --fleet devices/fleets/greenhouse.yaml --key-file key.txt
      devices simulate --devices 500 --rate 5000 --duration 60s
      devices simulate --broker mqtts://site.local:8883 --ca-file ca.pem \\
          --username emulator --password-file emulator.pw
      devices simulate --fleet devices/fleets/cold-chain.yaml --dry-run --duration 1h
    """
    if rate <= 0 or count <= 0 or rate_scale <= 0:
        _fail("--rate, --devices and --rate-scale must be positive", 2)
    try:
        fleet = load_fleet(fleet_path) if fleet_path else _builtin_fleet(count, rate, fmt, qos)
    except FleetError as err:
        for line in err.problems:
            click.echo(f"{fleet_path}: {line}", err=True)
        raise SystemExit(2) from None
    seconds = _duration(duration)
    key = _read_secret(key_file, key_env, "key")
    password = _read_secret(password_file, password_env, "password")
    model = FleetModel(fleet, seed=seed, start=time.time() if start is None else start,
                       scale=rate_scale)
    if dry_run:
        if not seconds:
            _fail("--dry-run needs --duration", 2)
        for out in model.due(seconds * rate_scale):
            click.echo(orjson.dumps({"t": round(out.t, 6), "topic": out.topic, "qos": out.qos,
                                     "payload": out.payload.decode("utf-8", "backslashreplace"),
                                     "fault": out.fault}).decode())
        _write_faults(fault_log, model.fault_log)
        return
    stopping = _stop_on_signals()
    try:
        sim = Simulator(model, broker=broker, key=key,
                        record=record.open("wb") if record else None,
                        say=lambda line: click.echo(line, err=True),
                        username=username, password=password,
                        ca_file=str(ca_file) if ca_file else None)
        stats = sim.run(seconds, stopping.is_set)
    except ValueError as err:
        _fail(str(err), 2)
        return
    except (MqttError, OSError) as err:
        _fail(f"cannot reach broker {broker!r}: {err}")
        return
    _write_faults(fault_log, model.fault_log)
    rate_done = stats.published / max(stats.elapsed, 1e-9)
    click.echo(f"sent {stats.published} messages in {stats.elapsed:.1f} s ({rate_done:.0f}/s), "
               f"{len(model.fault_log)} faults, commands {stats.commands_ok} applied / "
               f"{stats.commands_refused} refused"
               + (f", reconnected {stats.reconnects} times" if stats.reconnects else ""))
    if stats.late:
        click.echo(f"warning: {stats.late} messages went out more than 1 s late (worst "
                   f"{stats.worst_lag:.1f} s): this machine cannot keep the fleet's rate",
                   err=True)
    if stats.dropped:
        click.echo(f"warning: {stats.dropped} QoS 0 messages were dropped while the broker "
                   "was away", err=True)
    if stats.refused_by_broker:
        click.echo(f"warning: the broker refused {stats.refused_by_broker} messages",
                   err=True)
    if stats.unacked:
        _fail(f"{stats.unacked} QoS 1 messages were never acknowledged: broker {broker!r} "
              "did not come back before the end of the run")


@main.command("simulate-gateways")
@click.option("--count", default=200, show_default=True, help="Gateways to simulate.")
@click.option("--rate", default=100.0, show_default=True,
              help="Readings/s per gateway.")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="Cloud broker URL (where gateways uplink).")
@click.option("--duration", default="0s", show_default=True,
              help="How long to run (wall time); 0s runs until Ctrl-C.")
@click.option("--seed", default=1, show_default=True,
              help="Random seed: same seed and --start, same messages.")
@click.option("--start", type=float, help="Epoch of the first reading (default: now).")
@click.option("--prefix", default="gw-", show_default=True,
              help="Gateway ids are PREFIX001, PREFIX002, ...")
@click.option("--batch-interval", default="100ms", show_default=True,
              help="How often a gateway sends a batch: its group commit (100 ms) with the "
              "uplink's adaptive batching on a near broker; longer models a far broker or "
              "`batching: delay`.")
@click.option("--batch", "batch_max", default=BATCH_MAX_READINGS, show_default=True,
              help="Most readings in one telemetry message (uplink.batch_max_readings).")
@click.option("--gzip", "use_gzip", is_flag=True,
              help="Compress batches (uplink.gzip; flagged content-encoding: gzip).")
@click.option("--events-every", default=0, show_default=True,
              help="Each gateway sends an alert event after every N readings (0: none).")
@click.option("--gap-every", default=0, show_default=True,
              help="Withhold every Nth telemetry batch of each gateway (as if the cloud "
              "broker lost it): a seq gap the cloud sees; --resend can fill it (0: none).")
@click.option("--resend", is_flag=True,
              help="Answer gap-repair requests on fieldgate/{id}/resend from the messages "
              "kept (--history).")
@click.option("--history", default=10_000, show_default=True,
              help="With --resend: seqs per gateway kept for resend requests (older ones "
              "are answered as missing).")
@click.option("--connections", default=1, show_default=True,
              help="MQTT sessions the gateways share (gateway i on session i mod N); "
              "--connections equal to --count gives each gateway its own, with its last "
              "will.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the run's figures as JSON: totals and, per gateway, seqs "
              "published, batches, readings, events, late and withheld ranges.")
@_broker_login_options
@click.option("--dry-run", is_flag=True,
              help="Print the messages as JSONL instead of publishing (no broker).")
def simulate_gateways(count: int, rate: float, broker: str, duration: str, seed: int,
                      start: float | None, prefix: str, batch_interval: str, batch_max: int,
                      use_gzip: bool, events_every: int, gap_every: int, resend: bool,
                      history: int, connections: int, report_path: Path | None,
                      username: str | None, password_file: Path | None,
                      password_env: str | None, ca_file: Path | None, dry_run: bool) -> None:
    """Publish many gateways' uplinks to a cloud broker: load for `gateway cloud ingest`.

    Each simulated gateway sends what a real one does on fieldgate/{id}/: telemetry batches
    (its own seq from 1, one batch per group commit), alert events, its retained status;
    QoS 1. At the end: batches, readings, each gateway's seq range, late batches.

    \b
    Examples:
      devices simulate-gateways --count 200 --rate 100 --broker mqtt://cloud:1883 \\
          --duration 60s
      devices simulate-gateways --count 20 --rate 50 --gap-every 100 --resend
      devices simulate-gateways --count 2 --rate 10 --dry-run --duration 1s --start 0
    """
    seconds = _duration(duration)
    try:
        fleet = GatewayFleet(count=count, rate=rate, seed=seed,
                             start=time.time() if start is None else start, prefix=prefix,
                             use_gzip=use_gzip, events_every=events_every,
                             gap_every=gap_every, history=history if resend else 0,
                             interval=_duration(batch_interval), batch_max=batch_max)
    except ValueError as err:
        _fail(str(err), 2)
    if dry_run:
        if not seconds:
            _fail("--dry-run needs --duration", 2)
        for out in fleet.due(seconds):
            body = out.payload
            if ("content-encoding", "gzip") in out.props:
                body = gzip.decompress(body)
            click.echo(orjson.dumps({
                "t": round(out.t, 6), "topic": out.topic, "content_type": out.content_type,
                "properties": out.props, "withheld": out.withheld,
                "payload": orjson.loads(body)}).decode())
        return
    password = _read_secret(password_file, password_env, "password")
    stopping = _stop_on_signals()
    try:
        sim = GatewaySimulator(fleet, broker=broker, connections=connections, resend=resend,
                               say=lambda line: click.echo(line, err=True),
                               username=username, password=password,
                               ca_file=str(ca_file) if ca_file else None)
        stats = sim.run(seconds, stopping.is_set)
    except ValueError as err:
        _fail(str(err), 2)
    except (MqttError, OSError) as err:
        _fail(f"cannot reach broker {broker!r}: {err}")
    _gateways_summary(fleet, stats, report_path)
    if stats.unacked:
        _fail(f"{stats.unacked} QoS 1 messages were never acknowledged: broker {broker!r} "
              "did not come back before the end of the run")


def _gateways_summary(fleet: GatewayFleet, stats: FleetStats, report: Path | None) -> None:
    elapsed = max(stats.elapsed, 1e-9)
    click.echo(f"sent {stats.batches} batches ({stats.readings} readings, "
               f"{stats.readings / elapsed:.0f}/s) and {stats.events} events from "
               f"{fleet.count} gateways in {stats.elapsed:.1f} s "
               f"({(stats.batches + stats.events) / elapsed:.0f} messages/s)"
               + (f", reconnected {stats.reconnects} times" if stats.reconnects else ""))
    rows = []
    for gw, st in zip(fleet.gateways, stats.gateways, strict=True):
        rows.append({"gateway": gw.id, "seq_first": st.first, "seq_last": st.last,
                     "batches": st.batches, "readings": st.readings, "events": st.events,
                     "late": st.late, "withheld": [list(r) for r in gw.withheld
                                                   if r[1] <= st.last],
                     "resend_requests": st.resend_requests, "resent": st.resent})
    shown = rows if len(rows) <= 10 else [*rows[:5], None, *rows[-5:]]
    for row in shown:
        if row is None:
            click.echo(f"  ... {len(rows) - 10} more")
            continue
        gaps = len(row["withheld"])  # type: ignore[arg-type]
        click.echo(f"  {row['gateway']}: seq {row['seq_first']}-{row['seq_last']}, "
                   f"{row['batches']} batches, {row['readings']} readings, "
                   f"{row['events']} events"
                   + (f", {gaps} batches withheld" if gaps else "")
                   + (f", {row['resend_requests']} resend requests" if row["resend_requests"]
                      else ""))
    if stats.late:
        click.echo(f"warning: {stats.late} messages went out more than 1 s late (worst "
                   f"{stats.worst_lag:.1f} s): this machine cannot keep the fleet's rate",
                   err=True)
    if stats.refused_by_broker:
        click.echo(f"warning: the broker refused {stats.refused_by_broker} messages",
                   err=True)
    if report is not None:
        report.write_bytes(orjson.dumps({
            "batches": stats.batches, "readings": stats.readings, "events": stats.events,
            "late": stats.late, "worst_lag": round(stats.worst_lag, 3),
            "refused_by_broker": stats.refused_by_broker, "unacked": stats.unacked,
            "reconnects": stats.reconnects, "elapsed": round(stats.elapsed, 3),
            "gateways": rows}, option=orjson.OPT_INDENT_2))


@main.command()
@click.argument("fleet_path", type=click.Path(dir_okay=False, path_type=Path))
def check(fleet_path: Path) -> None:
    """Validate a fleet file: "ok", or one line per problem.

    \b
    Example:
      devices check devices/fleets/greenhouse.yaml
    """
    try:
        fleet = load_fleet(fleet_path)
    except FleetError as err:
        for line in err.problems:
            click.echo(f"{fleet_path}: {line}", err=True)
        raise SystemExit(2) from None
    total = sum(t.count for t in fleet.types.values())
    per_s = sum(t.count / t.interval for t in fleet.types.values())
    click.echo(f"ok: {total} devices, ~{per_s:.1f} readings/s")


def _write_faults(path: Path | None, entries: list[dict[str, Any]]) -> None:
    if path is None:
        return
    with path.open("wb") as fh:
        for entry in entries:
            fh.write(orjson.dumps(entry) + b"\n")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
