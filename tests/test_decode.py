"""Decoding payloads: every accepted shape, every rejection reason, and property tests."""

from __future__ import annotations

import itertools
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig, Ingest, PayloadFormat, Subscription
from gateway.ingest.decode import DeadLetter, Decoder, Reason, valid_device_id
from gateway.ingest.topics import TopicTemplates

NOW = 1_800_000_000.0


@pytest.fixture
def decoder() -> Decoder:
    cfg = GatewayConfig(gateway_id="t")
    return Decoder(Ingest(max_payload=1024, max_metrics=4, max_readings=3, clock_check="off"),
                   TopicTemplates(cfg.subscriptions))


def test_object_with_epoch_ts(decoder):
    payload = b'{"ts": 1799999999.5, "temp": 21.4, "on": true}'
    out = decoder.decode("sensors/gh-1/telemetry", payload, NOW)
    assert out == [("gh-1", 1799999999.5, {"temp": 21.4, "on": 1})]


def test_booleans_are_one_and_zero_from_decode_on(decoder):
    # One meaning everywhere: the log, the rules, the uplink and InfluxDB see numbers.
    out = decoder.decode("sensors/d/telemetry", b'[{"door": true}, {"door": false}]', NOW)
    assert not isinstance(out, DeadLetter)
    assert [m["door"] for _, _, m in out] == [1, 0]
    assert all(type(m["door"]) is int for _, _, m in out)
    assert orjson.dumps(out[0][2]) == b'{"door":1}'
    bare = decoder.decode("sensors/d/relay", b"true", NOW)
    assert not isinstance(bare, DeadLetter)
    assert [(d, m) for d, _, m in bare] == [("d", {"relay": 1})]
    assert type(bare[0][2]["relay"]) is int
    bare = decoder.decode("sensors/d/relay", b" false", NOW)
    assert not isinstance(bare, DeadLetter) and type(bare[0][2]["relay"]) is int


def test_utf8_bom_before_valid_json_is_accepted(decoder):
    out = decoder.decode("sensors/d/telemetry", b'\xef\xbb\xbf{"t": 1.5}', NOW)
    assert out == [("d", NOW, {"t": 1.5})]
    assert decoder.decode("sensors/e/t", b"\xef\xbb\xbf2", NOW) == [("e", NOW, {"t": 2})]
    out = decoder.decode("sensors/d/telemetry", b'\xef\xbb\xbf{"t": NaN}', NOW)
    assert isinstance(out, DeadLetter) and out.reason is Reason.NON_FINITE


@pytest.mark.parametrize("payload", [
    b'{"a": 1, "a": 2}',
    b'{"a": 1, "ts": 1799999999, "ts": 1799999998}',
    b'[{"a": 1}, {"b": 1 ,  "b" : 2}]',
])
def test_a_key_twice_in_one_object_is_a_dead_letter(decoder, payload):
    out = decoder.decode("sensors/d/telemetry", payload, NOW)
    assert isinstance(out, DeadLetter), out
    assert out.reason is Reason.DUPLICATE_KEY and "appears twice" in out.detail


def test_same_key_in_different_readings_is_fine(decoder):
    out = decoder.decode("sensors/d/telemetry", b'[{"a": 1, "b": 2}, {"a": 3, "b": 4}]', NOW)
    assert not isinstance(out, DeadLetter)
    assert [m for _, _, m in out] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]


def test_device_ids_are_capped_and_checked(decoder):
    long_id = "d" * 20_000
    out = decoder.decode(f"sensors/{long_id}/telemetry", b'{"t": 1}', NOW)
    assert isinstance(out, DeadLetter) and out.reason is Reason.BAD_DEVICE
    assert "ingest.max_device_id 128" in out.detail and len(out.detail) < 300
    assert not isinstance(decoder.decode(f"sensors/{'d' * 128}/t", b"1", NOW), DeadLetter)
    for bad in ("a b", "a,b", "a=b", 'a"b', "a\\b", "a\x00b", "a\tb", "$x", "a*b", "a$b",
                "a%b", "d" * 300, "a\n"):
        out = decoder.decode(f"sensors/{bad}/telemetry", b'{"t": 1}', NOW)
        assert isinstance(out, DeadLetter) and out.reason is Reason.BAD_DEVICE, bad
    for good in ("gh-1", "aa:bb:cc:dd:ee:ff", "esp32_01.north", "dev@site~3", "a..b", ".x"):
        out = decoder.decode(f"sensors/{good}/telemetry", b'{"t": 1}', NOW)
        assert out == [(good, NOW, {"t": 1})]


