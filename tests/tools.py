"""Processes the tests and the benches run: Debian tools found or reported, the gateway CLI
as a user runs it, and `gateway run` as a real process (``GatewayProcess``).

``GatewayProcess`` is the one gateway-process helper of the tree: the tests' fixtures
(tests/conftest.py) and every bench (bench/harness/gateway.py adds its accounting) start,
probe and stop the daemon through it. It lives here, beside tests/tsdb.py's servers, so that
imports run one way: bench -> tests, never tests -> bench.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest
import yaml

from gateway.events import render
from gateway.log.store import LogStore
from gateway.mosquitto import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[1]

# What `gateway run` logs once its site subscriptions are acknowledged (SUBACK).
READY = "Ready: site subscriptions in place"


def need(tool: str, package: str) -> str:
    """The path of a Debian tool a test needs. Missing: the test is skipped with the
    install line on a developer's machine, and fails in CI (CI=true), where .ci/run must
    have installed it, so that a missing install step cannot pass as a skip."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/bin:/usr/sbin")
    if found is None:
        why = f"{tool} is not installed: sudo apt-get install -y {package}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


def gateway(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`gateway ARGS` as a separate process, its output captured."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=env)


def merge_sections(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``overrides`` laid over it: a mapping updates its section, any other
    value replaces it."""
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = copy.deepcopy(values)
    return cfg


class GatewayProcess:
    """`python -m gateway run -c CONFIG` as a real process, with a config written for the
    given brokers: ``DEFAULTS``, then the keyword overrides (a mapping updates a section, any
    other value replaces it). ``src`` is the checkout to run (a bench may run an older one);
    ``name`` names the config and stderr files, for several gateways in one directory."""

    # The tests' gateways: batches leave within 50 ms (the tests wait less) and a cloud that
    # comes back is retried within a second. A bench subclass states its own.
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "gateway_id": "gw-test",
        "uplink": {"batch_max_delay": "50ms", "backoff_min": "200ms", "backoff_max": "1s"},
    }

    def __init__(self, workdir: Path, site: Mosquitto, cloud: Mosquitto | None, /, *,
                 src: Path = ROOT, name: str = "gateway", **overrides: Any) -> None:
        self.dir = workdir
        self.src = src
        self.metrics_port = free_port()
        cfg: dict[str, Any] = {
            "site": {"url": site.url},
            "log": {"path": str(workdir / "log.db")},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        if cloud is not None:
            cfg["cloud"] = {"url": cloud.url}
        merge_sections(cfg, self.DEFAULTS)
        merge_sections(cfg, overrides)
        self.cfg = cfg
        self.gateway_id: str = cfg["gateway_id"]
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.stderr = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        # Of the last stop(): the exit code and the process's peak RSS (wait4's ru_maxrss).
        self.exit_code: int | None = None
        self.ru_maxrss_kib: int | None = None
        self._ready_before = 0
        # Substrings of ERROR lines a test provokes on purpose; any other ERROR line or
        # traceback in the process's stderr fails the test at teardown.
        self.expected_errors: list[str] = []

    # -- start ------------------------------------------------------------------------------

    def launch(self) -> GatewayProcess:
        """Start the process without waiting for it to connect."""
        self._ready_before = self.log().count(READY)
        self.exit_code = self.ru_maxrss_kib = None
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
                cwd=self.src, stdout=subprocess.DEVNULL, stderr=err,
            )
        return self

    def start(self) -> GatewayProcess:
        return self.launch().wait_ready()

    def wait_ready(self, timeout: float = 60) -> GatewayProcess:
        """Until the gateway says it is ready: it logs READY once the site broker
        acknowledged every subscription (SUBACK). Polled often; the bound only catches a
        hang."""
        proc = self._running()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log()}")
            if self.log().count(READY) > self._ready_before:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"gateway did not get ready: {self.log()}")

    def wait_links(self, *links: str, timeout: float = 20) -> GatewayProcess:
        """Until /metrics says each of ``links`` ("site", "cloud") is connected."""
        proc = self._running()
        wanted = [f'fieldgate_link_connected{{link="{link}"}} 1.0' for link in links]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log()}")
            text = self.metrics_text()
            if text and all(w in text for w in wanted):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in {timeout:.0f} s:\n{self.log()}")

    # -- probe ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._running().pid

    def metrics_text(self, attempts: int = 1, timeout: float = 2) -> str:
        """The /metrics page; "" if it does not answer (``attempts`` times, 0.2 s apart,
        while the process lives)."""
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                            timeout=timeout) as resp:
                    return str(resp.read().decode())
            except OSError:
                if self.proc is None or self.proc.poll() is not None:
                    return ""
                if attempt + 1 < attempts:
                    time.sleep(0.2)
        return ""

    def metric(self, name: str, attempts: int = 3, timeout: float = 5) -> float | None:
        """One sample of /metrics by its full name, labels included
        (``fieldgate_link_connected{link="cloud"}``); None if absent or unreachable."""
        for line in self.metrics_text(attempts, timeout).splitlines():
            if line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
        return None

    def cpu(self) -> float:
        """CPU seconds (user + system) the process has used so far."""
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def expect_error(self, text: str) -> GatewayProcess:
        self.expected_errors.append(text)
        return self

    def unexpected_errors(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if (" ERROR " in line or line.startswith("Traceback"))
                and not any(text in line for text in self.expected_errors)]

    # -- stop -------------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process and reap it (recording its exit code and peak RSS); killed,
        and AssertionError with its log, if it is not gone within ``timeout`` (a graceful
        stop may take ~7 s of bounded waits: drain, PUBACKs, a round trip per link)."""
        proc = self._running()
        if proc.returncode is None and proc.poll() is None:
            proc.send_signal(sig)
            deadline = time.monotonic() + timeout
            pause = 0.001
            while proc.returncode is None:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    self.ru_maxrss_kib = usage.ru_maxrss
                elif time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"the gateway did not stop within {timeout:g} s of "
                                         f"signal {sig}; the end of its log:\n"
                                         f"{self.log()[-4000:]}")
                else:
                    time.sleep(pause)
                    pause = min(0.05, pause * 2)
        self.exit_code = proc.returncode
        return proc.returncode

    def kill(self) -> None:
        proc = self._running()
        proc.kill()
        self.exit_code = proc.wait()

    def _running(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the gateway process was not launched")
        return self.proc



def open_log(*args: Any, **kwargs: Any) -> LogStore:
    """A LogStore as the daemon opens it: events rendered as CloudEvents."""
    return LogStore(*args, event_body=render, **kwargs)
