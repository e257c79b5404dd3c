"""The worker's /metrics (prometheus_client, a registry of its own)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.metrics import serve


class _DeadLetters(Collector):
    """Dead letters by reason, counted from the state file (so they survive restarts)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("fieldgate_ingest_dead_letters", "Messages put in the "
                                     "dead-letter table (and acknowledged), by reason; kept "
                                     "rows, up to dlq_max_rows", labels=["reason"])
        for reason, value in sorted(self._source().items()):
            family.add_metric([reason], value)
        yield family


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("fieldgate_ingest_messages", "Uplink messages received, by "
                                "kind (telemetry, event, status, resend_reply)", ["kind"],
                                registry=r)
        self.redeliveries = Counter("fieldgate_ingest_redeliveries", "Messages the broker "
                                    "sent again (DUP flag: an earlier worker or connection "
                                    "did not acknowledge them)", registry=r)
        self.acked = Counter("fieldgate_ingest_acked", "Messages acknowledged after their "
                             "points were written (or they were dead-lettered)", registry=r)
        self.points = Counter("fieldgate_ingest_points", "Points InfluxDB accepted, by kind "
                              "(reading, event, status, gap)", ["kind"], registry=r)
        self.requests = Counter("fieldgate_ingest_influx_requests", "Write requests by "
                                "outcome: ok, rejected (4xx: split, then dead-lettered), "
                                "too_large (413: split), retry (auth, not found, throttled, "
                                "5xx, network: backed off, kept unacknowledged)", ["outcome"],
                                registry=r)
        self.pending = Gauge("fieldgate_ingest_pending", "Messages received and not yet "
                             "acknowledged (at most receive_maximum)", registry=r)
        self.link_up = Gauge("fieldgate_link_connected", "1 while connected", ["link"],
                             registry=r)
        self.gaps = Counter("fieldgate_ingest_gaps", "Holes in a gateway's seqs that waited "
                            "gap_wait, asked for again", registry=r)
        self.gap_seqs = Counter("fieldgate_ingest_gap_seqs", "Seqs in gaps, by outcome: "
                                "detected, repaired (re-sent and written), lost (the gateway "
                                "no longer had them, or never answered)", ["outcome"],
                                registry=r)
        self.resend_requests = Counter("fieldgate_ingest_resend_requests", "Resend requests "
                                       "published to gateways", registry=r)
        self.high_water = Gauge("fieldgate_ingest_high_water", "Highest seq of a gateway "
                                "below which everything was written or reported lost",
                                ["gateway"], registry=r)

    def watch_dead_letters(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(_DeadLetters(source))

    def serve(self, listen: str) -> None:
        serve(self.registry, listen, "--metrics")
