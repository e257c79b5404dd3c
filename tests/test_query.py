"""`gateway query` against a real InfluxDB 1.x (influxd on a free port) holding what a
gateway's influx sink writes (tests/tsdb.py's fill_fieldgate fills it)."""

from __future__ import annotations

import csv
import http.server
import io
import json
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from gateway.cli import main
from gateway.errors import ConfigError, SecretError
from gateway.mosquitto import free_port
from gateway.query import InfluxQLClient, QueryError, connection_from
from gateway.query.canned import _measurements_named, last, quote_literal, step_for
from gateway.query.render import format_time
from tests.tsdb import (  # noqa: F401 (pytest fixtures)
    Filled,
    InfluxD,
    fieldgate_db,
    influxd,
)

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["query", *args])


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(*args: str, code: int = 1) -> str:
    """The command failed with one line on stderr and nothing on stdout; that line."""
    result = run(*args)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def url(influxd: InfluxD, fieldgate_db: Filled) -> list[str]:  # noqa: F811
    return ["--url", influxd.url, "--db", fieldgate_db.db]


# --- an InfluxQL statement ----------------------------------------------------------------

def test_statement_prints_an_aligned_table_one_row_per_group(url: list[str],
                                                            fieldgate_db: Filled) -> None:  # noqa: F811
    out = ok("SELECT count(temp) FROM telemetry GROUP BY device", *url)
    header, rule, *rows = out.splitlines()
    assert header.split() == ["time", "device", "count"]
    assert set(rule.replace("  ", " ").split()) <= {"-" * n for n in range(1, 40)}
    counts = {r.split()[1]: int(r.split()[2]) for r in rows}
    assert counts == fieldgate_db.readings
    # Numbers are right-aligned: every row ends in the same column.
    assert len({len(r) for r in rows}) == 1


