from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings

from gateway.mosquitto import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[1]

# What `gateway run` logs once its site subscriptions are acknowledged (SUBACK).
READY = "Ready: site subscriptions in place"


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


class GatewayProcess:
    """`gateway run` as a real process, with a config written for the test's brokers."""

    def __init__(self, tmp_path: Path, site: Mosquitto, cloud: Mosquitto | None, /,
                 **overrides: Any) -> None:
        self.gateway_id = overrides.pop("gateway_id", "gw-test")
        self.metrics_port = free_port()
        cfg: dict[str, Any] = {
            "gateway_id": self.gateway_id,
            "site": {"url": site.url},
            "log": {"path": str(tmp_path / "log.db")},
            "uplink": {"batch_max_delay": "50ms", "backoff_min": "200ms", "backoff_max": "1s"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        if cloud is not None:
            cfg["cloud"] = {"url": cloud.url}
        for section, values in overrides.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.stderr = tmp_path / "gateway.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready_before = 0
        # Substrings of ERROR lines this test provokes on purpose; any other ERROR line or
        # traceback in the process's stderr fails the test at teardown.
        self.expected_errors: list[str] = []

    def expect_error(self, text: str) -> GatewayProcess:
        self.expected_errors.append(text)
        return self

    def unexpected_errors(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if (" ERROR " in line or line.startswith("Traceback"))
                and not any(text in line for text in self.expected_errors)]

    def launch(self) -> GatewayProcess:
        """Start the process without waiting for it to connect."""
        self._ready_before = self.log().count(READY)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.stderr.open("ab"),
        )
        return self

    def start(self) -> GatewayProcess:
        return self.launch().wait_ready()

    def wait_ready(self) -> GatewayProcess:
        assert self.proc is not None
        # Ready when the gateway says so: it logs READY once the site broker acknowledged
        # every subscription (SUBACK). Polled often; the bound only catches a hang.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log()}")
            if self.log().count(READY) > self._ready_before:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"gateway did not get ready: {self.log()}")

    def metric(self, name: str) -> float | None:
        import urllib.request

        text = ""
        for _ in range(3):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                            timeout=5) as resp:
                    text = resp.read().decode()
                    break
            except OSError:
                if self.proc is None or self.proc.poll() is not None:
                    return None
                time.sleep(0.2)
        for line in text.splitlines():
            if line.startswith(name + " ") or (line.startswith(name + "{") and name.endswith("}")):
                return float(line.rsplit(" ", 1)[1])
            if line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
        return None

    def log(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


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
