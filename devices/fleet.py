"""Fleet files: which simulated devices exist, how their metrics behave, what can go wrong.

A fleet file is YAML, validated like the gateway's config: one line per problem naming the
field. Durations take ms/s/m/h/d.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from fieldkit.problems import validation_problems
from fieldkit.units import Duration


def state_name(value: object) -> object:
    """YAML 1.1 reads on/off/yes/no as booleans; an actuator state means the word."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    return value


State = Annotated[str, BeforeValidator(state_name)]


class FleetError(Exception):
    """A fleet file is invalid; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Effect(_Model):
    """How an actuator state moves a metric."""

    rate: float = Field(description="Change per minute while the actuator is in that state")
    relax: float = Field(0.1, ge=0, le=1,
                         description="Fraction per minute by which the effect fades once off")


class Metric(_Model):
    """A physical model: baseline + daily cycle + drift + random walk + noise + actuators."""

    baseline: float = 0.0
    noise: float = Field(0.0, ge=0, description="Standard deviation of white noise")
    daily_amplitude: float = Field(0.0, description="Half the day/night swing")
    peak_hour: float = Field(14.0, ge=0, lt=24, description="Hour of the daily maximum (UTC)")
    drift_per_hour: float = 0.0
    walk: float = Field(0.0, ge=0, description="Random-walk step (std) per reading")
    min: float | None = None
    max: float | None = None
    digits: int = Field(2, ge=0, le=9, description="Decimals published")
    counter: bool = Field(False, description="Monotonic counter (energy): adds |value| each step")
    effects: dict[str, dict[State, Effect]] = Field(
        default_factory=dict, description="actuator -> state -> effect"
    )


class Actuator(_Model):
    states: list[State] = Field(min_length=2)
    initial: State

    @model_validator(mode="after")
    def _initial_known(self) -> Actuator:
        if self.initial not in self.states:
            raise ValueError(f"initial {self.initial!r} is not one of {self.states}")
        return self


class PayloadFormat(StrEnum):
    JSON = "json"      # one object per message on sensors/{device}/telemetry
    ARRAY = "array"    # arrays of `batch` readings on sensors/{device}/telemetry
    NUMBER = "number"  # a bare number per metric on sensors/{device}/{metric}


class DeviceType(_Model):
    count: int = Field(1, ge=1, le=100_000)
    id: str = Field("{type}-{n}", description="Device id template: {type}, {n} (1-based)")
    labels: dict[str, str] = Field(default_factory=dict)
    interval: Duration = Field(5.0, gt=0, description="Time between readings")
    format: PayloadFormat = PayloadFormat.JSON
    batch: int = Field(1, ge=1, le=1000, description="Readings per message for format: array")
    qos: int = Field(1, ge=0, le=1)
    metrics: dict[str, Metric] = Field(min_length=1)
    actuators: dict[str, Actuator] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _effects_name_actuators(self) -> DeviceType:
        for name, metric in self.metrics.items():
            for actuator, states in metric.effects.items():
                if actuator not in self.actuators:
                    raise ValueError(f"metric {name!r}: effect of unknown actuator {actuator!r}")
                unknown = set(states) - set(self.actuators[actuator].states)
                if unknown:
                    raise ValueError(f"metric {name!r}: actuator {actuator!r} has no state "
                                     f"{sorted(unknown)}")
        return self


class FaultKind(StrEnum):
    SPIKE = "spike"          # one reading far off (value, or baseline x 10)
    STUCK = "stuck"          # the value stops changing for `duration`
    DROPOUT = "dropout"      # the device is silent for `duration`
    DRIFT = "drift"          # adds `value` per hour for `duration`
    BURST = "burst"          # `count` extra readings at once
    DUPLICATE = "duplicate"  # the same message published twice
    SKEW = "skew"            # timestamps off by `value` seconds for `duration`
    MALFORMED = "malformed"  # a payload the gateway must dead-letter (see `variant`)


class Malformed(StrEnum):
    BAD_JSON = "bad_json"
    NAN = "nan"
    WRONG_TYPE = "wrong_type"
    OVERSIZED = "oversized"
    BINARY = "binary"


class Fault(_Model):
    kind: FaultKind
    device: str | None = Field(None, description="Device id; all devices when left out")
    metric: str | None = None
    at: Duration | None = Field(None, description="When (since start); or use probability")
    probability: float | None = Field(None, gt=0, le=1, description="Per reading")
    duration: Duration = 0.0
    value: float | None = None
    count: int = Field(10, ge=1)
    variant: Malformed = Malformed.BAD_JSON

    @model_validator(mode="after")
    def _when(self) -> Fault:
        if (self.at is None) == (self.probability is None):
            raise ValueError("give exactly one of at or probability")
        if self.probability is not None and self.kind in (FaultKind.DRIFT, FaultKind.STUCK,
                                                          FaultKind.DROPOUT, FaultKind.SKEW):
            raise ValueError(f"{self.kind.value} lasts a while: give at and duration, "
                             "not probability")
        return self


class Fleet(_Model):
    seed: int = 1
    command_max_age: Duration = Field(30.0, gt=0, description="Older signed commands are stale")
    types: dict[str, DeviceType] = Field(min_length=1)
    faults: list[Fault] = Field(default_factory=list)


def parse_fleet(data: Any) -> Fleet:
    if not isinstance(data, dict):
        raise FleetError(["(top level): expected a mapping with `types:`"])
    try:
        return Fleet.model_validate(data)
    except ValidationError as err:
        raise FleetError(validation_problems(err)) from None


def load_fleet(path: Path) -> Fleet:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FleetError([f"cannot read the file ({err.strerror})"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise FleetError([f"{where}not valid YAML"]) from None
    return parse_fleet(data)
