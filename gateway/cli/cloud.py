"""`gateway cloud …`: the cloud side of a fleet. `ingest` and `dlq` (README "Fleet
ingest"); the operators' tools `keygen`, `pubkey`, `send`, `deploy-rules`, `rollback-rules`
(README "Cloud control", docs/downlink.md).

Exit codes of the request commands (send, deploy-rules, rollback-rules), for scripts:
0 the gateway did it (ok, applied, rolled_back); 1 it answered no (refused, rejected,
expired) or sent a reply that cannot be read; 2 a usage or config mistake (nothing was
sent); 3 no reply within --timeout (the request may still be acted on); 4 the request
did not go (broker unreachable, credentials or ACL refused, no gateway on the topic): safe
to send again.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.cli.options import positive_duration
from gateway.cli.output import UsageMistake, exit_with_problems, fail, print_problems, when

if TYPE_CHECKING:
    from gateway.cloud.config import CloudConfig
    from gateway.downlink.signing import Signer

EXIT_OK = 0
EXIT_ANSWERED_NO = 1
EXIT_NO_REPLY = 3
EXIT_NOT_SENT = 4

DEFAULT_CLOUD_CONFIG = "/etc/fieldgate/cloud.yaml"
cloud_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="FIELDGATE_CLOUD_CONFIG", default=DEFAULT_CLOUD_CONFIG, show_default=True,
    help="Cloud-side config (YAML, `gateway config sample --cloud`); also "
    "$FIELDGATE_CLOUD_CONFIG.",
)


def is_cloud_config(path: Path) -> bool:
    """The file is a worker's config (broker:/group:, no gateway_id:); False if unreadable
    (the gateway's loader then says why)."""
    from gateway.cloud.config import looks_like_cloud, read_yaml
    from gateway.errors import ConfigError

    try:
        return looks_like_cloud(read_yaml(path))
    except ConfigError:
        return False


def check_cloud(path: Path) -> None:
    """`gateway check` of a worker's config: "ok", or one line per problem and exit 2."""
    from gateway.cloud.config import check_cloud_config

    problems = check_cloud_config(load_cloud(path))
    print_problems(problems, f"{path}: ")
    if problems:
        raise SystemExit(2)
    click.echo("ok")


def load_cloud(path: Path) -> CloudConfig:
    from gateway.cloud.config import load_cloud_config
    from gateway.errors import ConfigError

    try:
        return load_cloud_config(path)
    except ConfigError as err:
        exit_with_problems(err.problems, f"{path}: ")


@click.group("cloud")
def cloud_group() -> None:
    """Cloud side of a fleet: gateways' uplink into InfluxDB; signed commands and rule
    bundles to gateways (keygen, send, deploy-rules, rollback-rules)."""


@cloud_group.command("ingest")
@cloud_config_option
@click.option("--client-id", default=None,
              help="MQTT client id of this worker (overrides broker.client_id); each worker "
              "of a group needs its own, the same across its restarts.")
@click.option("--metrics", "metrics_listen", default=None,
              help="host:port for /metrics (overrides metrics.listen); 'off' for none.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def ingest(config_path: Path, client_id: str | None, metrics_listen: str | None,
           log_level: str) -> None:
    """Write the gateways' uplink (telemetry, events, status) from the cloud broker to
    InfluxDB, on a shared subscription: run several to share the load. Stops on SIGTERM
    or Ctrl-C after writing and acknowledging what it holds.

    \b
    Example:
      gateway config sample --cloud > cloud.yaml   # edit it
      gateway check --cloud -c cloud.yaml
      gateway cloud ingest -c cloud.yaml --client-id ingest-1 --metrics 127.0.0.1:9118
    """
    from gateway.cloud.config import IngestMetrics, check_cloud_config
    from gateway.cloud.worker import IngestWorker
    from gateway.errors import ConfigError, FieldgateError

    cfg = load_cloud(config_path)
    if metrics_listen is not None:
        try:
            metrics = IngestMetrics(listen=None if metrics_listen == "off" else metrics_listen)
        except ValueError as err:
            fail(f"--metrics {metrics_listen!r}: {str(err).splitlines()[-1].strip()}", 2)
        cfg = cfg.model_copy(update={"metrics": metrics})
    problems = check_cloud_config(cfg)
    if problems:
        exit_with_problems(problems, f"{config_path}: ")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = IngestWorker(cfg, client_id=client_id)
        worker.install_signal_handlers()
        code = worker.run()
    except ConfigError as err:
        exit_with_problems(err.problems, f"{config_path}: ")
    except FieldgateError as err:
        fail(err)
    raise SystemExit(code)


@cloud_group.command("dlq")
@cloud_config_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="Newest dead letters to show.")
def dlq(config_path: Path, limit: int) -> None:
    """Show the worker's dead letters (messages it could not use), newest first, with a
    count by reason.

    \b
    Example:
      gateway cloud dlq -c cloud.yaml --limit 5
    """
    from gateway.cloud.state import IngestState
    from gateway.errors import FieldgateError

    cfg = load_cloud(config_path)
    if not cfg.state_path.exists():
        fail(f"no state file {str(cfg.state_path)!r} yet: no worker has run with this config")
    try:
        state = IngestState(cfg.state_path, dlq_max_rows=cfg.dlq_max_rows)
    except FieldgateError as err:
        fail(err)
    counts = state.dead_letter_counts()
    click.echo("dead letters: " + (", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
                                   or "none"))
    for row in state.dead_letters(limit):
        payload = row.payload[:80].decode("utf-8", "replace")
        click.echo(f"{row.id}  {when(row.at)}  {row.reason}  {row.topic}  {row.detail}  "
                   f"{payload!r}")
    for gateway, (hwm, lost) in state.marks().items():
        click.echo(f"gateway {gateway}: high-water seq {hwm}, lost {lost}")
    state.close()


