"""The config's pydantic models: one section per part of the gateway, GatewayConfig the
whole file.

Every field has a description (it becomes a comment in the sample config) and a default
that is safe on a Raspberry Pi. Secrets are never inline: they come from a file (``*_file``)
or an environment variable (``*_env``) and are read when needed (see secrets). Validators
raise ValueError, as pydantic wants; loading turns those into one line per problem.
"""

from __future__ import annotations

import re
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fieldkit.units import ByteSize, Duration, Precision
from gateway.clock import ClockCheck
from gateway.config.addresses import check_http_url, check_mqtt_url, is_loopback, split_host_port
from gateway.config.keys import decode_public_key
from gateway.config.secrets import INLINE_SECRET_NAMES, read_secret
from gateway.config.tls import client_context

_TEMPLATE_PART = re.compile(r"^\{(device|metric)\}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if name in INLINE_SECRET_NAMES:
                    raise ValueError(
                        f"inline secret {name!r} is not accepted; use {name}_file (a path) "
                        f"or {name}_env (an environment variable name)"
                    )
        return data


class Link(Section):
    """Connection to an MQTT broker."""

    url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="Broker URL: mqtt://host:port (plain) or mqtts://host:port (TLS)",
    )
    client_id: str | None = Field(
        None, min_length=1, max_length=65535,
        description="MQTT client id; default fieldgate-<gateway_id> (site) or "
        "fieldgate-<gateway_id>-cloud (cloud)"
    )
    username: str | None = Field(None, description="User name, if the broker wants one")
    password_file: Path | None = Field(None, description="File holding the password")
    password_env: str | None = Field(None, description="Environment variable holding the password")
    ca_file: Path | None = Field(
        None, description="CA bundle to verify the broker's certificate (mqtts); "
        "default: the system trust store"
    )
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS)")
    keepalive: Duration = Field(30.0, ge=1, le=65535, description="MQTT keepalive interval")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_mqtt_url(value)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        return (8883 if self.tls else 1883) if port is None else port

    def ssl_context(self, name: str = "") -> ssl.SSLContext:
        """The TLS context for this link; ConfigError naming the file when one is unusable."""
        return client_context(self.ca_file, self.cert_file, self.key_file,
                              f"{name}." if name else "")

    def password(self) -> str | None:
        """Read the password from its file or variable (never stored on the model)."""
        return read_secret(self.password_file, self.password_env, "password")


class SiteLink(Link):
    """The site broker that sensors publish to."""

    session_expiry: Duration = Field(
        7 * 86400.0, ge=0, le=4294967295,
        description="How long the site broker keeps our session (and queues readings) "
        "while the gateway is down",
    )
    receive_maximum: int = Field(
        1000, ge=10, le=65535,
        description="Unacknowledged QoS 1 messages the broker may send at once; readings are "
        "acknowledged after they are durable, so this bounds memory and must exceed "
        "rate x commit interval",
    )


class CloudLink(Link):
    """The cloud broker readings and events are forwarded to."""

    url: str = Field(
        "mqtts://broker.example.com:8883",
        description="Cloud broker URL; mqtts:// (TLS) unless the broker is on this machine",
    )
    allow_plaintext: bool = Field(
        False, description="Allow mqtt:// (no TLS) to a host that is not loopback; "
        "readings then cross the network unencrypted"
    )

    @model_validator(mode="after")
    def _tls_when_remote(self) -> CloudLink:
        if not self.tls and not self.allow_plaintext and not is_loopback(self.host):
            raise ValueError(
                f"url {self.url!r} sends data unencrypted to a remote host; use mqtts:// "
                "or set allow_plaintext: true"
            )
        return self


class PayloadFormat(StrEnum):
    JSON = "json"
    NUMBER = "number"


class Subscription(Section):
    """A topic template on the site broker."""

    topic: str = Field(description="Topic template with {device} and optional {metric}")
    format: PayloadFormat = Field(
        PayloadFormat.JSON,
        description="json: an object or array of objects; number: a bare number per metric",
    )

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        parts = value.split("/")
        names = [p for p in parts if p.startswith("{")]
        for part in parts:
            if "+" in part or "#" in part:
                raise ValueError(f"{value!r}: use {{device}}/{{metric}} placeholders, not + or #")
            if "{" in part and not _TEMPLATE_PART.match(part):
                raise ValueError(f"{value!r}: a placeholder must fill a whole level, "
                                 "e.g. sensors/{device}/telemetry")
        if names.count("{device}") != 1:
            raise ValueError(f"{value!r} needs exactly one {{device}} placeholder")
        if names.count("{metric}") > 1:
            raise ValueError(f"{value!r} has more than one {{metric}} placeholder")
        return value

    @model_validator(mode="after")
    def _metric_for_numbers(self) -> Subscription:
        if self.format is PayloadFormat.NUMBER and "{metric}" not in self.topic:
            raise ValueError(f"topic {self.topic!r}: format number needs a {{metric}} placeholder")
        return self


