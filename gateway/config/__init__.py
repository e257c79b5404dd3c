"""The gateway's configuration (a package while it is split by job)."""

from gateway.config.addresses import public_url, split_host_port
from gateway.config.checks import check_config
from gateway.config.loading import DuplicateKeyError, UniqueKeyLoader, load_config, parse_config
from gateway.config.models import (
    Batching,
    CloudLink,
    Commands,
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
    "Batching", "CloudLink", "Commands", "DuplicateKeyError", "EngineSection", "GatewayConfig",
    "Influx", "InfluxApi", "Ingest", "Link", "LogSection", "Metrics", "PayloadFormat", "SiteLink",
    "Subscription", "Sync", "UniqueKeyLoader", "Uplink", "WhenFull", "check_config",
    "load_config", "parse_config", "public_url", "read_secret", "sample_config",
    "split_host_port",
]
