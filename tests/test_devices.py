"""The device emulator: determinism, faults, fleets, verified commands."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from devices.commands import CommandVerifier, device_key, seal, unseal
from devices.fleet import FleetError, load_fleet, parse_fleet
from devices.generator import FleetModel, _round
from devices.simulator import Simulator
from gateway.log.schema import connect
from tests.mqtt_helpers import CloudCollector, subscribe_and_wait
from tests.mqtt_helpers import client as mqtt_client

ROOT = Path(__file__).resolve().parents[1]
START = 1_800_000_000.0


def _fleet(faults=(), **kind):
    spec = {"count": 2, "interval": "1s", "id": "d-{n}",
            "metrics": {"temp": {"baseline": 20, "noise": 0.5, "walk": 0.1}}}
    spec.update(kind)
    return parse_fleet({"seed": 1, "types": {"t": spec}, "faults": list(faults)})


def _run(fleet, seconds, seed=None):
    model = FleetModel(fleet, seed=seed, start=START)
    return model, model.due(seconds)


def test_same_seed_same_series_other_seed_other_series():
    fleet = load_fleet(ROOT / "devices/fleets/greenhouse.yaml")
    a = [(o.topic, o.payload) for o in _run(fleet, 120)[1]]
    b = [(o.topic, o.payload) for o in _run(fleet, 120)[1]]
    c = [(o.topic, o.payload) for o in _run(fleet, 120, seed=99)[1]]
    assert a == b
    assert len(a) == len(c) and a != c


def test_dry_run_cli_is_deterministic():
    args = [sys.executable, "-m", "devices", "simulate", "--fleet",
            "devices/fleets/factory.yaml", "--dry-run", "--duration", "20s",
            "--start", str(START)]
    one = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    two = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert one == two
    assert one.count("\n") > 20


def _readings(out, device="d-1"):
    return [orjson.loads(o.payload) for o in out if o.device == device and o.fault is None]


def test_spike_stuck_drift_dropout_skew():
    fleet = _fleet([
        {"kind": "spike", "device": "d-1", "metric": "temp", "at": "5s", "value": 99},
        {"kind": "stuck", "device": "d-1", "metric": "temp", "at": "10s", "duration": "5s"},
        {"kind": "dropout", "device": "d-1", "at": "20s", "duration": "5s"},
        {"kind": "drift", "device": "d-2", "metric": "temp", "at": "0s", "duration": "1h",
         "value": 36000},
        {"kind": "skew", "device": "d-2", "at": "30s", "duration": "5s", "value": 600},
    ])
    model, out = _run(fleet, 40)
    d1 = {round(r["ts"] - START): r["temp"] for r in _readings(out)}
    assert d1[5] == 99
    assert d1[10] == d1[11] == d1[12] == d1[13] == d1[14]
    assert d1[15] != d1[14] or d1[16] != d1[14]
    assert not any(20 <= t < 25 for t in d1)       # silent while dropped out
    d2 = _readings(out, "d-2")
    assert d2[-1]["temp"] > d2[0]["temp"] + 300    # 10/s drift for 40 s
    skewed = [r for r in d2 if r["ts"] - START > 500]
    assert len(skewed) == 5
    kinds = sorted({(e["device"], e["kind"]) for e in model.fault_log})
    assert kinds == [("d-1", "dropout"), ("d-1", "spike"), ("d-1", "stuck"), ("d-2", "drift"),
                     ("d-2", "skew")]


def test_burst_duplicate_and_every_malformed_variant():
    faults = [{"kind": "burst", "device": "d-1", "at": "3s", "count": 7},
              {"kind": "duplicate", "device": "d-2", "at": "4s"}]
    faults += [{"kind": "malformed", "device": "d-1", "at": f"{10 + i}s", "variant": v}
               for i, v in enumerate(["bad_json", "nan", "wrong_type", "oversized", "binary"])]
    model, out = _run(_fleet(faults), 20)
    assert sum(1 for o in out if o.fault == "burst") == 7
    dup = [o for o in out if o.fault == "duplicate"]
    assert len(dup) == 1
    assert sum(1 for o in out if o.payload == dup[0].payload) == 2
    bad = {o.fault: o.payload for o in out if o.fault and o.fault.startswith("malformed")}
    assert set(bad) == {"malformed:bad_json", "malformed:nan", "malformed:wrong_type",
                        "malformed:oversized", "malformed:binary"}
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(bad["malformed:bad_json"])
    assert b"NaN" in bad["malformed:nan"]
    assert len(bad["malformed:oversized"]) > 64 * 1024
    assert len([e for e in model.fault_log if e["kind"] == "malformed"]) == 5


def test_array_and_number_formats():
    _, out = _run(_fleet(format="array", batch=4), 10)
    arrays = [orjson.loads(o.payload) for o in out]
    assert arrays and all(isinstance(a, list) and len(a) == 4 for a in arrays)
    _, out = _run(_fleet(format="number"), 3)
    assert {o.topic for o in out} == {"sensors/d-1/temp", "sensors/d-2/temp"}
    assert all(isinstance(orjson.loads(o.payload), float) for o in out)


def test_fleet_file_errors_are_one_line_each():
    with pytest.raises(FleetError) as info:
        parse_fleet({"types": {"t": {"interval": "soon", "metrics": {},
                                     "actuators": {"fan": {"states": ["off", "on"],
                                                           "initial": "max"}}}},
                     "faults": [{"kind": "spike"}]})
    problems = info.value.problems
    assert any(p.startswith("types.t.interval:") for p in problems)
    assert any(p.startswith("types.t.metrics:") for p in problems)
    assert any("initial 'max'" in p for p in problems)
    assert any(p.startswith("faults.0:") and "at or probability" in p for p in problems)


def test_every_example_fleet_is_valid():
    fleets = sorted((ROOT / "devices/fleets").glob("*.yaml"))
    assert len(fleets) >= 4
    for path in fleets:
        out = subprocess.run([sys.executable, "-m", "devices", "check", str(path)], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("ok:")


MASTER = b"test-key-0123456789"


def _command(device="gh-1", cid="c1", ts=None, action="fan", state="on", key=MASTER,
             topic=None):
    """A command payload as the gateway sends it: the body sealed for the device."""
    body = orjson.dumps({"id": cid, "ts": time.time() if ts is None else ts,
                         "action": action, "params": {"state": state}})
    if key is None:
        return body
    return seal(device_key(key, device), topic or f"devices/{device}/cmd", body)


def test_verifier_refuses_unsigned_tampered_stale_replayed_and_misdirected():
    v = CommandVerifier.from_master(MASTER, max_age=30)
    now = time.time()
    good = _command()
    assert v.check("gh-1", good, now)[0].ok
    assert v.check("gh-1", good, now)[0].reason == "replayed"
    assert v.check("gh-1", _command(cid="c2", key=None), now)[0].reason == "unsigned"
    tampered = _command(cid="c3").replace(b'"on"', b'"of"')
    assert v.check("gh-1", tampered, now)[0].reason == "bad signature"
    assert v.check("gh-1", _command(cid="c4", ts=now - 60), now)[0].reason == "stale"
    # Signed for gh-1, sent to gh-2: the topic is part of what is signed...
    assert v.check("gh-2", _command(cid="c5"), now)[0].reason == "bad signature"
    # ...and gh-2's own key signs for gh-2 only.
    assert v.check("gh-1", _command(device="gh-2", cid="c6", topic="devices/gh-1/cmd"),
                   now)[0].reason == "bad signature"
    assert v.check("gh-1", b"{nope", now)[0].reason == "not JSON"


def test_the_emulator_signs_its_answers_with_the_device_key():
    v = CommandVerifier.from_master(MASTER, max_age=30)
    payload = v.answer("gh-1", {"id": "c1", "ts": 1.5, "status": "ok"})
    opened = unseal("devices/gh-1/cmd/ack", payload)
    assert opened is not None
    sig, body = opened
    assert orjson.loads(body) == {"id": "c1", "ts": 1.5, "status": "ok"}
    expected = seal(device_key(MASTER, "gh-1"), "devices/gh-1/cmd/ack", body)
    assert payload == expected and sig == expected[8:72].decode()
    assert CommandVerifier.from_master(None, 30).answer("gh-1", {"id": "c1"}) == b'{"id":"c1"}'


def test_commands_over_mqtt_change_the_physics_and_are_acknowledged(site):
    fleet = parse_fleet({"seed": 2, "types": {"gh": {
        "count": 1, "id": "gh-1", "interval": "100ms",
        "metrics": {"temp": {"baseline": 30, "effects": {"fan": {"on": {"rate": -600}}}}},
        "actuators": {"fan": {"states": ["off", "on"], "initial": "off"}}}}})
    model = FleetModel(fleet, start=time.time())
    sim = Simulator(model, broker=site.url, key=MASTER, say=lambda _l: None)
    stop = threading.Event()
    acks: list[dict] = []
    temps: list[float] = []
    watcher = mqtt_client(site.port)
    watcher.on_message = lambda _c, _u, m: (acks if m.topic.endswith("/ack") else temps).append(
        orjson.loads(m.payload)["ack"] if m.topic.endswith("/ack")
        else orjson.loads(m.payload)["temp"])
    subscribe_and_wait(watcher, [("devices/gh-1/cmd/ack", 1), ("sensors/gh-1/telemetry", 1)])
    runner = threading.Thread(target=sim.run, args=(20, stop.is_set), daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while len(temps) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temps and all(t == 30 for t in temps)
    unsigned = _command(device="gh-1", cid="u1", key=None)
    watcher.publish("devices/gh-1/cmd", unsigned, qos=1)
    good = _command(device="gh-1", cid="g1")
    watcher.publish("devices/gh-1/cmd", good, qos=1)
    watcher.publish("devices/gh-1/cmd", good, qos=1)  # replay
    deadline = time.monotonic() + 60
    while (len(acks) < 3 or temps[-1] >= 25) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    runner.join(10)
    watcher.disconnect()
    watcher.loop_stop()
    by_status = [(a["id"], a["status"], a.get("reason")) for a in acks]
    assert ("u1", "rejected", "unsigned") in by_status
    assert ("g1", "ok", None) in by_status
    assert ("g1", "rejected", "replayed") in by_status
    assert temps[-1] < 25, "the fan pulls the temperature down"
    assert sim.stats.commands_ok == 1 and sim.stats.commands_refused == 2


def test_every_injected_malformed_payload_is_in_the_gateways_dlq(site, cloud, make_gateway,
                                                                 tmp_path):
    variants = {"bad_json": "bad_json", "nan": "non_finite", "wrong_type": "wrong_type",
                "oversized": "too_large", "binary": "bad_json"}
    fleet = {"seed": 4, "types": {"t": {
        "count": 2, "id": "em-{n}", "interval": "100ms",
        "metrics": {"temp": {"baseline": 20, "noise": 0.5}}}},
        "faults": [{"kind": "malformed", "device": "em-1", "at": f"{0.5 + i * 0.2}s",
                    "variant": v} for i, v in enumerate(variants)]}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    gw = make_gateway(site, cloud).start()
    out = subprocess.run(
        [sys.executable, "-m", "devices", "simulate", "--fleet", str(tmp_path / "fleet.yaml"),
         "--broker", site.url, "--duration", "3s", "--fault-log", str(tmp_path / "faults.jsonl"),
         "--record", str(tmp_path / "record.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    faults = [orjson.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    recorded = (tmp_path / "record.jsonl").read_text().splitlines()
    assert CloudCollector.wait_for(
        lambda: gw.metric("fieldgate_readings_total") == len(recorded), 10)
    assert gw.stop() == 0
    conn = connect(tmp_path / "log.db", readonly=True)
    reasons = sorted(r for (r,) in conn.execute("SELECT reason FROM dead_letters"))
    assert reasons == sorted(variants[f["variant"]] for f in faults)
    assert len(faults) == 5
    # What the emulator recorded is what `gateway rules replay` reads.
    (tmp_path / "warm.yaml").write_text(
        "groups: [{name: g, rules: [{alert: Warm, expr: 'avg(temp, 1s) > 0'}]}]\n")
    replayed = subprocess.run(
        [sys.executable, "-m", "gateway", "rules", "replay", "--rules",
         str(tmp_path / "warm.yaml"), "--input", str(tmp_path / "record.jsonl"),
         "--format", "jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert replayed.returncode == 0, replayed.stderr
    fired = {orjson.loads(line)["device"] for line in replayed.stdout.splitlines()
             if orjson.loads(line)["type"] == "io.fieldgate.alert.fired"}
    assert fired == {"em-1", "em-2"}



def test_qos0_readings_arrive_well_formed(site):
    fleet = parse_fleet({"seed": 3, "types": {"m": {
        "count": 50, "id": "m-{n}", "interval": "100ms", "qos": 0, "format": "number",
        "metrics": {"power": {"baseline": 4, "noise": 0.5}, "energy": {"baseline": 4,
                                                                       "counter": True}}}}})
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    watcher = mqtt_client(site.port)

    def on_message(_c, _u, m):
        with lock:
            got.append((m.topic, m.payload))

    watcher.on_message = on_message
    subscribe_and_wait(watcher, [("sensors/#", 0)])
    model = FleetModel(fleet, start=time.time())
    sim = Simulator(model, broker=site.url, key=None, say=lambda _line: None)
    stats = sim.run(2.0, lambda: False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if len(got) >= stats.published:
                break
        time.sleep(0.05)
    watcher.disconnect()
    watcher.loop_stop()
    assert stats.published >= 1500  # 50 devices x 2 metrics x 10/s x 2 s, less start-up
    assert len(got) == stats.published
    topics = {t for t, _ in got}
    assert "sensors/m-1/power" in topics and "sensors/m-50/energy" in topics
    assert all(isinstance(orjson.loads(p), float) for _, p in got)


def test_each_example_fleet_has_example_rules_that_fit_it():
    import fnmatch
    import re

    pairs = {"greenhouse": "greenhouse", "cold-chain": "cold-chain", "factory": "machines",
             "energy": "energy"}
    for fleet_name, rules_name in pairs.items():
        fleet = load_fleet(ROOT / f"devices/fleets/{fleet_name}.yaml")
        devices = FleetModel(fleet).by_id
        metrics = {m for t in fleet.types.values() for m in t.metrics}
        rules = yaml.safe_load((ROOT / f"rules/{rules_name}.yaml").read_text())
        for group in rules["groups"]:
            assert any(fnmatch.fnmatchcase(d, group["match"]["device"]) for d in devices), \
                (fleet_name, group["name"])
            for rule in group["rules"]:
                used = set(re.findall(r"\w+\((\w+),", rule["expr"]))
                assert used <= metrics, (fleet_name, rule["alert"], used - metrics)
                for action in rule.get("actions", []):
                    command = action["command"]
                    actuators = {a: s for t in fleet.types.values()
                                 for a, s in t.actuators.items()}
                    assert command["action"] in actuators, (fleet_name, command)
                    state = command["params"]["state"]
                    state = {True: "on", False: "off"}.get(state, state)
                    assert state in actuators[command["action"]].states, (fleet_name, command)


def test_batched_readings_are_the_per_reading_ones():
    """Devices without faults, actuator effects or counters are computed in numpy batches;
    they must make exactly the messages of the per-reading path, in the same order, with
    several device types, formats and intervals, a faulted device among them, and limits."""
    fleet = parse_fleet({"seed": 4, "types": {
        "j": {"count": 5, "interval": "1s", "metrics": {
            "temp": {"baseline": 20, "noise": 0.5, "walk": 0.1, "daily_amplitude": 3,
                     "peak_hour": 9, "drift_per_hour": 0.7, "min": 19, "max": 21, "digits": 3},
            "flat": {"baseline": -2.5, "digits": 0},
            "hum": {"baseline": 50, "noise": 5, "min": 0, "max": 100}}},
        "odd": {"count": 2, "interval": "3s", "metrics": {"a},{b": {"baseline": 1, "noise": 1}}},
        "a": {"count": 3, "interval": "2.5s", "format": "array", "batch": 4,
              "metrics": {"p": {"baseline": 1000, "noise": 2, "walk": 1}}},
        "n": {"count": 4, "interval": "700ms", "format": "number", "qos": 0,
              "metrics": {"v": {"baseline": 230, "noise": 1}, "f": {"baseline": 50}}},
    }, "faults": [{"kind": "spike", "device": "j-2", "metric": "temp", "probability": 0.2},
                  {"kind": "burst", "device": "n-3", "at": "20s", "count": 3}]})
    fast = FleetModel(fleet, start=START + 0.25, scale=3.0)
    slow = FleetModel(fleet, start=START + 0.25, scale=3.0, batched=False)
    made = 0
    for until, limit in [(5, None), (30, 7), (30, 50), (31, 1), (200, 1000), (200, None),
                         (400, 3), (900, None)]:
        got, want = fast.due(until, limit), slow.due(until, limit)
        assert got == want
        made += len(got)
        assert fast.next_due() == slow.next_due()
    assert made > 2000
    assert fast.fault_log == slow.fault_log


@given(st.lists(st.floats(allow_nan=False, min_value=-1e22, max_value=1e22), max_size=50)
       | st.lists(st.sampled_from([2.675, 0.125, 0.5, 1.5, -0.0, 1e15 + 0.5, 2.0**52 + 1,
                                   1800000000.0005, -1.005, float("inf")]), max_size=20),
       st.integers(0, 9))
def test_vectorised_rounding_is_pythons(values, digits):
    assert _round(np.array(values, dtype=np.float64), digits) == [round(v, digits)
                                                                    for v in values]
