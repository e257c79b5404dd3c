"""Line protocol: our hand-written encoders against influxdb_client.Point (the oracle)."""

from __future__ import annotations

import math

import orjson
from hypothesis import example, given
from hypothesis import strategies as st
from influxdb_client import Point, WritePrecision

from fieldkit.units import Precision
from gateway.influx import lineproto
from gateway.influx.points import ReadingEncoder, event_line, field_name

# Text that stresses escaping: the line protocol's separators, quotes, backslashes, control
# characters and non-ASCII letters, mixed with ordinary ones.
_SPECIAL = [*' ,="\\\n\t\r', "é", "温", "🌡", "ß"]
text = st.text(alphabet=st.one_of(st.sampled_from(_SPECIAL), st.characters(
    codec="utf-8", exclude_categories=("Cs",))), max_size=12)
names = text.filter(lambda s: not s.startswith("#"))
finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(finite, st.floats(), st.integers(-(2**63), 2**64 - 1), st.booleans())


def _oracle(measurement: str, tags: dict[str, str], fields: dict[str, float | str],
            time: int) -> str:
    point = Point(measurement).time(time, WritePrecision.MS)
    for name, value in tags.items():
        point.tag(name, value)
    for name, value in fields.items():
        point.field(name, value)
    return str(point.to_line_protocol())


@given(measurement=names, tags=st.dictionaries(text, text, max_size=5),
       fields=st.dictionaries(text, st.one_of(st.floats(), text), max_size=5),
       time=st.integers(0, 2**62))
@example(measurement="tele metry,x", tags={"a b": "c,d", "e=f": "g\\"},
         fields={'q"uote': 'say "hi" \\ now', "n": 21.0}, time=1)
def test_line_matches_point(measurement, tags, fields, time):
    assert lineproto.line(measurement, tags, fields, time) == _oracle(measurement, tags,
                                                                      fields, time)


metric_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.\-]{0,12}\Z")


@given(device=text.filter(bool), labels=st.dictionaries(text, text, max_size=3),
       metrics=st.dictionaries(metric_names.filter(lambda n: n not in {"seq", "ts", "device"}),
                               numbers, min_size=1, max_size=6),
       ts=st.floats(0, 4e9), precision=st.sampled_from(list(Precision)))
@example(device="gh 1,a=b", labels={},
         metrics={"temp": 21, "on": True, "big": 2**60, "inf": math.inf},
         ts=1732600000.123, precision=Precision.MS)
def test_reading_encoder_matches_point(device, labels, metrics, ts, precision):
    encoder = ReadingEncoder(measurement_name="telemetry", gateway="gw 1", site="north,2",
                             device_labels={"*": labels}, precision=precision)
    # A reading as the log stores it (JSON), read back as the sink reads it.
    reading = orjson.loads(orjson.dumps({"seq": 7, "device": device, "ts": ts, **metrics}))
    time = lineproto.timestamp(ts, precision)
    tags = {**labels, "gateway": "gw 1", "site": "north,2", "device": device}
    fields = {field_name(k): float(v) for k, v in reading.items()
              if k in metrics and v is not None and math.isfinite(float(v))}
    expected = _oracle("telemetry", tags, dict(fields), time) if fields else ""
    assert encoder.encode(reading) == expected


def test_metric_names_influxdb_reserves_are_written_under_other_names():
    """InfluxDB 1.x drops a field named `time` silently; 2.x reserves names with `_`."""
    encoder = ReadingEncoder(measurement_name="telemetry", gateway="g", site="s",
                             device_labels={}, precision=Precision.S)
    line = encoder.encode({"seq": 1, "device": "d", "ts": 5.0, "time": 5, "_field": 1,
                           "x": 1})
    assert line == "telemetry,device=d,gateway=g,site=s m_field=1,time_=5,x=1 5"


def test_every_metric_is_a_float_field():
    encoder = ReadingEncoder(measurement_name="telemetry", gateway="g", site="s",
                             device_labels={}, precision=Precision.MS)
    line = encoder.encode({"seq": 1, "device": "d", "ts": 1.5, "temp": 21, "on": True,
                           "hum": 40.25})
    assert line == "telemetry,device=d,gateway=g,site=s hum=40.25,on=1,temp=21 1500"
    assert "i " not in line and "true" not in line


@given(ts=st.floats(0, 4e9))
def test_timestamps_are_stable_and_close(ts):
    for precision, unit in ((Precision.S, 1), (Precision.MS, 1e3), (Precision.US, 1e6),
                            (Precision.NS, 1e9)):
        value = lineproto.timestamp(ts, precision)
        assert value == lineproto.timestamp(float(repr(ts)), precision)
        assert abs(value / unit - ts) <= 0.5 / unit + 1e-6


