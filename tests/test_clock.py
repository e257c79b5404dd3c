"""A gateway whose clock is not synchronised (a Pi without RTC before NTP) keeps readings."""

from __future__ import annotations

import logging

import pytest

from gateway.clock import NOT_BEFORE, ClockCheck, ClockState, kernel_synchronised
from gateway.config import GatewayConfig, Ingest
from gateway.ingest.decode import CLOCK_FLAG, DeadLetter, Decoder, Reason
from gateway.ingest.topics import TopicTemplates

REAL = 1_800_000_000.0          # what the devices' clocks say (right)
BOOTED = REAL - 3 * 86400       # the gateway's clock: restored from the last shutdown


class FakeKernel:
    """The kernel's NTP flag, as adjtimex would report it."""

    def __init__(self) -> None:
        self.synced = False

    def __call__(self) -> bool:
        return self.synced


def _decoder(clock: ClockState) -> Decoder:
    cfg = GatewayConfig(gateway_id="t")
    return Decoder(Ingest(), TopicTemplates(cfg.subscriptions), clock=clock)


def test_readings_are_kept_and_flagged_until_ntp_syncs(caplog):
    kernel = FakeKernel()
    decoder = _decoder(ClockState(ClockCheck.AUTO, kernel=kernel, service=lambda: True))
    caplog.set_level(logging.INFO, "gateway")
    # A device with a good clock looks 3 days in the future: kept, with its own ts.
    out = decoder.decode("sensors/d/telemetry", f'{{"ts": {REAL}, "t": 1}}'.encode(), BOOTED)
    assert out == [("d", REAL, {"t": 1, CLOCK_FLAG: 1})]
    # No ts: our (doubtful) receive time, flagged.
    out = decoder.decode("sensors/d/t", b"2", BOOTED + 5)
    assert out == [("d", BOOTED + 5, {"t": 2, CLOCK_FLAG: 1})]
    # Still absurd timestamps are rejected.
    out = decoder.decode("sensors/d/telemetry", b'{"ts": 1000, "t": 1}', BOOTED + 6)
    assert isinstance(out, DeadLetter) and out.reason is Reason.TS_OUT_OF_RANGE
    warnings = [r for r in caplog.records if "not synchronised" in r.getMessage()]
    assert len(warnings) == 1, "said once"
    assert warnings[0].levelno == logging.WARNING

    kernel.synced = True            # NTP steps the clock and clears STA_UNSYNC
    out = decoder.decode("sensors/d/telemetry", f'{{"ts": {REAL}, "t": 1}}'.encode(), REAL + 1)
    assert out == [("d", REAL, {"t": 1})]
    out = decoder.decode("sensors/d/telemetry", f'{{"ts": {REAL + 86400}, "t": 1}}'.encode(),
                         REAL + 2)
    assert isinstance(out, DeadLetter) and out.reason is Reason.TS_OUT_OF_RANGE
    assert any("synchronised: readings are checked" in r.getMessage() for r in caplog.records)


def test_a_clock_before_this_release_is_unsynchronised_without_asking_the_kernel():
    clock = ClockState(ClockCheck.AUTO, kernel=lambda: True, service=lambda: False)
    assert clock.check(NOT_BEFORE - 86400) is False
    assert clock.check(NOT_BEFORE + 86400) is True


def test_the_kernel_flag_counts_only_where_a_time_sync_service_runs():
    # A VM or container without NTP reports "unsynchronised" forever; auto ignores that.
    assert ClockState(ClockCheck.AUTO, kernel=lambda: False, service=lambda: False).check(REAL)
    assert not ClockState(ClockCheck.AUTO, kernel=lambda: False, service=lambda: True).check(REAL)
    assert not ClockState(ClockCheck.KERNEL, kernel=lambda: False,
                          service=lambda: False).check(REAL)
    off = ClockState(ClockCheck.OFF, kernel=lambda: False, service=lambda: True)
    assert off.check(0.0)


def test_the_real_kernel_answers_on_linux():
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("adjtimex is Linux")
    assert kernel_synchronised() in (True, False)


def test_the_systemd_unit_starts_after_time_sync():
    from pathlib import Path

    unit = (Path(__file__).resolve().parents[1] / "deploy" / "fieldgate.service").read_text()
    lines = unit.splitlines()
    assert any(line.startswith("After=") and "time-sync.target" in line for line in lines)
    assert any(line.startswith("Wants=") and "time-sync.target" in line for line in lines)
