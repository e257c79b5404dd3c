"""A socket wrapper that turns many small reads and writes into a few large ones.

paho-mqtt reads each packet with two or three ``recv`` calls and writes each packet (every
PUBACK too) with its own ``send``. At tens of thousands of messages a second those system
calls are most of the cost. ``CoalescingSocket`` sits between paho and the kernel: one
``recv`` fills a buffer that paho's small reads are served from, and paho's writes collect
in a buffer that the owner's loop flushes once per turn. paho sees an ordinary non-blocking
socket.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

# One fill reads at most this much; larger reads amortise system calls further but hold more
# unparsed bytes in memory at once.
READ_CHUNK = 256 * 1024
FILL_MAX = 1024 * 1024
# paho is told "would block" once this much is waiting to be written: backpressure instead of
# unbounded memory when the peer reads slowly.
WRITE_MAX = 4 * 1024 * 1024


class CoalescingSocket:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._eof = False
        self.error: str | None = None  # why the connection broke, when the kernel said
        self.saturated = False  # the last fill stopped at FILL_MAX: the kernel may hold more

    # -- reading --------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes read from the kernel and not yet consumed by paho."""
        return len(self._rbuf) - self._rpos

    @property
    def eof(self) -> bool:
        """The peer closed the connection (seen by the last fill)."""
        return self._eof

    def fill(self) -> None:
        """Read what the kernel has (bounded) into the buffer without blocking."""
        chunks = [self._rbuf[self._rpos:]] if self.buffered else []
        total = 0
        while total < FILL_MAX:
            try:
                data = self._sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as err:
                # Reset or broken: paho sees end-of-stream and reports the disconnect.
                self._eof = True
                self.error = err.strerror or str(err)
                break
            if not data:
                self._eof = True
                break
            chunks.append(data)
            total += len(data)
            if len(data) < READ_CHUNK and not isinstance(self._sock, ssl.SSLSocket):
                break
        self._rbuf = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        self._rpos = 0
        self.saturated = total >= FILL_MAX

    def recv(self, bufsize: int) -> bytes:
        # Served from the buffer only: the owner fills it once per wake-up, so one poll
        # handles a bounded amount of input and never spins on a busy socket.
        if not self.buffered:
            if self._eof:
                return b""
            raise BlockingIOError
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def pending(self) -> int:
        return self.buffered

    @property
    def buffer(self) -> tuple[bytes, int]:
        """The read buffer and the offset of the first unconsumed byte."""
        return self._rbuf, self._rpos

    def consume(self, end: int) -> None:
        """Mark the buffer consumed up to ``end`` (a packet taken out by the link)."""
        self._rpos = end

    # -- writing --------------------------------------------------------------------------

    @property
    def wants_write(self) -> bool:
        return bool(self._wbuf)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if len(self._wbuf) >= WRITE_MAX:
            self.flush()
            if len(self._wbuf) >= WRITE_MAX:
                raise BlockingIOError
        self._wbuf += data
        return len(data)

    def flush(self) -> None:
        """Write out what paho queued, as far as the kernel takes it without blocking."""
        while self._wbuf:
            try:
                sent = self._sock.send(self._wbuf)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as err:
                self.error = err.strerror or str(err)
                raise
            del self._wbuf[:sent]

    # -- the rest is the socket's ---------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