@pytest.mark.parametrize("device", ["dév", "küche-2", "d\uff11", "\u0661", "ǅ", ".", ".."])
def test_device_ids_are_ascii_and_never_a_dot_path(decoder, device):
    """Unicode letters and digits (a fullwidth d１ looks like d1) and the path names . and ..
    are bad_device, by the rule add-device applies too (decode.valid_device_id)."""
    out = decoder.decode(f"sensors/{device}/telemetry", b'{"t": 1}', NOW)
    assert isinstance(out, DeadLetter) and out.reason is Reason.BAD_DEVICE, out
    assert out.detail == valid_device_id(device, 128)


def test_rfc3339_ts_and_missing_ts(decoder):
    out = decoder.decode("sensors/a/telemetry",
                         b'[{"ts": "2027-01-15T08:00:00Z", "t": 1}, {"t": 2}]', NOW + 5)
    assert not isinstance(out, DeadLetter)
    assert out[0][1] == 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert out[1][1] == NOW + 5  # receive time when the device sent none


def test_rfc3339_with_offset(decoder):
    out = decoder.decode("sensors/a/telemetry", b'{"ts": "2027-01-15T08:30:00.25+01:00", "t": 1}',
                         NOW)
    assert not isinstance(out, DeadLetter)
    assert out[0][1] == NOW - 1799.75


def test_bare_number_topic(decoder):
    assert decoder.decode("sensors/d/hum", b" 40.25 ", NOW) == [("d", NOW, {"hum": 40.25})]


def test_most_specific_template_wins(decoder):
    # sensors/{device}/telemetry beats sensors/{device}/{metric}: JSON, not a number
    out = decoder.decode("sensors/d/telemetry", b'{"x": 1}', NOW)
    assert out == [("d", NOW, {"x": 1})]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("other/d/x", b"1", Reason.UNKNOWN_TOPIC),
        ("sensors//telemetry", b'{"x": 1}', Reason.UNKNOWN_TOPIC),
        ("sensors/d/telemetry", b"x" * 1025, Reason.TOO_LARGE),
        ("sensors/d/telemetry", b"{", Reason.BAD_JSON),
        ("sensors/d/telemetry", b"\xff\xfe\x00", Reason.BAD_JSON),
        ("sensors/d/telemetry", b'{"a": "\xff"}', Reason.BAD_JSON),
        ("sensors/d/telemetry", b'\xff\xfe{\x00"\x00a\x00"\x00:\x001\x00}\x00', Reason.BAD_JSON),
        ("sensors/d/telemetry", b'{"a": "\\ud800"}', Reason.BAD_JSON),
        ("sensors/d/telemetry", b'{"x": NaN, "y": ', Reason.BAD_JSON),
        ("sensors/d/telemetry", b'{"x": -Infinity}', Reason.NON_FINITE),
        ("sensors/d/telemetry", b'{"clock_unsynced": 1}', Reason.BAD_NAME),
        ("sensors/d/telemetry", b'{"x": NaN}', Reason.NON_FINITE),
        ("sensors/d/telemetry", b'{"x": Infinity}', Reason.NON_FINITE),
        ("sensors/d/telemetry", b'{"x": 1e999}', Reason.NON_FINITE),
        ("sensors/d/x", b"NaN", Reason.NON_FINITE),
        ("sensors/d/telemetry", b'"hello"', Reason.BAD_SHAPE),
        ("sensors/d/telemetry", b"[]", Reason.BAD_SHAPE),
        ("sensors/d/telemetry", b"[1]", Reason.BAD_SHAPE),
        ("sensors/d/telemetry", b'[{"a":1},{"a":1},{"a":1},{"a":1}]', Reason.TOO_MANY_READINGS),
        ("sensors/d/telemetry", b'{"a":1,"b":2,"c":3,"d":4,"e":5}', Reason.TOO_MANY_METRICS),
        ("sensors/d/telemetry", b'{"ts": 1799999999}', Reason.NO_METRICS),
        ("sensors/d/telemetry", b'{"a": "1"}', Reason.WRONG_TYPE),
        ("sensors/d/telemetry", b'{"a": null}', Reason.WRONG_TYPE),
        ("sensors/d/telemetry", b'{"a": [1]}', Reason.WRONG_TYPE),
        ("sensors/d/x", b'"1"', Reason.WRONG_TYPE),
        ("sensors/d/telemetry", b'{"device": 1}', Reason.BAD_NAME),
        ("sensors/d/telemetry", b'{"": 1}', Reason.BAD_NAME),
        ("sensors/d/telemetry", b'{"a b": 1}', Reason.BAD_NAME),
        ("sensors/d/telemetry", b'{"ts": "noon", "a": 1}', Reason.BAD_TIMESTAMP),
        ("sensors/d/telemetry", b'{"ts": "2027-01-15T08:00:00", "a": 1}', Reason.BAD_TIMESTAMP),
        ("sensors/d/telemetry", b'{"ts": true, "a": 1}', Reason.BAD_TIMESTAMP),
        ("sensors/d/telemetry", b'{"ts": 1800000000000, "a": 1}', Reason.TS_OUT_OF_RANGE),
        ("sensors/d/telemetry", b'{"ts": 0, "a": 1}', Reason.TS_OUT_OF_RANGE),
        ("sensors/d/telemetry", b'[{"a": 1}, {"a": "x"}]', Reason.WRONG_TYPE),
    ],
)
def test_rejections(decoder, topic, payload, reason):
    out = decoder.decode(topic, payload, NOW)
    assert isinstance(out, DeadLetter), out
    assert out.reason is reason, out.detail
    assert out.detail


