"""Counters and gauges on /metrics (Prometheus text format, via prometheus-client).

Nothing is dropped silently: every drop, rejection and retry has a counter here. Counters
that must survive restarts (dead letters, drops) live in the log and are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import split_host_port
from gateway.errors import FieldgateError


class _PersistedCounters(Collector):
    """Exposes the log's persisted counters (``dead_letters.<reason>``, ``dropped.<reason>``)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        values = self._source()
        dead = CounterMetricFamily("fieldgate_dead_letters", "Messages sent to the dead-letter "
                                   "table, by reason", labels=["reason"])
        dropped = CounterMetricFamily("fieldgate_log_dropped_readings", "Undelivered readings "
                                      "removed from the log, by reason (cap, age)",
                                      labels=["reason"])
        for name, value in sorted(values.items()):
            kind, _, label = name.partition(".")
            if kind == "dead_letters" and label:
                dead.add_metric([label], value)
            elif kind == "dropped" and label:
                dropped.add_metric([label], value)
        yield dead
        yield dropped
        # Derived from the log's sequence numbers: the readings ever logged, across restarts
        # and crashes, like the dead-letter and drop counters beside it.
        yield CounterMetricFamily("fieldgate_readings", "Valid readings made durable (since "
                                  "the log was created)", value=values.get("readings", 0))
        yield CounterMetricFamily("fieldgate_log_full_episodes", "Times the log refused "
                                  "readings because it was full",
                                  value=values.get("full_episodes", 0))
        yield CounterMetricFamily("fieldgate_dead_letters_evicted", "Dead letters removed at "
                                  "log.dlq_max_rows", value=values.get("dead_letters_evicted", 0))


class _EngineDrops(Collector):
    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("fieldgate_rule_dropped_readings", "Readings kept out of "
                                     "rule state (still forwarded), by reason",
                                     labels=["reason"])
        for reason, value in sorted(self._source().items()):
            family.add_metric([reason], value)
        yield family


class FailureCount:
    """Carries a link's running count of failed connection attempts (``MqttLink.failures``)
    to ``fieldgate_link_connect_failures{link=...}``: each ``update`` adds what is new."""

    __slots__ = ("_counter", "_link", "_seen")

    def __init__(self, counter: Counter, link: str) -> None:
        self._counter = counter
        self._link = link
        self._seen = 0

    def update(self, failures: int) -> None:
        if failures != self._seen:
            # The labelled series appears with the first failure, not before.
            self._counter.labels(self._link).inc(failures - self._seen)
            self._seen = failures


