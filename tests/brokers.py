"""Real Mosquitto processes on free ports, for tests and benchmarks."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# Mosquitto's defaults drop messages under load (max_queued_messages 1000 per client): a
# broker in a test that counts every reading must not drop any. Persistence keeps sessions
# and queued messages across a graceful stop() / start(). Run as root, Mosquitto would
# switch to the "mosquitto" user, which cannot write our temporary directory.
CONF = """\
listener {port} 127.0.0.1
user {user}
allow_anonymous true
max_queued_messages 1000000
max_inflight_messages 0
persistence true
persistence_location {dir}/
log_dest file {log}
log_type error
log_type warning
log_type notice
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A Mosquitto process that a test can stop and start again on the same port."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(CONF.format(port=self.port, log=self.dir / "mosquitto.log",
                                         dir=self.dir, user=getpass.getuser()))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()}")
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
