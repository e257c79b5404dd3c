"""Is the system clock to be trusted? A Raspberry Pi has no real-time clock.

It boots with the time it had at its last shutdown (fake-hwclock, systemd-timesyncd) or with
1970, and is right only once NTP has synchronised it. Until then every device timestamp looks
like it comes from the future, and readings without one get a receive time in the past.

The decision (``ingest.clock_check``):

- ``auto`` (default): unsynchronised while the clock reads earlier than this release was
  made (certainly wrong), or while the kernel reports no NTP synchronisation (adjtimex(2):
  ``STA_UNSYNC`` / ``TIME_ERROR``) on a machine that runs a time-sync service
  (systemd-timesyncd, chrony or ntpd, found by their files). Without such a service the
  kernel flag means nothing (a VM or a container host that keeps time its own way), so it
  is not asked.
- ``kernel``: the kernel's flag alone (and the release date), for another sync daemon.
- ``off``: the clock is always trusted.

While unsynchronised, the decoder keeps readings that it would otherwise reject as
``ts_out_of_range`` and marks every reading with ``clock_unsynced: 1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

# This release was made after this instant (2026-11-01T00:00:00Z): a clock that reads
# earlier is certainly wrong. Raise it with each release; an old value only makes the
# check weaker, never wrong.
NOT_BEFORE = 1_793_491_200.0
# Device timestamps kept while the clock is unsynchronised must still be plausible: after
# this release minus ingest.max_past, and before 2100-01-01.
NOT_AFTER = 4_102_444_800.0
# How often the kernel is asked: a system call is cheap, but once a second is plenty to
# notice NTP's first synchronisation.
_RECHECK = 1.0
# Files that show a time-sync service is installed and has run on this machine.
SYNC_SERVICE_FILES = (
    Path("/run/systemd/timesync"), Path("/var/lib/systemd/timesync/clock"),  # timesyncd
    Path("/run/chrony"), Path("/var/lib/chrony"),                            # chrony
    Path("/run/ntpd.pid"), Path("/var/lib/ntp"), Path("/var/lib/ntpsec"),    # ntpd
)
_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class ClockCheck(StrEnum):
    AUTO = "auto"
    KERNEL = "kernel"
    OFF = "off"


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux): only ``status`` is read; the padding covers
    # the fields we do not name, so the kernel never writes past the buffer.
    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("rest", ctypes.c_long * 32),
    ]


def kernel_synchronised() -> bool | None:
    """The kernel's NTP status (adjtimex with no changes); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not timex.status & _STA_UNSYNC


def sync_service_present() -> bool:
    return any(path.exists() for path in SYNC_SERVICE_FILES)


class ClockState:
    """Tracks whether the system clock is synchronised; logs each change once."""

    def __init__(self, mode: ClockCheck, *,
                 kernel: Callable[[], bool | None] = kernel_synchronised,
                 service: Callable[[], bool] = sync_service_present) -> None:
        self._mode = mode
        self._kernel = kernel
        self._ask_kernel = mode is ClockCheck.KERNEL or (mode is ClockCheck.AUTO and service())
        self.synced = True
        self._checked_at = float("-inf")

    def check(self, now: float) -> bool:
        """True while the clock (reading ``now``) is to be trusted."""
        if self._checked_at <= now < self._checked_at + _RECHECK:
            return self.synced
        self._checked_at = now
        if self._mode is ClockCheck.OFF:
            return True
        why = ""
        if now < NOT_BEFORE:
            why = "it reads earlier than this release was made"
        elif self._ask_kernel and self._kernel() is False:
            why = "the kernel reports no NTP synchronisation"
        if why and self.synced:
            log.warning("System clock is not synchronised (%s): readings are kept, not checked "
                        "against it, and marked clock_unsynced; see ingest.clock_check", why)
        elif not why and not self.synced:
            log.info("System clock synchronised: readings are checked against it again")
        self.synced = not why
        return self.synced
