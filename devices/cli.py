"""The `devices` command: simulated sensors and actuators that talk MQTT."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
import orjson

from devices import __version__
from devices.fleet import Fleet, FleetError, load_fleet, parse_fleet
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="devices")
def main() -> None:
    """Fieldgate device emulator: simulated sensors and actuators talking MQTT.

    \b
    Example:
      devices simulate --fleet devices/fleets/greenhouse.yaml --duration 60s
    """


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
@click.option("--username", help="Broker user name.")
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Broker password (first line of the file); needs --username.")
@click.option("--password-env", help="Broker password (environment variable).")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificate(s) to check an mqtts:// broker with (default: the "
              "system's).")
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
    stopping = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sim = Simulator(model, broker=broker, key=key,
                        record=record.open("wb") if record else None,
                        say=lambda line: click.echo(line, err=True),
                        username=username, password=password,
                        ca_file=str(ca_file) if ca_file else None)
        stats = sim.run(seconds, lambda: stopping)
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
