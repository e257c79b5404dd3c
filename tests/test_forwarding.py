"""End to end with real Mosquitto: site broker -> gateway -> cloud broker."""

from __future__ import annotations

import time
from collections import defaultdict

import orjson

from tests.mqtt_helpers import CloudCollector, Publisher


def test_every_reading_arrives_in_order_per_device(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    devices = [f"dev-{i}" for i in range(10)]
    n_per_device = 300
    t0 = time.time()
    for i in range(n_per_device):
        for d in devices:
            if i % 3 == 0:  # arrays of readings too
                pub.publish(f"sensors/{d}/telemetry",
                            orjson.dumps([{"ts": t0 + i, "i": i, "temp": 20.5}]))
            elif i % 3 == 1:
                pub.publish(f"sensors/{d}/telemetry", orjson.dumps({"ts": t0 + i, "i": i}))
            else:
                pub.publish(f"sensors/{d}/i", str(i))
    pub.close()
    total = len(devices) * n_per_device
    assert sink.wait_for(lambda: len(sink.unique()) >= total, 30), \
        f"{len(sink.unique())} of {total} arrived; gateway log:\n{gw.log()}"
    by_device: dict[str, list[int]] = defaultdict(list)
    for seq in sorted(sink.unique()):
        r = sink.unique()[seq]
        by_device[r["device"]].append(r["i"])
    for d in devices:
        assert by_device[d] == list(range(n_per_device)), d
    assert sink.status and sink.status[0]["state"] == "online"
    assert gw.stop() == 0
    assert sink.wait_for(lambda: sink.status[-1]["state"] == "offline", 5)
    assert sink.status[-1]["reason"] == "shutdown"
    sink.close()


def test_batches_fit_the_cloud_brokers_maximum_packet_size(site, make_gateway, tmp_path):
    from gateway.mosquitto import Mosquitto

    cloud = Mosquitto(tmp_path, "small-cloud", extra="max_packet_size 16384\n").start()
    try:
        gw = make_gateway(site, cloud).start()
        sink = CloudCollector(cloud.port, gw.gateway_id)
        pub = Publisher(site.port)
        for i in range(3000):
            pub.publish("sensors/d/telemetry", orjson.dumps({"i": i, "temperature": 21.5}))
        pub.close()
        assert sink.wait_for(lambda: len(sink.unique()) == 3000, 20), gw.log()
        assert sorted(r["i"] for r in sink.unique().values()) == list(range(3000))
        assert gw.stop() == 0
        sink.close()
    finally:
        cloud.stop()
