"""The records that cross between ingest, the engine, the log and the sinks, defined once.

Plain types with no behaviour and no imports from the rest of the gateway, so every part
can use them without depending on another part:

- ``Reading`` — one device's metrics at one time (ingest -> log, engine);
- ``DeadLetter`` with its ``Reason`` — why a site message was refused (ingest -> log);
- ``Event`` — a fat event before the log gives it a sequence number (engine, commands ->
  log; rendered as CloudEvents by ``gateway.events``);
- ``BatchState`` — where a batch a sink sent stands until its destination answered.

``Reading`` stays a plain tuple: readings are made at 100k+ a second and a tuple is the
cheapest record Python has (a NamedTuple or a slotted dataclass costs a call per reading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

# device, ts (epoch seconds), {metric: int or float; booleans arrive as 1 and 0}
Reading = tuple[str, float, dict[str, Any]]


class Reason(StrEnum):
    """Why a message went to the dead-letter table."""

    UNKNOWN_TOPIC = "unknown_topic"
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    NON_FINITE = "non_finite"
    BAD_SHAPE = "bad_shape"
    TOO_MANY_READINGS = "too_many_readings"
    TOO_MANY_METRICS = "too_many_metrics"
    NO_METRICS = "no_metrics"
    WRONG_TYPE = "wrong_type"
    BAD_NAME = "bad_name"
    DUPLICATE_KEY = "duplicate_key"
    BAD_DEVICE = "bad_device"
    BAD_TIMESTAMP = "bad_timestamp"
    TS_OUT_OF_RANGE = "ts_out_of_range"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A site message refused whole, with why (kept in the dead-letter table)."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class Event:
    """A fat event before it is logged: the log gives it its sequence number and id."""

    type: str                     # e.g. io.fieldgate.alert.fired
    subject: str                  # the device
    time: float                   # epoch seconds of what happened
    data: dict[str, Any] = field(default_factory=dict)


class BatchState(IntEnum):
    """Where a batch a sink sent stands; the cursor moves over the settled prefix only."""

    REFUSED = -1      # the destination said no: sent again (or split) once the rest settles
    IN_FLIGHT = 0     # sent, no answer yet
    SETTLED = 1       # acknowledged, or dead-lettered for good
