"""The devices this gateway has heard from: a cloud command to any other is refused as
``unknown device`` (a typo in a device id should not wait a whole ttl to expire).

A device is known once a reading of it is durable in the log, or once it answered a
command. The set is saved with the log (at most every ``_SAVE_EVERY`` seconds when it grew,
and at shutdown), so a restart still knows an actuator that reports rarely. Bounded by
``engine.max_devices``. This is not a security boundary (a site publisher can make a
device id known by publishing for it); ``downlink.allow`` and the device keys are.
"""

from __future__ import annotations

import orjson

from gateway.records import Reading

STATE_NAME = "devices"
_SAVE_EVERY = 5.0


class KnownDevices:
    def __init__(self, limit: int, saved: bytes | None = None) -> None:
        self._limit = limit
        self._devices: set[str] = set()
        if saved is not None:
            try:
                self._devices = {str(d) for d in orjson.loads(saved)}
            except (ValueError, TypeError):
                self._devices = set()
        self._dirty = False
        self._saved_at = 0.0

    def __contains__(self, device: str) -> bool:
        return device in self._devices

    def seen(self, readings: list[Reading]) -> None:
        """A durable batch of readings (the ingest side's hand-off)."""
        devices = {r[0] for r in readings}
        if not devices <= self._devices:
            for device in devices - self._devices:
                self.add(device)

    def add(self, device: str) -> None:
        if device not in self._devices and len(self._devices) < self._limit:
            self._devices.add(device)
            self._dirty = True

    def due(self, now: float) -> bool:
        """True when the set grew and was not saved for ``_SAVE_EVERY`` seconds."""
        return self._dirty and now - self._saved_at >= _SAVE_EVERY

    def state(self, now: float) -> tuple[str, bytes]:
        self._dirty = False
        self._saved_at = now
        return STATE_NAME, orjson.dumps(sorted(self._devices))