# -- operators' tools: keys and signed requests (docs/downlink.md) ---------------------------

key_file_option = click.option(
    "--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The cloud's private signing key (overrides signing_key_file in the config).")
gateway_option = click.option(
    "--gateway", "gateway_id", required=True, metavar="GATEWAY_ID",
    help="The gateway's id (its gateway_id); requests go to fieldgate/<id>/...")
timeout_option = click.option(
    "--timeout", default="30s", show_default=True,
    help="How long to wait for the gateway's reply (connecting included); then exit 3.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the gateway's reply as it came (JSON).")


def read_signer(path: Path) -> Signer:
    """The private key at ``path``; refused (exit 2) when every user may read it."""
    from gateway.config.secrets import exposure
    from gateway.downlink.signing import Signer, SigningKeyError

    if problem := exposure(path):
        fail(f"signing key {problem}", 2)
    try:
        return Signer.from_file(path)
    except SigningKeyError as err:
        fail(err, 2)


@cloud_group.command("keygen")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the new private key (PEM, mode 0600); never overwritten.")
def keygen(out: Path) -> None:
    """Make the cloud's Ed25519 signing key and print its public key.

    The private key stays with the operators' tools (signing_key_file in cloud.yaml, or
    --key-file); each gateway gets only the public key printed on stdout, in its config's
    downlink.public_keys. See docs/trust.md.

    \b
    Example:
      gateway cloud keygen --out /etc/fieldgate/cloud-signing.key
    """
    from gateway.downlink.signing import Signer, SigningKeyError

    if out.exists() or out.is_symlink():
        raise UsageMistake(f"--out {str(out)!r} exists; a signing key is never overwritten "
                           "(remove it yourself, or choose another path)")
    try:
        signer = Signer.generate(out)
    except SigningKeyError as err:
        fail(err)
    click.echo(f"Wrote the private key to {str(out)!r} (mode 0600); keep it off the "
               "gateways. Public key for downlink.public_keys:", err=True)
    click.echo(signer.public_key)


@cloud_group.command("pubkey")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The private signing key.")
def pubkey(key_file: Path) -> None:
    """Print the public key of a signing key, as downlink.public_keys takes it.

    \b
    Example:
      gateway cloud pubkey --key-file /etc/fieldgate/cloud-signing.key
    """
    click.echo(read_signer(key_file).public_key)


def _check_gateway_id(value: str) -> None:
    from gateway.downlink.client import GATEWAY_ID_RE

    if not GATEWAY_ID_RE.fullmatch(value):
        raise UsageMistake(f"--gateway {value!r} is not a gateway id (a letter or digit, then "
                           "up to 63 of letters, digits, _ . -)")


