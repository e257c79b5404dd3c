"""One blocking InfluxDB write at a time on a thread of its own; the loop learns of the
result through a pipe its select watches, so a slow server never stops the loop from
reading, acknowledging or answering keepalives. Used by the edge influx sink and the cloud
ingest worker."""

from __future__ import annotations

import os
import threading

from gateway.influx.http import Writer, WriteResult


class WriteThread:
    def __init__(self, writer: Writer, name: str = "influx-write") -> None:
        self.writer = writer
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._cond = threading.Condition()
        self._job: bytes | None = None
        self._result: WriteResult | None = None
        self._closing = False
        self.busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def fd(self) -> int:
        return self._rfd

    def submit(self, body: bytes) -> None:
        assert not self.busy
        self.busy = True
        with self._cond:
            self._job = body
            self._cond.notify()

    def result(self) -> WriteResult | None:
        """The finished request's result, once (None while it runs or when idle)."""
        try:
            while os.read(self._rfd, 64):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            result, self._result = self._result, None
        if result is not None:
            self.busy = False
        return result

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                body, self._job = self._job, None
            assert body is not None
            result = self.writer.write(body)
            with self._cond:
                self._result = result
            os.write(self._wfd, b"!")

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.writer.close()  # else the process exits under the stuck request
        os.close(self._rfd)
        os.close(self._wfd)