def test_statement_as_csv_has_every_point_with_its_time(url: list[str],
                                                        fieldgate_db: Filled) -> None:  # noqa: F811
    out = ok("SELECT temp, hum FROM telemetry WHERE device = 'gh-2'", *url, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = fieldgate_db.series[("gh-2", "temp")]
    assert [(r["time"], float(r["temp"])) for r in rows] == \
        [(format_time(ts), value) for ts, value in expected]
    assert [float(r["hum"]) for r in rows] == [v for _, v in fieldgate_db.series[("gh-2", "hum")]]


def test_statement_as_json_is_rows_of_objects(url: list[str], fieldgate_db: Filled) -> None:  # noqa: F811
    out = ok('SELECT summary, value FROM events WHERE "rule" = \'TooHot\'', *url,
             "--format", "json")
    rows = json.loads(out)
    expected = [e for e in fieldgate_db.events if e["rule"] == "TooHot"]
    assert [(r["time"], r["summary"], r["value"]) for r in rows] == \
        [(format_time(e["time"]), e["summary"], e["value"]) for e in expected]


def test_options_may_come_before_the_question(url: list[str], fieldgate_db: Filled) -> None:  # noqa: F811
    out = ok(*url, "last", "--device", "gh-4", "--format", "json")
    assert {r["device"] for r in json.loads(out)} == {"gh-4"}
    out = ok(*url, "--format", "csv", "SHOW MEASUREMENTS")
    assert out.splitlines() == ["name", "events", "fieldgate", "telemetry"]
    assert fails("sql", "last", *url, code=2) == \
        "error: 'last' is a question, not InfluxQL: run gateway query last -c FILE ..."


# --- canned questions -----------------------------------------------------------------------

def test_last_shows_the_latest_value_of_each_metric_per_device(url: list[str],
                                                              fieldgate_db: Filled) -> None:  # noqa: F811
    rows = json.loads(ok("last", *url, "--format", "json"))
    got = {(r["device"], r["metric"]): r["value"] for r in rows}
    want = {(d, m): v for d, values in fieldgate_db.last.items() for m, v in values.items()}
    assert got == want
    for row in rows:
        assert row["time"] == format_time(fieldgate_db.end_ms)
        assert row["age"].endswith(("s", "m"))  # written seconds to a minute or so ago
    table = ok("last", *url, "--gateway", "gh-site-2")
    assert table.splitlines()[0].split() == ["gateway", "device", "metric", "value", "time",
                                             "age"]
    assert {line.split()[1] for line in table.splitlines()[2:]} == {"gh-4"}


def test_last_of_an_unknown_device_names_the_known_ones(url: list[str]) -> None:
    line = fails("last", *url, "--device", "gh-99")
    assert line == "error: no device 'gh-99' in 'telemetry' (devices: gh-1, gh-2, gh-3, gh-4)"


def test_alerts_lists_fired_and_resolved_oldest_first(url: list[str]) -> None:
    out = ok("alerts", *url, "--since", "24h")
    lines = out.splitlines()
    assert lines[0].split() == ["time", "event", "gateway", "device", "rule", "severity",
                                "value", "summary"]
    assert [line.split()[1] for line in lines[2:-1]] == ["alert.fired", "alert.resolved"]
    assert "32.1" in lines[2] and "gh-1 too hot" in lines[2]
    assert lines[-1] == "2 event(s)"
    every = json.loads(ok("alerts", *url, "--all", "--format", "json"))
    assert [r["event"] for r in every] == ["device.offline", "alert.fired", "command.issued",
                                           "alert.resolved"]
    newest = json.loads(ok("alerts", *url, "--all", "--limit", "1", "--format", "json"))
    assert [r["event"] for r in newest] == ["alert.resolved"]


def test_alerts_in_a_quiet_window_say_so(url: list[str]) -> None:
    assert fails("alerts", *url, "--since", "10m") == "error: no alerts in the last 10m"
    assert fails("alerts", *url, "--device", "gh-2") == \
        "error: no alerts in the last 1d for device 'gh-2'"


def test_series_draws_a_chart_with_the_alert_in_the_terminal(url: list[str],
                                                            fieldgate_db: Filled) -> None:  # noqa: F811
    out = ok("series", *url, "--device", "gh-1", "--metric", "temp", "--since", "6h")
    lines = out.splitlines()
    assert "gh-1 temp, last 6h (mean per 2m, UTC)" in lines[0]
    assert "\x1b[" not in out  # not a terminal here: no colour codes in a file or a pipe
    # The y axis spans the readings: its top label is near the hot spell's peak.
    labels = [float(line.split("┤")[0]) for line in lines if "┤" in line]
    peak = max(v for _, v in fieldgate_db.series[("gh-1", "temp")])
    assert max(labels) > 30 and abs(max(labels) - peak) < 2
    assert any(ch in out for ch in "⠁⠂⠄⡀⢀⠈⠐⠠")  # braille dots: the line is drawn
    assert lines[-1].startswith("alerts: alert.fired ") and "alert.resolved" in lines[-1]


def test_series_points_are_means_per_step(url: list[str], fieldgate_db: Filled) -> None:  # noqa: F811
    out = ok("series", *url, "--device", "gh-3", "--metric", "hum", "--since", "2h",
             "--every", "5m", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    points = fieldgate_db.series[("gh-3", "hum")]
    starts = [int(datetime.fromisoformat(row["time"]).timestamp() * 1000) for row in rows]
    for start, row in zip(starts[1:], rows[1:], strict=True):  # "now() - 2h" cuts the first
        inside = [v for ts, v in points if start <= ts < start + 300_000]
        assert float(row["hum"]) == pytest.approx(sum(inside) / len(inside))
    # One point per 5 minutes that holds readings: none for gh-3's 20 offline minutes.
    assert starts[1:] == sorted({ts // 300_000 * 300_000 for ts, _ in points if ts >= starts[1]})
    assert 20 <= len(rows) <= 25


def test_series_to_png(url: list[str], tmp_path: Path) -> None:
    # matplotlib is in the dev extra (the `plot` extra for users), so always here.
    png = tmp_path / "temp.png"
    out = ok("series", *url, "--device", "gh-1", "--metric", "temp", "--png", str(png))
    assert out.startswith(f"wrote {png} (")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 400)


def test_png_without_matplotlib_is_one_line_with_the_extra_to_install(
        influxd: InfluxD, fieldgate_db: Filled, tmp_path: Path) -> None:  # noqa: F811
    png = tmp_path / "x.png"
    # A None entry in sys.modules makes `import matplotlib` fail as if it were not installed.
    code = ("import sys; sys.modules['matplotlib'] = None; from gateway.cli import main; "
            "main()")
    out = subprocess.run(
        [sys.executable, "-c", code, "query", "series", "--url", influxd.url, "--device",
         "gh-1", "--metric", "temp", "--png", str(png)], cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: --png needs matplotlib: pip install 'fieldgate[plot]' "
                                  "(the terminal chart needs nothing more; leave out --png)")
    assert not png.exists()


def test_series_of_unknown_metric_device_or_window(url: list[str]) -> None:
    assert fails("series", *url, "--device", "gh-1", "--metric", "tmp") == \
        "error: no metric 'tmp' in 'telemetry' (metrics: hum, soil, temp)"
    assert fails("series", *url, "--device", "gh-9", "--metric", "temp").startswith(
        "error: no device 'gh-9' in 'telemetry'")
    line = fails("series", *url, "--device", "gh-1", "--metric", "temp", "--since", "1s")
    assert line.startswith("error: no temp readings from gh-1 in the last 1s (latest at ")


# --- errors ---------------------------------------------------------------------------------

def test_server_down_is_one_line() -> None:
    port = free_port()
    line = fails("last", "--url", f"http://127.0.0.1:{port}")
    assert line == (f"error: cannot reach InfluxDB at http://127.0.0.1:{port} (Connection "
                    f"refused); is influxd running? check influx.url or --url")


SECRET_URLS = ["http://127.0.0.1:1/pre?u=admin&p=SECRETPW4#frag",
               "http://127.0.0.1:1/?token=SECRETPW4", "http://127.0.0.1:1#SECRETPW4",
               "http://admin:SECRETPW4@127.0.0.1:1/pre", "ftp://127.0.0.1:1/?p=SECRETPW4"]


@pytest.mark.parametrize("secret_url", SECRET_URLS)
def test_a_secret_in_the_url_is_refused_and_never_printed(tmp_path: Path,
                                                          secret_url: str) -> None:
    line = fails("last", "--url", secret_url, code=2)
    assert line.startswith("error: influx.url: ")
    assert "SECRETPW4" not in line and "admin" not in line
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"gateway_id": "gw-1", "influx": {"url": secret_url}}))
    line = fails("last", "-c", str(cfg), code=2)
    assert line.startswith(f"{cfg}: influx.url: ")
    assert "SECRETPW4" not in line and "admin" not in line