def _send(config_path: Path, key_file: Path | None, topic: str,
          body: Callable[[str, float], dict[str, Any]], timeout: float,
          as_json: bool) -> None:
    """Sign ``body(request id, now)``, send it on ``topic``, print the reply and exit
    with its code (module docstring)."""
    from gateway.downlink.client import (
        Broker,
        NoReplyError,
        NotSentError,
        RequestClient,
        new_request_id,
    )
    from gateway.errors import ConfigError, FieldgateError, SecretError

    cfg = load_cloud(config_path)
    key_path = key_file or cfg.signing_key_file
    if key_path is None:
        raise UsageMistake(f"no signing key: give --key-file or set signing_key_file in "
                           f"{str(config_path)!r}")
    signer = read_signer(key_path)
    link = cfg.broker
    try:
        broker = Broker(host=link.host, port=link.port, username=link.username,
                        password=link.password(), keepalive=int(link.keepalive),
                        tls=link.ssl_context("broker") if link.tls else None)
    except ConfigError as err:
        exit_with_problems(err.problems, f"{config_path}: ")
    except SecretError as err:
        exit_with_problems([f"broker.password: {err}"], f"{config_path}: ")
    client = RequestClient(broker, signer)
    try:
        reply = client.request(topic, body(new_request_id(), time.time()), timeout=timeout)
    except NotSentError as err:
        fail(err, EXIT_NOT_SENT)
    except NoReplyError as err:
        fail(err, EXIT_NO_REPLY)
    except FieldgateError as err:
        fail(err, EXIT_ANSWERED_NO)
    if as_json:
        click.echo(reply.raw.decode("utf-8", "replace"))
    else:
        for line in describe_reply(reply.body):
            click.echo(line)
    raise SystemExit(EXIT_OK if reply.succeeded else EXIT_ANSWERED_NO)


_SHOWN = ("device", "command", "version", "previous")


def describe_reply(body: dict[str, Any]) -> list[str]:
    """A reply for a person: ``status: reason (facts)``, then its errors one per line."""
    line = str(body.get("status", "no status"))
    if "reason" in body:
        line += f": {body['reason']}"
    facts = [f"{key} {body[key]}" for key in _SHOWN if key in body]
    facts += [f"{key}={json.dumps(value)}" for key, value in body.items()
              if key not in (*_SHOWN, "id", "status", "reason", "errors")]
    if facts:
        line += f" ({', '.join(facts)})"
    errors = body.get("errors")
    return [line, *(map(str, errors) if isinstance(errors, list) else [])]


@cloud_group.command("send")
@cloud_config_option
@gateway_option
@click.option("--device", required=True, help="The device at that gateway.")
@click.option("--ttl", default=None,
              help="How long the command may wait for the site broker and the device, e.g. "
              "60s (at most the gateway's downlink.max_ttl); default the gateway's "
              "downlink.default_ttl.")
@timeout_option
@key_file_option
@json_option
@click.argument("command_json")
def send(config_path: Path, gateway_id: str, device: str, ttl: str | None, timeout: str,
         key_file: Path | None, as_json: bool, command_json: str) -> None:
    """Send one signed command to a device at a gateway and print its answer.

    COMMAND_JSON is {"cmd": "set", "on": true} (cmd names the action, the other keys are
    its params) or {"action": "set", "params": {"on": true}}. The gateway takes it only if
    it is signed by a key in its downlink.public_keys and downlink.allow allows the action
    for the device. The broker is the config's broker: section (the request uses its own
    client id, never broker.client_id).

    Exit: 0 ok; 1 rejected, expired or refused; 2 usage or config mistake; 3 no reply
    within --timeout; 4 not sent (broker unreachable or refused, or no gateway on the topic).

    \b
    Example:
      gateway cloud send -c cloud.yaml --gateway gh-1 --device fan-1 '{"cmd":"set","on":true}'
    """
    from gateway.downlink.client import command_body, command_topic, parse_command
    from gateway.ingest.decode import valid_device_id
    from gateway.rule_service import DEFAULT_MAX_DEVICE_ID

    _check_gateway_id(gateway_id)
    if problem := valid_device_id(device, DEFAULT_MAX_DEVICE_ID):
        raise UsageMistake(f"--device: {problem}")
    ttl_s = positive_duration(ttl, "--ttl") if ttl is not None else None
    wait = positive_duration(timeout, "--timeout")
    try:
        action, params = parse_command(command_json)
    except ValueError as err:
        raise UsageMistake(f"COMMAND_JSON: {err}") from None
    _send(config_path, key_file, command_topic(gateway_id, device),
          lambda rid, now: command_body(action, params, ttl=ttl_s, request_id=rid, now=now),
          wait, as_json)


