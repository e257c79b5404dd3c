"""``Run``: everything one scenario started, so that ``close`` stops it all, whatever
failed, and gathers what the processes warned about."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from bench.harness.children import Child
from bench.harness.gateway import BenchGateway
from gateway.mosquitto import Mosquitto

C = TypeVar("C", bound=Child)


class Run:
    def __init__(self, root: Path, name: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        self.children: list[Child] = []
        self.brokers: list[Mosquitto] = []
        self.gateways: list[BenchGateway] = []

    def broker(self, name: str, start: bool = True) -> Mosquitto:
        b = Mosquitto(self.dir, name)
        self.brokers.append(b)
        return b.start() if start else b

    def child(self, c: C) -> C:
        self.children.append(c)
        return c

    def gateway(self, site: Mosquitto, cloud: Mosquitto | None, *, name: str = "gw",
                **overrides: Any) -> BenchGateway:
        """A gateway in its own directory under the run's (not launched yet)."""
        gdir = self.dir / name
        gdir.mkdir()
        g = BenchGateway(gdir, site, cloud, **overrides)
        self.gateways.append(g)
        return g

    def close(self, notes: list[str]) -> None:
        for c in self.children:
            try:
                c.stop()
            except Exception as err:  # keep stopping the rest
                notes.append(f"stopping helper {c.pid}: {err}")
        for g in self.gateways:
            try:
                g.stop()
            except Exception as err:
                notes.append(f"stopping gateway: {err}")
            notes.extend(g.notes(g.dir.parent.name))
        for b in self.brokers:
            b.stop()
            notes.extend(broker_notes(b))


def broker_notes(b: Mosquitto) -> list[str]:
    """Mosquitto's warnings, errors and drops from its log."""
    log = b.dir / "mosquitto.log"
    if not log.exists():
        return []
    return [f"{b.dir.name} mosquitto: {line.strip()[:160]}"
            for line in log.read_text(errors="replace").splitlines()
            if re.search(r"warning|error|drop", line, re.I)]