def test_error_lines_name_the_server_without_userinfo_or_query() -> None:
    from gateway.query.client import InfluxConnection

    # A connection made in code, past the checks that refuse such URLs.
    conn = InfluxConnection(url="http://127.0.0.1:1")
    object.__setattr__(conn, "url", f"http://admin:SECRETPW4@127.0.0.1:{free_port()}/pre"
                                    "?p=SECRETPW4#frag")
    assert "SECRETPW4" not in repr(conn)
    with pytest.raises(QueryError) as info:
        InfluxQLClient(conn).query("SHOW DATABASES")
    assert "cannot reach InfluxDB at http://127.0.0.1:" in str(info.value)
    assert "/pre (" in str(info.value)
    assert "SECRETPW4" not in str(info.value) and "admin" not in str(info.value)


def test_bad_influxql_is_the_servers_reason(url: list[str]) -> None:
    line = fails("SELEC temp FROM telemetry", *url)
    assert line.startswith("error: InfluxDB rejected the query: error parsing query: found "
                           "SELEC, expected SELECT")


def test_unknown_measurement_names_the_ones_there(url: list[str]) -> None:
    assert fails('SELECT * FROM "fieldgate"."autogen"."telemtry"', *url) == (
        "error: no measurement 'telemtry' in database 'fieldgate' (it has: events, fieldgate, "
        "telemetry); is the gateway's influx sink writing to this database?")


