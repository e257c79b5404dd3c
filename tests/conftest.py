from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from gateway.mosquitto import Mosquitto

# The gateway-process helper lives in tests/tools.py, shared with bench/; these names stay
# importable from here (tests/test_dashboards.py, test_dlq.py, test_influx.py use them).
from tests.tools import READY, ROOT, GatewayProcess

__all__ = ["READY", "ROOT", "GatewayProcess"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, "site").start()
    yield broker
    broker.stop()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, "cloud").start()
    yield broker
    broker.stop()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    made: list[GatewayProcess] = []

    def make(site: Mosquitto, cloud: Mosquitto | None, /, **overrides: Any) -> GatewayProcess:
        gw = GatewayProcess(tmp_path, site, cloud, **overrides)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()
    unexpected = [line for gw in made for line in gw.unexpected_errors()]
    assert not unexpected, f"gateway logged errors the test did not expect: {unexpected}"


@pytest.fixture(autouse=True)
def _no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A test fails if our code logs an error the test did not expect (caplog.clear() it)."""
    yield
    errors = [r for r in caplog.get_records("call")
              if r.levelno >= logging.ERROR and r.name.startswith("gateway")]
    assert not errors, f"unexpected errors logged: {[r.getMessage() for r in errors]}"


os.environ.setdefault("PYTHONUNBUFFERED", "1")

# No deadlines: a loaded CI core or a Raspberry Pi runs examples several times slower, and
# speed is measured in bench/, not asserted here.
settings.register_profile("fieldgate", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fieldgate")