def serve(registry: CollectorRegistry, listen: str, how: str = "") -> None:
    """/metrics of ``registry`` on ``listen`` (host:port); FieldgateError naming the setting
    when it cannot be served (``how``: where else the user can set it, e.g. "--metrics")."""
    try:
        host, port = split_host_port(listen)
        start_http_server(port, addr=host, registry=registry)
    except (OSError, ValueError) as err:
        where = f" ({how})" if how else ""
        raise FieldgateError(f"metrics.listen {listen!r}: {err}; choose a free host:port"
                             f"{where} or set it to null") from None


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.site_messages = Counter("fieldgate_site_messages", "Messages received from the "
                                     "site broker", registry=r)
        self.redeliveries = Counter("fieldgate_site_redeliveries", "Site messages redelivered "
                                    "(DUP) that were already in the log, skipped", registry=r)
        self.qos0_dropped = Counter("fieldgate_site_qos0_dropped", "QoS 0 site messages lost "
                                    "because the connection dropped or the site session was "
                                    "paused before they were durable", registry=r)
        self.alerts_firing = Gauge("fieldgate_alerts_firing", "Alerts firing now (rule, "
                                   "device)", registry=r)
        self.rule_events = Counter("fieldgate_rule_events", "Events and commands from rules",
                                   registry=r)
        self.commits = Counter("fieldgate_log_commits", "Group commits of the log", registry=r)
        self.pending = Gauge("fieldgate_ingest_pending", "Messages received and not yet "
                             "durable (unacknowledged)", registry=r)
        self.log_bytes = Gauge("fieldgate_log_bytes", "Bytes of the log file in use (what "
                               "log.max_bytes caps)", registry=r)
        self.log_full = Gauge("fieldgate_log_full", "1 while the log refuses readings", registry=r)
        self.depth = Gauge("fieldgate_log_undelivered_readings", "Records (readings and "
                           "events) waiting for a sink",
                           ["sink"], registry=r)
        self.link_up = Gauge("fieldgate_link_connected", "1 while connected", ["link"], registry=r)
        self.connect_failures = Counter("fieldgate_link_connect_failures", "Failed connection "
                                        "attempts (retried with backoff)", ["link"], registry=r)
        self.uplink_batches = Counter("fieldgate_uplink_batches", "Batches acknowledged by the "
                                      "cloud broker", registry=r)
        self.uplink_readings = Counter("fieldgate_uplink_readings", "Readings acknowledged by "
                                       "the cloud broker", registry=r)
        self.uplink_rejected = Counter("fieldgate_uplink_rejected", "Batches the cloud broker "
                                       "refused, by PUBACK reason code (0x95 also: a record "
                                       "over the broker's Maximum Packet Size)", ["code"],
                                       registry=r)
        self.uplink_dead_lettered = Counter("fieldgate_uplink_dead_lettered_readings",
                                            "Readings the cloud broker refused for good, moved "
                                            "to the dead-letter table", registry=r)
        self.uplink_resent = Counter("fieldgate_uplink_resent_readings", "Readings sent again "
                                     "after a rejection", registry=r)
        # Commands and rule bundles from the cloud (gateway/downlink).
        self.downlink_requests = Counter("fieldgate_downlink_requests", "Requests from the "
                                         "cloud by kind (command, rules_set, rules_rollback) "
                                         "and result (taken, refused)", ["kind", "result"],
                                         registry=r)
        self.downlink_refused = Counter("fieldgate_downlink_refused", "Cloud requests refused, "
                                        "by reason (unsigned, bad_signature, stale, replayed, "
                                        "not_allowed, ...), logged or not", ["reason"],
                                        registry=r)
        # Gap repair (gateway/resend.py).
        self.resend_requests = Counter("fieldgate_resend_requests", "Resend requests from the "
                                       "cloud by result: done, busy, error (malformed or out "
                                       "of bounds), unanswered (busy or error over the answer "
                                       "rate limit)", ["result"], registry=r)
        self.resent_records = Counter("fieldgate_resent_records", "Records re-sent on request "
                                      "and acknowledged by the cloud broker (the uplink's "
                                      "cursor does not move)", registry=r)
        # The influx sink (gateway/sinks/influx.py).
        self.influx_requests = Counter(
            "fieldgate_influx_requests", "Write requests to InfluxDB by outcome: ok, "
            "rejected_points (400/422, split), too_large (413, split), auth (401/403), "
            "not_found (404), throttled (429/503), server_error (5xx), network", ["outcome"],
            registry=r)
        self.influx_points = Counter("fieldgate_influx_points", "Points InfluxDB accepted, by "
                                     "kind (reading, event, health)", ["kind"], registry=r)
        self.influx_rejected = Counter("fieldgate_influx_rejected_points", "Points InfluxDB "
                                       "refused for good, dead-lettered (reason "
                                       "sink_rejected)", registry=r)
        self.influx_health_dropped = Counter("fieldgate_influx_health_dropped", "Health points "
                                             "not written (InfluxDB unreachable or backing "
                                             "off)", registry=r)

    def link_failures(self, link: str) -> FailureCount:
        """What counts the failed connection attempts of the link named ``link``."""
        return FailureCount(self.connect_failures, link)

    def watch_engine(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Readings kept out of rule state, by reason (late, future, unused, devices)."""
        self.registry.register(_EngineDrops(source))

    def watch_log(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(_PersistedCounters(source))

    def serve(self, listen: str) -> None:
        serve(self.registry, listen)