def test_no_data_is_an_error(url: list[str]) -> None:
    assert fails("SELECT temp FROM telemetry WHERE device = 'nobody'", *url) == \
        "error: no data: the query matched nothing (check the time range and the WHERE clause)"


def test_unknown_database(influxd: InfluxD, fieldgate_db: Filled) -> None:  # noqa: F811
    line = fails("last", "--url", influxd.url, "--db", "nodb")
    assert line.startswith(f"error: InfluxDB at {influxd.url}: database not found: nodb; "
                           f"check influx.database / --db (databases: ")
    assert "fieldgate" in line


def test_a_measurement_never_written_says_so(influxd: InfluxD) -> None:  # noqa: F811
    influxd.create_database("empty")
    assert fails("alerts", "--url", influxd.url, "--db", "empty") == (
        "error: no measurement 'events' in database 'empty' (it has: none); is the gateway's "
        "influx sink writing to this database?")


def test_bad_arguments_exit_2(url: list[str]) -> None:
    assert fails("alerts", *url, "--since", "yesterday", code=2).startswith(
        "error: --since: 'yesterday' is not a duration")
    assert fails("last", "--url", "ftp://x", code=2).startswith("error: influx.url: 'ftp://x'")


# --- credentials ----------------------------------------------------------------------------

@pytest.fixture
def secured(tmp_path: Path) -> Iterator[InfluxD]:
    server = InfluxD(tmp_path / "secured", auth=True).start()
    server.query("CREATE USER admin WITH PASSWORD 's3cret' WITH ALL PRIVILEGES")
    server.query('CREATE DATABASE "fieldgate"', auth=("admin", "s3cret"))
    yield server
    server.stop()


def test_user_and_password_file_against_an_auth_enabled_server(secured: InfluxD,
                                                               tmp_path: Path) -> None:
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text("s3cret\n")
    bad.write_text("wrong-password\n")
    out = ok("--url", secured.url, "--username", "admin", "--password-file", str(good),
             "--format", "csv", "SHOW DATABASES")
    assert "fieldgate" in out.splitlines()
    line = fails("--url", secured.url, "--username", "admin", "--password-file", str(bad),
                 "SHOW DATABASES")
    assert line.startswith(f"error: InfluxDB at {secured.url} refused the credentials "
                           f"(HTTP 401: authorization failed)")
    assert "wrong-password" not in line
    line = fails("--url", secured.url, "SHOW DATABASES")
    assert "refused the credentials (HTTP 401" in line


