"""Encrypted, authenticated cloud link: TLS with a private CA, a password from a file."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mosquitto import Mosquitto
from tests.mqtt_helpers import CloudCollector, Publisher, subscribe_and_wait

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def tls_cloud(tmp_path: Path, pki: tuple[Path, Path, Path]) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, "cloud-tls", tls=pki,
                       users={"gw": PASSWORD, "reader": "reader-pw"}).start()
    yield broker
    broker.stop()



def _tls_subscriber(port: int, ca: Path, topic: str) -> tuple[paho.Client, list[bytes]]:
    got: list[bytes] = []
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    c.username_pw_set("reader", "reader-pw")
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.connect("127.0.0.1", port)
    c.loop_start()
    subscribe_and_wait(c, [(topic, 1)])
    return c, got


def test_readings_cross_a_tls_link_with_a_password_from_a_file(site, tls_cloud, make_gateway,
                                                               pki, tmp_path):
    pw = tmp_path / "cloud.pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)  # a password every user can read is refused
    gw = make_gateway(site, None, cloud={"url": tls_cloud.url, "ca_file": str(pki[0]),
                                         "username": "gw", "password_file": str(pw)}).start()
    sub, got = _tls_subscriber(tls_cloud.port, pki[0], "fieldgate/gw-test/telemetry")
    pub = Publisher(site.port)
    for i in range(100):
        pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
    pub.close()

    def count() -> int:
        return sum(len(orjson.loads(p)["readings"]) for p in list(got))

    assert CloudCollector.wait_for(lambda: count() == 100, 15), gw.log()
    assert gw.stop() == 0
    assert PASSWORD not in gw.log()
    sub.disconnect()
    sub.loop_stop()


def test_wrong_password_is_reported_retried_and_loses_nothing(site, tls_cloud, make_gateway,
                                                              pki, tmp_path, monkeypatch):
    gw = make_gateway(site, None, cloud={"url": tls_cloud.url, "ca_file": str(pki[0]),
                                         "username": "gw", "password_env": "FG_TEST_PW"})
    gw.expect_error("refused the connection: Not authorized")
    monkeypatch.setenv("FG_TEST_PW", "wrong-password")
    gw.start()
    pub = Publisher(site.port)
    for i in range(20):
        pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
    pub.close()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == 20, 10)
    assert CloudCollector.wait_for(
        lambda: (gw.metric('fieldgate_link_connect_failures_total{link="cloud"}') or 0) >= 2, 10)
    assert gw.metric('fieldgate_log_undelivered_readings{sink="uplink"}') == 20, gw.log()
    assert "refused the connection: Not authorized" in gw.log() \
        or "refused the connection: Bad user name or password" in gw.log()
    assert "wrong-password" not in gw.log()
    assert gw.stop() == 0


def test_untrusted_certificate_is_refused(site, tls_cloud, make_gateway):
    # No ca_file: the system trust store does not know the private CA.
    gw = make_gateway(site, None, cloud={"url": tls_cloud.url}).start()
    assert CloudCollector.wait_for(
        lambda: (gw.metric('fieldgate_link_connect_failures_total{link="cloud"}') or 0) >= 1, 10)
    assert gw.metric('fieldgate_link_connected{link="cloud"}') in (None, 0.0)
    assert "CERTIFICATE_VERIFY_FAILED" in gw.log()
    assert gw.stop() == 0