class Ingest(Section):
    """Decoding and validation of inbound payloads; what fails goes to the dead-letter table."""

    max_payload: ByteSize = Field(64 * 1024, ge=16, le=256 * 1024**2,
                                  description="Largest accepted payload")
    max_metrics: int = Field(64, ge=1, description="Most metrics in one reading")
    max_readings: int = Field(1000, ge=1, description="Most readings in one JSON array")
    max_device_id: int = Field(
        128, ge=1, le=1024,
        description="Longest device id (characters) taken from a topic; longer ones, ids "
        "with characters other than ASCII letters, digits and _ . - : @ ~, and . or .. "
        "alone are dead-lettered (bad_device); `gateway site add-device` applies the same "
        "rule",
    )
    max_past: Duration = Field(
        30 * 86400.0, gt=0, description="Readings timestamped further in the past are rejected"
    )
    max_future: Duration = Field(
        300.0, ge=0, description="Readings timestamped further in the future are rejected"
    )
    clock_check: ClockCheck = Field(
        ClockCheck.AUTO,
        description="When the system clock counts as unsynchronised (readings then kept and "
        "marked clock_unsynced instead of rejected as ts_out_of_range): auto (before this "
        "release, or no NTP sync per the kernel where a time-sync service runs), kernel (the "
        "kernel's NTP status alone), off (always trust the clock)",
    )
    commit_interval: Duration = Field(
        0.1, gt=0, le=1,
        description="Group commit: how often received readings are made durable and "
        "acknowledged; longer costs latency, shorter costs CPU per reading (each commit "
        "wakes the gateway and fsyncs)",
    )


class WhenFull(StrEnum):
    DROP_OLDEST = "drop_oldest"
    REFUSE = "refuse"


class Sync(StrEnum):
    NORMAL = "normal"
    FULL = "full"


class LogSection(Section):
    """The durable local log (SQLite, WAL)."""

    path: Path = Field(Path("/var/lib/fieldgate/log.db"), description="Log database file")
    max_bytes: ByteSize = Field(
        1024**3, ge=256 * 1024,
        description="Cap on the log file's used bytes (records, dead letters, state; the "
        "file stays within about 32 KiB of it, plus the WAL); delivered records go first",
    )
    max_age: Duration = Field(7 * 86400.0, gt=0,
                              description="Records older than this are removed")
    when_full: WhenFull = Field(
        WhenFull.DROP_OLDEST,
        description="At the cap with undelivered records: drop_oldest (counted) or refuse "
        "(stop acknowledging the site broker, which then holds readings: backpressure)",
    )
    synchronous: Sync = Field(
        Sync.FULL,
        description="full: fsync every group commit (survives power loss); normal: survives "
        "a crash of the gateway, may lose the last commits on power loss",
    )
    dlq_max_rows: int = Field(100_000, ge=1, description="Cap on dead letters kept (oldest go)")
    dlq_max_payload: ByteSize = Field(
        4096, ge=0, le=16 * 1024**2,
        description="Raw bytes kept per dead letter (longer payloads are truncated)"
    )


class Batching(StrEnum):
    """When the uplink sends telemetry that does not fill a batch (events never wait)."""

    ADAPTIVE = "adaptive"  # at once when no batch is in flight; gather while one is
    DELAY = "delay"        # always gather for batch_max_delay: fewest messages, most latency