def test_a_missing_password_file_names_it(tmp_path: Path) -> None:
    line = fails("last", "--url", "http://127.0.0.1:1", "--username", "u", "--password-file",
                 str(tmp_path / "nope.pw"), code=2)
    assert line.startswith(f"error: cannot read InfluxDB password from "
                           f"'{tmp_path / 'nope.pw'}'")


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records the request and answers as InfluxDB does with an empty result."""

    seen: list[tuple[str, dict[str, str]]] = []  # noqa: RUF012

    def do_GET(self) -> None:
        type(self).seen.append((self.path, dict(self.headers)))
        body = b'{"results":[{"statement_id":0,"series":[{"name":"databases","columns":' \
               b'["name"],"values":[["fieldgate"]]}]}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_v2_token_goes_in_the_authorization_header_never_the_url(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    # InfluxDB 2.x/3.x cannot run here: a recording HTTP server shows what is sent.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("INFLUX_TOKEN", "tok-123")
        conn = connection_from(SimpleNamespace(  # the sink's model: database has a default
            url=f"http://127.0.0.1:{server.server_address[1]}", api="v2", database="fieldgate",
            bucket="farm", token_file=None, token_env="INFLUX_TOKEN", timeout=5.0))
        assert conn.database == "farm"
        assert "tok-123" not in repr(conn)
        InfluxQLClient(conn).query("SHOW DATABASES")
        path, headers = _Recorder.seen[-1]
        assert headers["Authorization"] == "Token tok-123"
        assert "tok-123" not in path and "db=farm" in path
    finally:
        server.shutdown()
        server.server_close()


def test_connection_from_the_influx_section_shapes(tmp_path: Path) -> None:
    pw = tmp_path / "influx.pw"
    pw.write_text("pw\n")
    conn = connection_from({"url": "http://db:8086/", "api": "v1", "database": "farm",
                            "retention_policy": "week", "username": "gw",
                            "password_file": str(pw), "verify": False, "timeout": 2})
    assert (conn.url, conn.database, conn.retention_policy, conn.username, conn.password,
            conn.verify, conn.timeout) == ("http://db:8086", "farm", "week", "gw", "pw", False,
                                           2.0)
    with pytest.raises(ConfigError, match=r"influx\.api: 'v3' must be v1"):
        connection_from({"url": "http://db:8086", "api": "v3"})
    with pytest.raises(ConfigError, match="credentials in the URL"):
        connection_from({"url": "http://u:p@db:8086"})
    with pytest.raises(SecretError, match="INFLUX_NOPE"):
        connection_from({"url": "http://db:8086", "token_env": "INFLUX_NOPE"})


def test_config_without_an_influx_section_says_what_to_add(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"gateway_id": "gw-1"}))
    assert fails("last", "-c", str(cfg), code=2) == (
        "error: no influx section in gateway.yaml; add one (see gateway config sample), "
        "or give --url")


def test_config_influx_section_is_used(influxd: InfluxD, fieldgate_db: Filled,  # noqa: F811
                                       tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"gateway_id": "gw-1", "influx": {
        "url": influxd.url, "api": "v1", "database": fieldgate_db.db}}))
    rows = json.loads(ok("last", "-c", str(cfg), "--format", "json"))
    assert {r["device"] for r in rows} == set(fieldgate_db.readings)


# --- pieces ---------------------------------------------------------------------------------

def test_measurement_names_after_from() -> None:
    assert _measurements_named('SELECT * FROM "db"."rp"."my \\"m\\""') == ['my "m"']
    assert _measurements_named("select x from telemetry where a = 1") == ["telemetry"]
    assert _measurements_named("SELECT * FROM fieldgate..events") == ["events"]
    assert _measurements_named("SHOW DATABASES") == []


def test_literals_are_escaped(url: list[str]) -> None:
    assert quote_literal("it's\\") == "'it\\'s\\\\'"
    assert fails("last", *url, "--device", "x' OR device='gh-1").startswith(
        "error: no device \"x' OR device='gh-1\"")


def test_step_gives_about_240_points() -> None:
    assert step_for(6 * 3600) == 120
    assert step_for(60) == 1
    assert step_for(30 * 86400) == 10800
    assert step_for(365 * 86400) == 86400


def test_a_configured_measurement_name_is_queried(influxd: InfluxD) -> None:  # noqa: F811
    # influx.measurement renames `telemetry`; the canned questions follow it.
    influxd.create_database("renamed")
    influxd.write("renamed", ["readings,gateway=g,device=d7 temp=4.5 1700000000000"])
    conn = connection_from({"url": influxd.url, "database": "renamed",
                            "measurement": "readings"})
    table = last(InfluxQLClient(conn), now=1700000060)
    assert table.rows == (("g", "d7", "temp", 4.5, 1700000000000, "1m"),)