def test_array_rejection_names_the_reading(decoder):
    out = decoder.decode("sensors/d/telemetry", b'[{"a": 1}, {"a": "x"}]', NOW)
    assert isinstance(out, DeadLetter)
    assert out.detail.startswith("reading 1:")


finite = (st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)
          | st.booleans())
names = st.from_regex(r"\A[a-z_][a-z0-9_]{0,10}\Z").filter(
    lambda n: n not in {"ts", "seq", "device", "gateway"})


@settings(max_examples=300)
@given(st.lists(st.dictionaries(names, finite, min_size=1, max_size=4), min_size=1, max_size=3),
       st.floats(min_value=NOW - 86400, max_value=NOW + 60))
def test_valid_payloads_round_trip(readings, ts):
    templates = TopicTemplates([Subscription(topic="s/{device}/j", format=PayloadFormat.JSON)])
    decoder = Decoder(Ingest(max_payload=1 << 20, max_metrics=4, max_readings=3,
                             clock_check="off"), templates)
    payload = orjson.dumps([{"ts": ts, **r} for r in readings])
    out = decoder.decode("s/dev/j", payload, NOW)
    assert not isinstance(out, DeadLetter), out
    assert [(d, t) for d, t, _ in out] == [("dev", ts)] * len(readings)
    assert [m for _, _, m in out] == readings
    # booleans become 1/0 (ints), every other value keeps its type
    assert [{k: type(v) for k, v in m.items()} for _, _, m in out] == \
        [{k: int if type(v) is bool else type(v) for k, v in r.items()} for r in readings]


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(payload):
    cfg = GatewayConfig(gateway_id="t")
    decoder = Decoder(Ingest(clock_check="off"), TopicTemplates(cfg.subscriptions))
    for topic in ("sensors/d/telemetry", "sensors/d/m"):
        out = decoder.decode(topic, payload, NOW)
        if not isinstance(out, DeadLetter):
            for _, ts, metrics in out:
                assert math.isfinite(ts)
                assert all(type(v) in (int, float) for v in metrics.values())
                assert all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())


@settings(max_examples=200)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                         max_size=3),
                    max_leaves=10))
def test_arbitrary_json_values_are_accepted_or_dead_lettered(value):
    cfg = GatewayConfig(gateway_id="t")
    decoder = Decoder(Ingest(clock_check="off"), TopicTemplates(cfg.subscriptions))
    try:
        payload = orjson.dumps(value)
    except TypeError:
        return
    out = decoder.decode("sensors/d/telemetry", payload, NOW)
    if isinstance(out, DeadLetter):
        assert out.reason in Reason and out.detail, out
        return
    # Accepted: exactly what was sent, one reading per object, every metric a finite number
    # (booleans as 1/0), the device from the topic.
    objects = value if isinstance(value, list) else [value]
    assert len(out) == len(objects)
    for (device, _ts, metrics), sent in zip(out, objects, strict=True):
        assert device == "d"
        assert isinstance(sent, dict)
        for name, got in metrics.items():
            assert type(got) in (int, float) and math.isfinite(got), (name, got)
            if name != "clock_unsynced":
                want = sent[name]
                assert got == (int(want) if isinstance(want, bool) else want), (name, sent)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "ts_x", "c.d"]), st.integers(-5, 5)),
                min_size=1, max_size=5),
       st.sampled_from(["", " ", "\n", "\t "]), st.sampled_from(["", " ", "\r\n"]))
