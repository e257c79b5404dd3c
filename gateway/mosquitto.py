"""Mosquitto processes on free loopback ports, for `gateway demo`, the tests and bench/."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.errors import FieldgateError


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if found is None:
        raise FieldgateError("Mosquitto is not installed; on Debian or Raspberry Pi OS run: "
                             "sudo apt-get install -y mosquitto")
    return found


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


def adapt_config(text: str, *, port: int, directory: Path,
                 files: dict[str, Path] | None = None) -> str:
    """A deployment config (e.g. deploy/mosquitto-site.conf) made runnable here, every
    other line as written: the listener on ``port`` on loopback, persistence in
    ``directory``, the settings named in ``files`` (password_file, acl_file) pointing at
    those paths, and the process's own user (see CONF)."""
    files = files or {}
    lines = []
    for line in text.splitlines():
        word = line.split(" ", 1)[0]
        if word == "listener":
            lines.append(f"listener {port} 127.0.0.1")
        elif word == "persistence_location":
            lines.append(f"persistence_location {directory}/")
        elif word in files:
            lines.append(f"{word} {files[word]}")
        else:
            lines.append(line)
    lines += [f"user {getpass.getuser()}", f"log_dest file {directory / 'mosquitto.log'}",
              "log_type error", "log_type warning", "log_type notice", ""]
    return "\n".join(lines)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, and never one this process handed out before:
    the kernel may give the same free port to two calls in a row (influxd takes two, and
    failed with "address already in use" when they were equal)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port



def end_process(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM a server we started, SIGKILL it if it is not gone within ``grace`` s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

class Mosquitto:
    """A Mosquitto process that a test can stop and start again on the same port.

    ``tls`` is (ca, cert, key) for an mqtts listener; ``users`` turns off anonymous access
    and writes a password file with those users. ``config`` runs a deployment config
    instead of ours, with ``files`` in place of the paths it names (see adapt_config).
    """

    def __init__(self, workdir: Path, name: str, *, tls: tuple[Path, Path, Path] | None = None,
                 users: dict[str, str] | None = None, extra: str = "",
                 config: str | None = None, files: dict[str, Path] | None = None) -> None:
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.tls = tls is not None
        if config is not None:
            conf = adapt_config(config, port=self.port, directory=self.dir, files=files)
        else:
            conf = CONF.format(port=self.port, log=self.dir / "mosquitto.log", dir=self.dir,
                               user=getpass.getuser())
        if tls is not None:
            ca, cert, key = tls
            conf += f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        if users:
            passwd = self.dir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            passwd.chmod(0o600)
            tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            subprocess.run([tool, "-U", str(passwd)], check=True)
            conf = conf.replace("allow_anonymous true", "allow_anonymous false")
            conf += f"password_file {passwd}\n"
        self.conf.write_text(conf + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    log = (self.dir / "mosquitto.log").read_text()
                    raise FieldgateError(f"Mosquitto exited at start: {log}") from None
                time.sleep(0.02)
        raise FieldgateError(f"Mosquitto on port {self.port} did not start within 10 s")

    def stop(self) -> None:
        end_process(self.proc, 5)
        self.proc = None
