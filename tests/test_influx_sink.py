"""The influx sink in-process against a real influxd: events, 413 splitting, what each
response status means, and the loop's view of the sink (wake fd, depth)."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.events import Event
from gateway.influx.http import retry_after
from gateway.log.store import LogStore, Message
from gateway.metrics import GatewayMetrics
from gateway.sinks.influx import NAME, InfluxSink, Outcome, classify
from tests.tools import open_log
from tests.tsdb import InfluxD

DB = "fieldgate"


@pytest.fixture
def small_influx(tmp_path: Path) -> Iterator[InfluxD]:
    # A request body limit that a default batch exceeds: the server answers 413.
    server = InfluxD(tmp_path, max_body=20_000).start()
    server.create_database(DB)
    yield server
    server.stop()


def _config(tmp_path: Path, server: InfluxD, **influx: Any) -> GatewayConfig:
    return parse_config({
        "gateway_id": "gw-1",
        "log": {"path": str(tmp_path / "log.db")},
        "metrics": {"listen": None},
        "influx": {"url": server.url, "database": DB, "batch_max_delay": "10ms",
                   "backoff_min": "50ms", "backoff_max": "200ms", "health_interval": "1h",
                   **influx},
    })


def _readings(store: LogStore, n: int, t0: float) -> None:
    messages = [Message("sensors/d/telemetry", b"", i, [("d", t0 + i / 1000, {"v": i})],
                        t0) for i in range(n)]
    store.append(messages)


def _drive(sink: InfluxSink, until: Callable[[], bool], timeout: float = 30) -> None:
    """The gateway loop's part for one sink: wait on its wake fd, step it."""
    deadline = time.monotonic() + timeout
    while not until():
        now = time.monotonic()
        assert now < deadline, "sink did not get there in time"
        select.select([sink.wake_fd], [], [], min(0.1, sink.next_wake(now)))
        sink.step(time.monotonic())


def test_413_splits_until_the_server_takes_it(tmp_path, small_influx):
    cfg = _config(tmp_path, small_influx)
    store = open_log(cfg.log, cfg.gateway_id, [NAME])
    metrics = GatewayMetrics()
    sink = InfluxSink(cfg, store, metrics)
    t0 = float(int(time.time()) - 60)
    _readings(store, 3000, t0)
    _drive(sink, lambda: store.cursors()[NAME] == store.next_seq)
    assert small_influx.count(DB, field="v") == 3000
    value = metrics.registry.get_sample_value
    assert value("fieldgate_influx_requests_total", {"outcome": "too_large"}) > 0
    assert value("fieldgate_influx_rejected_points_total") == 0
    sink.finish()
    store.close()


def test_events_become_annotation_points(tmp_path, small_influx):
    cfg = _config(tmp_path, small_influx, site="north")
    store = open_log(cfg.log, cfg.gateway_id, [NAME])
    sink = InfluxSink(cfg, store, GatewayMetrics())
    now = float(int(time.time()) - 10)
    store.append_events([
        Event("io.fieldgate.alert.fired", "gh-1", now, {
            "rule": "TooHot", "severity": "warning", "value": 31.5,
            "message": "gh-1 is hot: 31.5 °C"}),
        Event("io.fieldgate.command.issued", "gh-1", now + 0.001, {
            "id": "c1", "action": "fan", "params": {"on": True},
            "cause": {"rule": "TooHot", "device": "gh-1"}}),
    ])
    _drive(sink, lambda: store.cursors()[NAME] == store.next_seq)
    points = small_influx.points(DB, "events")
    assert [(p["type"], p["rule"], p["device"], p["gateway"], p["site"]) for p in points] == [
        ("io.fieldgate.alert.fired", "TooHot", "gh-1", "gw-1", "north"),
        ("io.fieldgate.command.issued", "TooHot", "gh-1", "gw-1", "north")]
    fired, command = points
    assert (fired["severity"], fired["value"], fired["summary"]) == (
        "warning", 31.5, "gh-1 is hot: 31.5 °C")
    assert fired["time"] == round(now * 1000) and fired["id"].startswith("gw-1-")
    assert command["summary"] == "command.issued gh-1 action=fan"
    sink.finish()
    store.close()


def test_down_server_keeps_the_cursor_and_wakes_only_to_retry(tmp_path, small_influx):
    cfg = _config(tmp_path, small_influx)
    small_influx.stop()
    store = open_log(cfg.log, cfg.gateway_id, [NAME])
    metrics = GatewayMetrics()
    sink = InfluxSink(cfg, store, metrics)
    _readings(store, 10, time.time())
    value = metrics.registry.get_sample_value
    _drive(sink, lambda: (value("fieldgate_influx_requests_total",
                                {"outcome": "network"}) or 0) >= 3)
    assert store.cursors()[NAME] == 1
    assert sink.next_wake(time.monotonic()) > 0  # backing off, not spinning
    small_influx.start()
    _drive(sink, lambda: store.cursors()[NAME] == store.next_seq)
    assert small_influx.count(DB, field="v") == 10
    sink.finish()
    store.close()


@pytest.mark.parametrize(("status", "outcome"), [
    (204, Outcome.OK), (200, Outcome.OK), (400, Outcome.REJECTED), (422, Outcome.REJECTED),
    (413, Outcome.TOO_LARGE), (401, Outcome.AUTH), (403, Outcome.AUTH),
    (404, Outcome.NOT_FOUND), (429, Outcome.THROTTLED), (503, Outcome.THROTTLED),
    (500, Outcome.SERVER_ERROR), (502, Outcome.SERVER_ERROR), (408, Outcome.SERVER_ERROR),
    (0, Outcome.NETWORK),
])
def test_status_classes(status, outcome):
    assert classify(status) is outcome


def test_retry_after_seconds_and_dates():
    assert retry_after("7") == 7.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


def _problems(influx: dict[str, Any]) -> str:
    from gateway.errors import ConfigError

    try:
        parse_config({"gateway_id": "g", "influx": influx})
    except ConfigError as err:
        return str(err)
    return ""


def test_config_errors_name_the_field_and_the_fix(tmp_path):
    assert "api v2 needs org" in _problems({"api": "v2"})
    assert "inline secret 'token'" in _problems({"api": "v2", "org": "o", "token": "x"})
    assert "influx.url" in _problems({"url": "ftp://x"})
    assert "token_file/token_env are for api: v2" in _problems({"token_env": "T"})
    assert _problems({"api": "v2", "org": "o", "token_env": "T"}) == ""
    from gateway.config import check_config

    cfg = parse_config({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                        "influx": {"username": "u", "password_file": str(tmp_path / "nope")}})
    problems = check_config(cfg)
    assert len(problems) == 1 and problems[0].startswith("influx.password: cannot read")


