"""The gateway process as the benches run it: the tests' ``GatewayProcess`` (tests/tools.py)
with the bench's accounting, and older checkouts to compare against."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from bench.harness.accounting import RssSampler, sys_cpu_seconds, vm_hwm_kib, write_bytes
from tests.tools import ROOT, GatewayProcess

GATEWAY_ID = "bench-gw"


class BenchGateway(GatewayProcess):
    """`gateway run` with the gateway's own defaults (a bench states every setting it
    changes), its RSS sampled every 100 ms from launch, and its exit reaped for
    ``ru_maxrss``."""

    DEFAULTS: ClassVar[dict[str, Any]] = {"gateway_id": GATEWAY_ID}

    def __init__(self, workdir: Path, site: Any, cloud: Any, /, **kwargs: Any) -> None:
        super().__init__(workdir, site, cloud, **kwargs)
        self.rss: RssSampler | None = None
        self.vm_hwm_kib: int | None = None

    def launch(self) -> BenchGateway:
        super().launch()
        self.rss = RssSampler(self.pid)
        return self

    def start_connected(self, *, cloud: bool) -> BenchGateway:
        """Launch, and return once /metrics says the site link (and the cloud link, if
        ``cloud``) is up, plus 0.3 s for the first subscriptions and batches to settle."""
        self.launch().wait_links("site", *(["cloud"] if cloud else []))
        time.sleep(0.3)
        return self

    def peak_rss(self) -> int:
        """Bytes: the highest RSS sampled since launch."""
        return self.rss.peak if self.rss else 0

    def sys_cpu(self) -> float:
        return sys_cpu_seconds(self.pid)

    def write_bytes(self) -> int:
        """Bytes this process sent to storage: the log's flash wear."""
        return write_bytes(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Stop and reap; a process that outlives ``timeout`` is killed (exit code -9)
        instead of raising, and the bench notes it."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.vm_hwm_kib = vm_hwm_kib(self.proc.pid)
        try:
            return super().stop(sig, timeout)
        except subprocess.TimeoutExpired:
            self.exit_code = -9
            return -9
        finally:
            if self.rss:
                self.rss.stop()

    def notes(self, label: str) -> list[str]:
        """The exit code unless 0, and each kind of warning or error line of its stderr,
        counted (timestamps and numbers left out)."""
        notes = []
        if self.exit_code not in (0, None):
            notes.append(f"gateway ({label}) exit code {self.exit_code}")
        seen: dict[str, int] = {}
        for ln in self.log().splitlines():
            if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback|Error:", ln):
                key = re.sub(r"^\S+ \S+ ", "", ln)       # without the timestamp
                key = re.sub(r"\d+", "N", key)[:140]
                seen[key] = seen.get(key, 0) + 1
        notes.extend(f"gateway ({label}) stderr x{n}: {key}" for key, n in seen.items())
        return notes


def checkout(ref: str, work: Path) -> Path:
    """The tree of git ``ref`` in ``work``/before, to run its gateway beside this one."""
    root = work / "before"
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root