class Uplink(Section):
    """Forwarding to the cloud broker under fieldgate/<gateway_id>/."""

    batch_max_readings: int = Field(500, ge=1, description="Most readings in one message")
    batch_max_bytes: ByteSize = Field(256 * 1024, ge=4096, le=256 * 1024**2,
                                      description="Largest message payload")
    batching: Batching = Field(
        Batching.ADAPTIVE,
        description="adaptive: telemetry goes at once when no batch awaits its PUBACK and "
        "gathers (up to batch_max_delay) while one does, so batches grow with the cloud's "
        "round trip; delay: always gather for batch_max_delay (fewer, larger messages, e.g. "
        "for a broker that bills per message, at the cost of latency). Events never wait",
    )
    batch_max_delay: Duration = Field(
        0.2, gt=0, description="Longest a reading waits for its batch to fill (adaptive: "
        "only while a batch is in flight)"
    )
    max_inflight: int = Field(
        64, ge=1, le=1000,
        description="Batches published and not yet acknowledged (PUBACK); more hides the "
        "cloud round trip (16 capped a busy link at ~130k readings/s here, 64 gave ~220k), "
        "costs memory (up to max_inflight x batch_max_bytes) and resends after a reconnect",
    )
    gzip: bool = Field(False, description="Compress batches (flagged in a user property)")
    backoff_min: Duration = Field(1.0, gt=0, description="First delay after the broker "
                                  "refused us or a batch (an unreachable broker is probed "
                                  "every second instead)")
    backoff_max: Duration = Field(60.0, gt=0,
                                  description="Longest such delay (with jitter)")
    status_interval: Duration = Field(60.0, gt=0,
                                      description="How often the status message is renewed")


class Commands(Section):
    """Commands to devices on the site broker (devices/<id>/cmd), signed when a key is set."""

    key_file: Path | None = Field(
        None, description="File holding the site master key; each device's HMAC-SHA256 key "
        "is derived from it (`gateway site add-device` prints it)"
    )
    key_env: str | None = Field(None, description="Environment variable holding that key")
    ack_timeout: Duration = Field(
        60.0, gt=0, description="A command not answered by then is logged as timed out")
    max_pending: int = Field(
        10_000, gt=0, description="Commands waiting for an answer at most; past it the "
        "oldest times out early")

    def key(self) -> bytes | None:
        value = read_secret(self.key_file, self.key_env, "command key")
        return value.encode() if value is not None else None


class AllowRule(Section):
    """Which commands the cloud may send to which devices."""

    devices: str = Field(min_length=1, description="Device id glob (fnmatch: * ? [...])",
                         examples=["fan-*"])
    commands: list[str] = Field(
        min_length=1, description="Actions allowed for those devices; \"*\" allows every action",
        examples=[["set"]])