def test_duplicate_keys_are_found_however_the_json_is_spaced(pairs, before, after):
    templates = TopicTemplates([Subscription(topic="s/{device}/j", format=PayloadFormat.JSON)])
    decoder = Decoder(Ingest(clock_check="off"), templates)
    body = ",".join(f'"{k}"{before}:{after}{v}' for k, v in pairs)
    out = decoder.decode("s/d/j", ("{" + body + "}").encode(), NOW)
    has_duplicate = len({k for k, _ in pairs}) < len(pairs)
    assert isinstance(out, DeadLetter) == has_duplicate, out
    if has_duplicate:
        assert isinstance(out, DeadLetter) and out.reason is Reason.DUPLICATE_KEY


@pytest.mark.parametrize(("payload", "duplicate"), [
    # Colons inside strings (an RFC 3339 ts) outnumber the keys: the count alone cannot
    # tell, the scan must.
    (b'{"ts":"2027-01-15T08:00:00Z","t":1,"t":2}', True),
    (b'{"ts":"2027-01-15T08:00:00Z","t":1,"u":2}', False),
    (b'[{"ts":"2027-01-15T08:00:00Z","t":1},{"t":2,"t":3}]', True),
    (b'[{"ts":"2027-01-15T08:00:00Z","t":1},{"t":2,"u":3}]', False),
    (b'{"t":1,"t" :2}', True),
])
def test_duplicate_keys_are_found_beside_colons_in_strings(payload, duplicate):
    templates = TopicTemplates([Subscription(topic="s/{device}/j", format=PayloadFormat.JSON)])
    out = Decoder(Ingest(clock_check="off"), templates).decode(
        "s/d/j", payload, NOW)
    if duplicate:
        assert isinstance(out, DeadLetter) and out.reason is Reason.DUPLICATE_KEY, out
    else:
        assert not isinstance(out, DeadLetter), out


def test_readings_without_ts_that_arrive_together_get_distinct_times_in_order():
    """The clock is read once per wake-up and a backlog arrives in one: each reading without
    ts still gets its own receive time (1 ms after the device's previous one), in order,
    so InfluxDB keeps every point and the rules count none as a duplicate."""
    templates = TopicTemplates([Subscription(topic="s/{device}/j", format=PayloadFormat.JSON),
                                Subscription(topic="s/{device}/n/{metric}",
                                             format=PayloadFormat.NUMBER)])
    decoder = Decoder(Ingest(clock_check="off"), templates)
    times = [decoder.decode("s/a/j", orjson.dumps({"v": i}), NOW)[0][1] for i in range(50)]
    times += [decoder.decode("s/a/n/v", b"1", NOW)[0][1] for _ in range(50)]
    assert times == sorted(times) and len(set(times)) == 100
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.00099
    assert decoder.decode("s/b/j", b'{"v": 1}', NOW)[0][1] == NOW   # per device
    later = NOW + 10
    assert decoder.decode("s/a/j", b'{"v": 1}', later)[0][1] == later  # back to the clock
    own = decoder.decode("s/a/j", orjson.dumps({"ts": later - 5, "v": 1}), later)
    assert not isinstance(own, DeadLetter) and own[0][1] == later - 5  # own ts untouched


def test_readings_without_ts_never_share_a_millisecond_once_rounded():
    """Regression: 1 ms added to the previous time again and again drifts in float; at
    x.5 ms two successive times rounded (as points are written, ms precision) to the same
    millisecond and InfluxDB kept one of the two readings (seen through the cloud ingest:
    i 9374 and 9376 of 21,000 missing)."""
    templates = TopicTemplates([Subscription(topic="s/{device}/j", format=PayloadFormat.JSON)])
    decoder = Decoder(Ingest(clock_check="off"), templates)
    now = 1_795_938_249.4525003   # the clock's reading in that run, not on a whole ms
    times = [decoder.decode("s/a/j", orjson.dumps({"v": i}), now)[0][1] for i in range(5000)]
    millis = [round(t * 1000) for t in times]
    assert millis == sorted(millis) and len(set(millis)) == len(millis)
