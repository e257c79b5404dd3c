"""The cloud side's config (``cloud.yaml``): the ingest worker's, also read by the operators'
tools (``gateway cloud send``): its own small model, built from the gateway's
sections (``Link`` for the broker, ``Influx`` for the target, ``Metrics``), checked by
``gateway check --cloud`` and sampled by ``gateway config sample --cloud``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fieldkit.units import Duration
from gateway.config import Influx, Link, Metrics
from gateway.config.checks import link_problems
from gateway.config.loading import UniqueKeyLoader, validation_problems
from gateway.config.models import Section
from gateway.config.sample import render_model
from gateway.config.secrets import exposure
from gateway.errors import ConfigError, SecretError

# What MQTT allows in a share name: no wildcard, no level separator.
_BAD_GROUP = set("+#/")


class IngestMetrics(Metrics):
    """Prometheus /metrics endpoint of the worker."""

    listen: str | None = Field(
        "127.0.0.1:9118", description="host:port for /metrics; several workers on one host "
        "need one each (`--metrics` on the command line); null turns it off")


class CloudConfig(Section):
    """`gateway cloud ingest`: the cloud broker's uplink into InfluxDB."""

    broker: Link = Field(default_factory=Link, description="The cloud broker the gateways "
                         "uplink to (client_id: default fieldgate-ingest-<host name>; each "
                         "worker needs its own, kept across restarts)")
    group: str = Field("fieldgate-ingest", min_length=1, max_length=100,
                       description="Shared-subscription group: the workers of one group "
                       "split the uplink between them ($share/<group>/...)")
    session_expiry: Duration = Field(
        86400.0, ge=0, le=4294967295,
        description="How long the broker keeps a stopped worker's session and what is "
        "queued for it (Mosquitto queues a share of new messages to a stopped member too)")
    receive_maximum: int = Field(
        1000, ge=10, le=65535,
        description="Unacknowledged messages the broker may send at once; messages are "
        "acknowledged after InfluxDB accepted them, so this bounds the worker's memory "
        "while InfluxDB is down")
    influx: Influx = Field(default_factory=Influx, description="Where readings, events and "
                           "gateway status are written (batch_max_points, backoff_* apply)")
    state_path: Path = Field(
        Path("/var/lib/fieldgate/ingest.db"),
        description="SQLite file with each gateway's seq high-water mark, open gaps and "
        "dead letters; the workers of a group on one host share it")
    gateways: list[str] | None = Field(
        None, description="Allowlist of gateway ids (globs); others are dead-lettered. "
        "null: any gateway")
    gap_wait: Duration = Field(
        5.0, gt=0, description="How long a hole in a gateway's seqs may stay open (for "
        "redeliveries and other workers' writes) before its range is asked for again")
    resend_timeout: Duration = Field(
        30.0, gt=0, description="How long to wait for a resend's data or reply before "
        "asking again")
    resend_attempts: int = Field(
        3, ge=1, le=100, description="Resend requests per gap; past them the gap is "
        "reported lost")
    dlq_max_rows: int = Field(100_000, ge=1, description="Dead letters kept (oldest go)")
    metrics: IngestMetrics = Field(default_factory=IngestMetrics,
                                   description="Metrics endpoint")
    signing_key_file: Path | None = Field(
        None, description="Operators' tools only (`gateway cloud send`, `deploy-rules`): the "
        "cloud's Ed25519 private key (`gateway cloud keygen`), mode 0600; gateways hold its "
        "public key. --key-file overrides it; an ingest worker needs none")

    @field_validator("group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        if _BAD_GROUP & set(value):
            raise ValueError(f"{value!r} may not contain '+', '#' or '/'")
        return value

    @model_validator(mode="after")
    def _no_site(self) -> CloudConfig:
        if self.influx.site is not None:
            raise ValueError("influx.site is not used here: each gateway's points are "
                             "tagged with its own id as the site; remove it")
        return self

    def client_id(self) -> str:
        return self.broker.client_id or f"fieldgate-ingest-{socket.gethostname()}"


def looks_like_cloud(data: object) -> bool:
    """A parsed YAML file that is a worker's config, not a gateway's (no gateway_id)."""
    return isinstance(data, dict) and "gateway_id" not in data and (
        "broker" in data or "group" in data)


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read the file ({err.strerror})"]) from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(err, 'problem', err)})"]) from None


def parse_cloud_config(data: object) -> CloudConfig:
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping, e.g. broker: {url: ...}"])
    try:
        return CloudConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_problems(err)) from None


def load_cloud_config(path: Path) -> CloudConfig:
    """The worker's config at ``path``; ConfigError with one line per problem."""
    return parse_cloud_config(read_yaml(path))


def check_cloud_config(cfg: CloudConfig) -> list[str]:
    """Offline checks beyond the schema (files, secrets, the state file's directory)."""
    problems = link_problems("broker", cfg.broker)
    for what, read in (("password", cfg.influx.password), ("token", cfg.influx.token)):
        try:
            read()
        except SecretError as err:
            problems.append(f"influx.{what}: {err}")
    secrets = [("broker.password_file", cfg.broker.password_file),
               ("broker.key_file", cfg.broker.key_file),
               ("influx.password_file", cfg.influx.password_file),
               ("influx.token_file", cfg.influx.token_file),
               ("signing_key_file", cfg.signing_key_file)]
    problems += [f"{name}: {p}" for name, secret in secrets if (p := exposure(secret))]
    parent = cfg.state_path.parent
    if cfg.state_path.is_dir():
        problems.append(f"state_path: {str(cfg.state_path)!r} is a directory; name a file "
                        "in it, e.g. ingest.db")
    elif not parent.exists():
        problems.append(f"state_path: directory {str(parent)!r} does not exist; create it")
    elif not os.access(parent, os.W_OK):
        problems.append(f"state_path: directory {str(parent)!r} is not writable by this user")
    return problems


def sample_cloud_config() -> str:
    """The commented sample (deploy/cloud.example.yaml), built from the models."""
    example: dict[str, Any] = {"broker": {"url": "mqtts://broker.example.com:8883",
                                          "client_id": "fieldgate-ingest-1",
                                          "username": "ingest",
                                          "password_file": "/etc/fieldgate/ingest.pw"}}
    values = CloudConfig.model_validate(example).model_dump(mode="json")
    header = [
        "# Fieldgate cloud ingest worker (generated by `gateway config sample --cloud`).",
        "# Run: gateway cloud ingest -c cloud.yaml; check: gateway check --cloud -c cloud.yaml",
        "# Operators' tools (gateway cloud send|deploy-rules|rollback-rules) read broker: and",
        "# signing_key_file: from the same file.",
        "# Durations take ms/s/m/h/d. Secrets come from *_file or *_env.",
        "",
    ]
    return "\n".join(header + render_model(CloudConfig, values, 0)) + "\n"
