"""`gateway query …`: ask InfluxDB what the gateway wrote (a statement, or a canned question)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gateway.cli.options import config_option, load, positive_duration
from gateway.cli.output import UsageMistake, exit_with_problems, fail
from gateway.errors import ConfigError, FieldgateError


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
        config_option,
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
        section = getattr(load(config_path), "influx", None)
        if section is None:
            fail(f"no influx section in {config_path.name}; add one (see gateway config "
                 f"sample), or give --url", 2)
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
        exit_with_problems(err.problems, "error: ")
    except FieldgateError as err:
        fail(err, 2)


def _print_table(table: Any, fmt: str) -> None:
    from gateway.query.render import Format, render

    click.echo(render(table, Format(fmt)), nl=False)


@click.group("query", cls=_QueryGroup)
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
        raise UsageMistake(f"{statement!r} is a question, not InfluxQL: run gateway query "
                           f"{statement} -c FILE ...")
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        _print_table(adhoc(client, statement), fmt)
    except QueryError as err:
        fail(err)


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

    seconds = positive_duration(since) if since is not None else None
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        _print_table(last(client, device=device, gateway=gateway_id, since=seconds), fmt)
    except QueryError as err:
        fail(err)


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

    seconds = positive_duration(since)
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        table = alerts(client, since=seconds, device=device, gateway=gateway_id,
                       all_events=all_events, limit=limit)
    except QueryError as err:
        fail(err)
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

    seconds = positive_duration(since)
    step = max(1, round(positive_duration(every, "--every"))) if every is not None else None
    client = _query_client(config_path, url, db, username, password_file, token_file)
    try:
        data = series(client, device=device, metric=metric, since=seconds, step=step)
        if png is not None:
            from gateway.query.chart import write_png

            write_png(data, png)
            click.echo(f"wrote {png} ({len(data.values)} points)")
            return
    except QueryError as err:
        fail(err)
    if fmt == "chart":
        from gateway.query.chart import terminal_chart

        click.echo(terminal_chart(data, color=sys.stdout.isatty() if color is None else color),
                   nl=False)
    else:
        _print_table(data.table(), fmt)
