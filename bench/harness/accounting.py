"""What a process costs: CPU, RSS and bytes written, read from /proc and psutil; and the
percentiles the benches report."""

from __future__ import annotations

import re
import resource
import threading
from pathlib import Path

import psutil


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def sys_cpu_seconds(pid: int) -> float:
    return float(psutil.Process(pid).cpu_times().system)


def rusage_cpu(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or its reaped children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int:
    """The process's resident set now."""
    return int(psutil.Process(pid).memory_info().rss)


def write_bytes(pid: int | str = "self") -> int:
    """Bytes the process sent to storage (/proc/<pid>/io): flash wear."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def vm_hwm_kib(pid: int) -> int | None:
    """The process's peak RSS as the kernel counts it (VmHWM), while it runs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) if m else None


class RssSampler:
    """Peak RSS of a process, sampled every 100 ms on a thread of the driver."""

    def __init__(self, pid: int) -> None:
        self.ps = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(1)
        return self.peak


def pct(samples: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``samples``; None for none."""
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]
