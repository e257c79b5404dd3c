"""`gateway run` while it starts: a reload request (SIGHUP) must not kill it."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path


def _catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_sighup_during_start_up_does_not_kill_the_daemon(site, make_gateway, tmp_path):
    # Hold the log file locked so that start-up (opening the log) is slow, as on a Pi
    # with a big log or many rule files.
    db = tmp_path / "log.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    gw = make_gateway(site, None).launch()
    assert gw.proc is not None
    deadline = time.monotonic() + 4  # below the log's 5 s busy timeout
    while not _catches(gw.proc.pid, signal.SIGHUP) and time.monotonic() < deadline:
        assert gw.proc.poll() is None, gw.log()
        time.sleep(0.01)
    gw.proc.send_signal(signal.SIGHUP)   # `systemctl reload fieldgate` during start-up
    holder.execute("COMMIT")
    holder.close()
    deadline = time.monotonic() + 15
    while gw.metric('fieldgate_link_connected{link="site"}') != 1.0:
        assert gw.proc.poll() is None, f"gateway died: exit {gw.proc.returncode}\n{gw.log()}"
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)
    assert gw.stop() == 0, gw.log()