class Downlink(Section):
    """Commands and rule bundles from the cloud (docs/downlink.md): signed by the cloud's
    key, fresh, allowed here, and logged. Off unless ``allow`` or ``rules`` says otherwise."""

    public_keys: list[str] = Field(
        default_factory=list, description="The cloud's Ed25519 public keys (base64, as "
        "`gateway cloud keygen` prints them); a request signed by any of them is authentic",
        examples=[["3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]])
    allow: list[AllowRule] = Field(
        default_factory=list, description="Commands the cloud may send, by device glob; "
        "anything not listed is refused; empty: the command downlink is off")
    rules: bool = Field(False, description="Take rule bundles from the cloud "
                        "(fieldgate/<gateway_id>/rules/set and rules/rollback)")
    rules_dir: Path | None = Field(
        None, description="Where deployed rule versions are kept; default: a `rules` "
        "directory beside the log file")
    max_clock_skew: Duration = Field(
        300.0, gt=0, le=86400, description="A request whose ts is further than this from "
        "the gateway's clock is refused (stale or from the future); request ids are "
        "remembered this long, so a replay is refused")
    default_ttl: Duration = Field(60.0, gt=0, description="How long a cloud command waits "
                                  "for the site broker and the device when it names no ttl")
    max_ttl: Duration = Field(3600.0, gt=0, description="Longest ttl a cloud command may ask")
    max_command_bytes: ByteSize = Field(16 * 1024, ge=256, le=1024**2,
                                        description="Largest command payload taken")
    max_bundle_bytes: ByteSize = Field(
        256 * 1024, ge=1024, le=4 * 1024**2, description="Largest rule bundle payload taken "
        "(a bundle is checked in the gateway's loop, at seconds per MiB of rules)")

    @field_validator("public_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for i, key in enumerate(value):
            try:
                decode_public_key(key)
            except ValueError as err:
                raise ValueError(f"public_keys[{i}]: {err}") from None
        return value

    @model_validator(mode="after")
    def _usable(self) -> Downlink:
        if (self.allow or self.rules) and not self.public_keys:
            raise ValueError("allow or rules is set but public_keys is empty: add the cloud's "
                             "public key (`gateway cloud keygen` prints it)")
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl must not exceed max_ttl")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.allow) or self.rules

    def rules_path(self, log_path: Path) -> Path:
        return self.rules_dir if self.rules_dir is not None else log_path.with_name("rules")


class EngineSection(Section):
    """The rule engine (active when `rules` names at least one file)."""

    tick: Duration = Field(1.0, gt=0, le=60, description="How often every rule is evaluated")
    late_tolerance: Duration = Field(
        30.0, ge=0, description="Readings older than this are kept out of rule state "
        "(still forwarded)")
    offline_after: Duration | None = Field(
        60.0, gt=0, description="Silence after which a device is reported offline; null: never")
    max_devices: int = Field(100_000, gt=0, description="Devices the engine tracks at most")


class Metrics(Section):
    """Prometheus /metrics endpoint."""

    listen: str | None = Field(
        "127.0.0.1:9108", description="host:port for /metrics ([::1]:9108 for IPv6); null "
        "turns it off"
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value


# -- influx: the InfluxDB sink (gateway/sinks/influx.py) ---------------------------------

class InfluxApi(StrEnum):
    V1 = "v1"
    V2 = "v2"


class Influx(Section):
    """Writing readings, events and the gateway's health to InfluxDB (the influx sink).

    Measurements: telemetry (tags gateway, site, device and device_labels; a float field
    per metric), events (alerts, commands) and fieldgate (the gateway's health).
    """

    url: str = Field("http://127.0.0.1:8086",
                     description="InfluxDB base URL: http://host:port or https://host:port")
    api: InfluxApi = Field(
        InfluxApi.V1,
        description="v1: /write with database, retention_policy, username, password "
        "(InfluxDB 1.x, as `apt install influxdb` ships it); v2: /api/v2/write with token, "
        "org, bucket (InfluxDB 2.x, 3.x, 1.8+, VictoriaMetrics)",
    )
    database: str = Field("fieldgate", min_length=1, description="v1: database to write to")
    retention_policy: str | None = Field(
        None, description="v1: retention policy; default: the database's default")
    username: str | None = Field(None, description="v1: user name, if auth is enabled")
    password_file: Path | None = Field(None, description="v1: file holding the password")
    password_env: str | None = Field(None, description="v1: environment variable holding "
                                     "the password")
    token_file: Path | None = Field(None, description="v2: file holding the API token "
                                    "(InfluxDB 1.8: username:password)")
    token_env: str | None = Field(None, description="v2: environment variable holding the "
                                  "API token")
    org: str | None = Field(None, description="v2: organization (any name for "
                            "VictoriaMetrics); required with api: v2")
    bucket: str = Field("fieldgate", min_length=1, description="v2: bucket to write to")
    precision: Precision = Field(
        Precision.MS, description="Timestamp precision written: s, ms, us or ns; readings "
        "of one device closer together than this overwrite each other")
    measurement: str = Field("telemetry", pattern=r"^[^#\s][^\n]{0,199}$",
                             description="Measurement for readings")
    site: str | None = Field(None, description="Value of the site tag; default: gateway_id")
    batch_max_points: int = Field(5000, ge=1, le=1_000_000,
                                  description="Most points in one write request")
    batch_max_bytes: ByteSize = Field(
        1024 * 1024, ge=4096, description="Largest write request body (before gzip); a "
        "413 from the server halves it")
    batch_max_delay: Duration = Field(
        1.0, gt=0, description="Longest a reading waits for its batch to fill; shorter "
        "shows readings sooner at more requests per second")
    gzip: bool = Field(False, description="Compress request bodies (saves bandwidth to a "
                       "remote server, costs CPU on the gateway)")
    timeout: Duration = Field(10.0, gt=0, description="HTTP timeout of one write request")
    backoff_min: Duration = Field(1.0, gt=0, description="First retry delay after a failed "
                                  "write")
    backoff_max: Duration = Field(60.0, gt=0, description="Longest retry delay (with jitter)")
    ca_file: Path | None = Field(None, description="CA bundle to verify the server (https); "
                                 "default: the system trust store")
    verify: bool = Field(True, description="Verify the server's TLS certificate (https); "
                         "false only for testing")
    health_interval: Duration = Field(
        10.0, gt=0, description="How often the gateway's health (sink depths, rates, drops, "
        "dead letters, link states) is written to the fieldgate measurement")

    @field_validator("url")
    @classmethod
    def _check_influx_url(cls, value: str) -> str:
        return check_http_url(value)

    @model_validator(mode="after")
    def _consistent_influx(self) -> Influx:
        if self.api is InfluxApi.V2 and not self.org:
            raise ValueError("api v2 needs org (the InfluxDB organization; any name for "
                             "VictoriaMetrics)")
        if self.api is InfluxApi.V1 and (self.token_file or self.token_env):
            raise ValueError("api v1 authenticates with username and password_file; "
                             "token_file/token_env are for api: v2")
        if self.api is InfluxApi.V2 and (self.password_file or self.password_env):
            raise ValueError("api v2 authenticates with token_file or token_env (InfluxDB "
                             "1.8: a token of the form username:password)")
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("set token_file or token_env, not both")
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min must not exceed backoff_max")
        return self

    def password(self) -> str | None:
        return read_secret(self.password_file, self.password_env, "InfluxDB password")

    def token(self) -> str | None:
        return read_secret(self.token_file, self.token_env, "InfluxDB token")

    def site_tag(self, gateway_id: str) -> str:
        return self.site or gateway_id


class GatewayConfig(Section):
    """Fieldgate gateway configuration."""

    gateway_id: Annotated[str, Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Unique id of this gateway; names uplink topics and every record",
        examples=["gh-site-1"],
    )]
    site: SiteLink = Field(default_factory=SiteLink, description="Site broker")
    cloud: CloudLink | None = Field(
        None, description="Cloud broker; leave out to keep readings in the local log only",
        examples=[{"url": "mqtts://broker.example.com:8883", "username": "gw1",
                   "password_file": "/etc/fieldgate/cloud.pw"}],
    )
    subscriptions: list[Subscription] = Field(
        default_factory=lambda: [
            Subscription(topic="sensors/{device}/telemetry", format=PayloadFormat.JSON),
            Subscription(topic="sensors/{device}/{metric}", format=PayloadFormat.NUMBER),
        ],
        min_length=1,
        description="Topic templates to subscribe to on the site broker",
    )
    ingest: Ingest = Field(default_factory=Ingest, description="Payload checks")
    log: LogSection = Field(default_factory=LogSection, description="Durable log")
    uplink: Uplink = Field(default_factory=Uplink, description="Cloud forwarding")
    rules: list[str] = Field(
        default_factory=list, description="Rule files (globs allowed), e.g. "
        "/etc/fieldgate/rules/*.yaml; empty: no rule engine",
        examples=[["/etc/fieldgate/rules/*.yaml"]],
    )
    engine: EngineSection = Field(default_factory=EngineSection, description="Rule engine")
    device_labels: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Labels for devices, by device-id glob, that rule "
        "groups can match on (later globs add to earlier ones)",
        examples=[{"gh-*": {"zone": "north"}}],
    )
    commands: Commands = Field(default_factory=Commands, description="Device commands")
    downlink: Downlink = Field(default_factory=Downlink, description="Commands and rule "
                               "bundles from the cloud (docs/downlink.md)")
    metrics: Metrics = Field(default_factory=Metrics, description="Metrics endpoint")
    influx: Influx | None = Field(
        None, description="InfluxDB; leave out to write nothing there",
        examples=[{"url": "http://127.0.0.1:8086", "api": "v1", "database": "fieldgate"}],
    )

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        if self.ingest.max_payload * 4 > self.log.max_bytes:
            raise ValueError(
                f"log.max_bytes {self.log.max_bytes} must be at least 4x ingest.max_payload "
                f"{self.ingest.max_payload}; raise log.max_bytes or lower ingest.max_payload"
            )
        if self.uplink.backoff_min > self.uplink.backoff_max:
            raise ValueError("uplink.backoff_min must not exceed uplink.backoff_max")
        if self.downlink.enabled and self.cloud is None:
            raise ValueError("downlink: commands and rules come over the cloud link; "
                             "configure cloud: or leave downlink out")
        if self.downlink.allow and self.commands.key_file is None \
                and self.commands.key_env is None:
            raise ValueError("downlink.allow: commands from the cloud are signed for the "
                             "device with its key; set commands.key_file or commands.key_env")
        return self

    @model_validator(mode="after")
    def _distinct_filters(self) -> GatewayConfig:
        seen: dict[str, str] = {}
        for sub in self.subscriptions:
            key = "/".join("+" if p.startswith("{") else p for p in sub.topic.split("/"))
            if key in seen:
                raise ValueError(f"subscriptions: {sub.topic!r} and {seen[key]!r} subscribe to "
                                 f"the same filter {key!r}; keep one")
            seen[key] = sub.topic
        return self

    @property
    def site_client_id(self) -> str:
        return self.site.client_id or f"fieldgate-{self.gateway_id}"

    @property
    def cloud_client_id(self) -> str:
        assert self.cloud is not None
        return self.cloud.client_id or f"fieldgate-{self.gateway_id}-cloud"
