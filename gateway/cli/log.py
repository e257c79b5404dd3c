"""`gateway log …`: inspect the durable log (stats, dead letters) and replay dead letters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from fieldkit.units import format_size
from gateway.cli.options import config_option, load
from gateway.cli.output import UsageMistake, fail, when
from gateway.config import GatewayConfig
from gateway.errors import FieldgateError


@click.group("log")
def log_group() -> None:
    """Inspect the durable log: stats, dead letters, replay."""


def _open_log(cfg: GatewayConfig, *, write: bool = False) -> Any:
    from gateway.log.schema import connect

    try:
        return connect(cfg.log.path, readonly=not write) if not write else \
            connect(cfg.log.path, synchronous="NORMAL")
    except FieldgateError as err:
        fail(err)


@log_group.command("stats")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def log_stats_cmd(config_path: Path, as_json: bool) -> None:
    """Depth, bytes and oldest record per sink, dead-letter counts, drop counters.

    \b
    Example:
      gateway log stats -c gateway.yaml
    """
    from gateway.log.stats import log_stats

    cfg = load(config_path)
    stats = log_stats(_open_log(cfg))
    if as_json:
        click.echo(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"log        {cfg.log.path}")
    click.echo(f"records    {stats['records']} rows, {stats['readings']} readings, "
               f"{format_size(stats['bytes'])} of {format_size(cfg.log.max_bytes)}")
    click.echo(f"oldest     {when(stats['oldest'])}")
    for sink, info in stats["sinks"].items():
        click.echo(f"sink       {sink}: {info['undelivered']} undelivered, oldest "
                   f"{when(info['oldest_undelivered'])}, next seq {info['next_seq']}")
    dlq = stats["dead_letters"]
    click.echo(f"dead       {sum(dlq.values())} "
               + (f"({', '.join(f'{k} {v}' for k, v in sorted(dlq.items()))})" if dlq else ""))
    for name, value in stats["counters"].items():
        if not name.startswith("dead_letters."):
            click.echo(f"counter    {name} {value}")


@log_group.command("dlq")
@config_option
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

    cfg = load(config_path)
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
            click.echo(f"{row.id:>6}  {when(row.ts)}  {row.reason:<18} {row.topic}  "
                       f"{row.detail}{flag}")
    if not rows and not as_json:
        click.echo("no dead letters")


@log_group.command("replay")
@config_option
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

    cfg = load(config_path)
    if not ids and not reason and since is None:
        raise UsageMistake("say what to replay: --id N, --reason R or --since T")
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
        fail(err)
    click.echo(f"replayed {sent} of {len(whole)}")
    if sent < len(whole):
        raise SystemExit(1)