@cloud_group.command("deploy-rules")
@cloud_config_option
@gateway_option
@click.option("--version", "version", default=None,
              help="The bundle's version (1-64 of letters, digits, . _ -); default the time, "
              "e.g. 2026-11-29T10.41.07Z.")
@timeout_option
@key_file_option
@json_option
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def deploy_rules(config_path: Path, gateway_id: str, version: str | None, timeout: str,
                 key_file: Path | None, as_json: bool, files: tuple[Path, ...]) -> None:
    """Check rule files here, then send them as one signed bundle to a gateway.

    The files are checked first with `gateway rules check`'s checker; a file with a mistake
    is reported (file:line) and nothing is sent. The bundle maps each file's name to its
    text (test files, *.test.yaml, are left out). The gateway checks it again, applies it
    and keeps the previous version for `gateway cloud rollback-rules`; it needs
    downlink.rules: true.

    Exit: 0 applied; 1 refused (its errors one per line); 2 usage mistake or a rule file
    with a mistake (nothing sent); 3 no reply within --timeout; 4 not sent.

    \b
    Example:
      gateway cloud deploy-rules -c cloud.yaml --gateway gh-1 rules/*.yaml
    """
    from gateway.downlink.client import RESERVED_VERSIONS, default_version, rules_topic
    from gateway.downlink.rules import VERSION_RE

    _check_gateway_id(gateway_id)
    wait = positive_duration(timeout, "--timeout")
    if version is not None and not VERSION_RE.fullmatch(version):
        raise UsageMistake(f"--version {version!r}: 1 to 64 of letters, digits and . _ -")
    if version in RESERVED_VERSIONS:
        raise UsageMistake(f"--version {version!r} names the gateway's own rules; choose "
                           "another")
    bundle = _checked_bundle(files)
    chosen = version or default_version(time.time())
    _send(config_path, key_file, rules_topic(gateway_id, "set"),
          lambda rid, now: {"id": rid, "ts": now, "version": chosen, "files": bundle},
          wait, as_json)


def _checked_bundle(files: tuple[Path, ...]) -> dict[str, str]:
    """name -> text of the rule files, each read once and checked as `gateway rules check`
    does; every problem (file:line) and exit 2 when any has one."""
    from gateway.downlink.rules import FILE_NAME_RE, MAX_BUNDLE_FILES
    from gateway.errors import ConfigError
    from gateway.rule_service import device_check
    from gateway.rulefiles import read_rule_files

    paths = [f for f in files if not f.name.endswith((".test.yaml", ".test.yml"))]
    if not paths:
        raise UsageMistake("no rule files given (test files are not deployed)")
    if len(paths) > MAX_BUNDLE_FILES:
        raise UsageMistake(f"{len(paths)} rule files; a bundle holds at most "
                           f"{MAX_BUNDLE_FILES}: merge some")
    for path in paths:
        if not FILE_NAME_RE.fullmatch(path.name):
            raise UsageMistake(f"{str(path)!r}: a gateway takes only plain file names ending "
                               ".yaml or .yml (a letter or digit first, then letters, digits, "
                               ". _ -); rename it")
    names = [path.name for path in paths]
    for name in names:
        if names.count(name) > 1:
            raise UsageMistake(f"two files named {name!r}: a bundle holds each name once")
    rules, texts = read_rule_files(list(paths), device_check=device_check())
    bundle = {Path(path).name: text for path, text in texts.items()}
    try:
        rules.groups()
    except ConfigError as err:
        print_problems(err.problems)
        fail("nothing was sent: fix the rule files first", 2)
    return bundle


@cloud_group.command("rollback-rules")
@cloud_config_option
@gateway_option
@timeout_option
@key_file_option
@json_option
def rollback_rules(config_path: Path, gateway_id: str, timeout: str, key_file: Path | None,
                   as_json: bool) -> None:
    """Return a gateway to its previous rules version (signed request).

    Exit: 0 rolled back; 1 refused (e.g. no previous version); 2 usage or config mistake;
    3 no reply within --timeout; 4 not sent.

    \b
    Example:
      gateway cloud rollback-rules -c cloud.yaml --gateway gh-1
    """
    from gateway.downlink.client import rules_topic

    _check_gateway_id(gateway_id)
    wait = positive_duration(timeout, "--timeout")
    _send(config_path, key_file, rules_topic(gateway_id, "rollback"),
          lambda rid, now: {"id": rid, "ts": now}, wait, as_json)