def test_event_becomes_an_annotation_point():
    event = {"id": "gw-000000000042", "type": "io.fieldgate.alert.fired", "subject": "gh-1",
             "time": "2024-11-26T05:46:40.123Z",
             "data": {"rule": "TooHot", "severity": "warning", "value": 31.5,
                      "message": "gh-1 is\nhot: 31.5 °C"}}
    line = event_line(event, gateway="gw", site="north", precision=Precision.MS)
    assert line == ('events,device=gh-1,gateway=gw,rule=TooHot,severity=warning,site=north,'
                    'type=io.fieldgate.alert.fired id="gw-000000000042",'
                    'summary="gh-1 is hot: 31.5 °C",value=31.5 1732600000123')


# Readings as a batch holds them: a few devices, a few sets of metric names, values that
# take every path of the column encoder (floats of any size, exact and huge integers,
# bools, null), as JSON read back from the log.
batch_values = st.one_of(finite, st.integers(-(2**53) - 2, 2**53 + 2), st.booleans(),
                         st.none(), st.integers(-(2**63), 2**63 - 1),
                         st.sampled_from([0.0, -0.0, 1e-4, 9.99e-5, 1e-5, 1e16, 1e15, 21.0]))


@st.composite
def batches(draw: st.DrawFn) -> list[dict[str, object]]:
    devices = draw(st.lists(text.filter(bool), min_size=1, max_size=3))
    shapes = draw(st.lists(st.lists(metric_names.filter(
        lambda n: n not in {"seq", "ts", "device"}), min_size=0, max_size=4, unique=True),
        min_size=1, max_size=3))
    size = draw(st.integers(1, 40))
    readings = []
    for i in range(size):
        names = draw(st.sampled_from(shapes))
        metrics = {name: draw(batch_values) for name in names}
        if draw(st.booleans()):  # the same keys in another order
            metrics = dict(reversed(metrics.items()))
        readings.append({"seq": i, "device": draw(st.sampled_from(devices)),
                         "ts": draw(st.floats(0, 4e9)), **metrics})
    return list(orjson.loads(orjson.dumps(readings)))


@given(readings=batches(), precision=st.sampled_from(list(Precision)))
@example(readings=[{"seq": 1, "device": "d", "ts": 1.5, "a": 1e-5, "b": 21.0},
                   {"seq": 2, "device": "d", "ts": 2.5, "a": 0.1, "b": 1e16}],
         precision=Precision.MS)
@example(readings=[{"seq": 1, "device": "d", "ts": 1.5, "a": 1.0},
                   {"seq": 2, "device": "d", "ts": 2.5, "b": 2.0}], precision=Precision.MS)
@example(readings=[{"seq": 1, "device": "d", "ts": 1.5, "{x}": 1.0, "a b=": 2},
                   {"seq": 2, "device": "d", "ts": 2.5, "a b=": 3, "{x}": 4.5}],
         precision=Precision.NS)
@example(readings=[{"seq": 1, "device": "d", "ts": 2e10 + 0.0005, "a": 1.0},
                   {"seq": 2, "device": "d", "ts": 1.0000005, "a": 2.0}],
         precision=Precision.NS)  # past numpy's range of timestamps: exact integers
@example(readings=[{"seq": 1, "device": "d", "ts": 0.0005, "a": 1.0},
                   {"seq": 2, "device": "d", "ts": 0.0015, "a": 2.0}],
         precision=Precision.MS)  # halves round to even
def test_batch_encoders_are_encode_of_each(readings, precision):
    encoder = ReadingEncoder(measurement_name="tele{m}", gateway="gw", site="s",
                             device_labels={"*": {"zone": "a b"}}, precision=precision)
    lines = [encoder.encode(r) for r in readings]
    assert encoder.encode_many(readings) == lines
    # The sink's path: one text, and the readings that made a line (for dead letters).
    text, kept = encoder.encode_text(readings)
    assert text == "".join(line + "\n" for line in lines if line)
    assert list(kept) == [r for r, line in zip(readings, lines, strict=True) if line]


# Where orjson's notation differs from repr's: below 1e-4 and in exponents.
_NOTATION = st.sampled_from([1e-4, -1e-4, 9.99e-5, 1e-5, -2e-5, 9.344143052314458e-06,
                             -3e-7, 5e-324, 1e15, 1e16, -1e22, 1.5e300, 0.0, -0.0])


@given(values=st.lists(st.one_of(finite, _NOTATION, st.integers(-(2**53) + 1, 2**53 - 1)),
                       min_size=1, max_size=20))
@example(values=[0.5, -0.00002])
@example(values=[0.5, 9.344143052314458e-06])
@example(values=[2e-05, 1])
@example(values=[0.5, 0.00002])
def test_column_numbers_are_repr(values):
    # The column path writes numbers with orjson; the per-reading path with repr.
    encoder = ReadingEncoder(measurement_name="t", gateway="g", site="s", device_labels={},
                             precision=Precision.S)
    readings = [{"seq": i, "device": "d", "ts": 1.0, "v": v} for i, v in enumerate(values)]
    expected = "".join(encoder.encode(r) + "\n" for r in readings)
    assert encoder.encode_text(readings)[0] == expected
