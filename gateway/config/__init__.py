"""The gateway's configuration: one YAML file, checked before anything starts.

The modules, each one job (imports run down this list, never up)::

    loading     YAML -> GatewayConfig: duplicate keys refused, every problem one line
                naming the field (or the line) and the fix, raised as ConfigError
    checks      what `gateway check` verifies offline: secrets readable and not exposed,
                TLS files present and usable, the log's directory writable
    sample      `gateway config sample` (deploy/gateway.example.yaml), built from models
    models      the pydantic models: one section per part, a description and a safe
                default on every field; GatewayConfig is the whole file
    addresses   broker/server URLs and host:port checked; URLs printed without secrets
    secrets     secrets read from *_file or *_env when needed; exposed files refused
    tls         the TLS client context a link connects with
    keys        public keys in the config (downlink.public_keys) decoded and checked

Import from here (``from gateway.config import GatewayConfig``); the modules are the
layout, this is the interface.
"""

from gateway.config.addresses import public_url, split_host_port
from gateway.config.checks import check_config
from gateway.config.loading import DuplicateKeyError, UniqueKeyLoader, load_config, parse_config
from gateway.config.models import (
    AllowRule,
    Batching,
    CloudLink,
    Commands,
    Downlink,
    EngineSection,
    GatewayConfig,
    Influx,
    InfluxApi,
    Ingest,
    Link,
    LogSection,
    Metrics,
    PayloadFormat,
    SiteLink,
    Subscription,
    Sync,
    Uplink,
    WhenFull,
)
from gateway.config.sample import sample_config
from gateway.config.secrets import read_secret

__all__ = [
    "AllowRule", "Batching", "CloudLink", "Commands", "Downlink", "DuplicateKeyError",
    "EngineSection", "GatewayConfig",
    "Influx", "InfluxApi", "Ingest", "Link", "LogSection", "Metrics", "PayloadFormat", "SiteLink",
    "Subscription", "Sync", "UniqueKeyLoader", "Uplink", "WhenFull", "check_config",
    "load_config", "parse_config", "public_url", "read_secret", "sample_config",
    "split_host_port",
]
