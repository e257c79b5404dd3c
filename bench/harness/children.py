"""Helper processes spawned with a pipe: the driver sends commands, the child answers
``(kind, value)`` tuples (``("error", traceback)`` when it failed)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from typing import Any

from bench.harness.accounting import cpu_seconds

# Spawned, not forked: a child starts clean, without the driver's threads and sockets.
CTX = mp.get_context("spawn")


class Child:
    """``target(conn, *args)`` in a spawned process; ``expect`` reads its next message."""

    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child_conn = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child_conn, *args), daemon=True)
        self.proc.start()
        self.pid: int = self.proc.pid  # type: ignore[assignment]

    def expect(self, what: str, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"helper {self.pid}: no {what!r} within {timeout}s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"helper {self.pid} exited (code {self.proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"helper {self.pid} failed:\n{value}")
        if kind != what:
            raise RuntimeError(f"helper {self.pid}: got {kind!r}, wanted {what!r}")
        return value

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                with contextlib.suppress(OSError):
                    self.conn.send("stop")
                self.proc.join(3)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(3)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(3)
        finally:
            self.conn.close()
