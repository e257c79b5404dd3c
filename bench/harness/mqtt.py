"""Plain paho-mqtt v5 clients, the load and the baselines the benches measure against."""

from __future__ import annotations

import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def paho_client(client_id: str = "") -> Any:
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=paho.MQTTv5)


def connect_retry(client: Any, port: int, deadline: float) -> None:
    """Connect to 127.0.0.1:port, retrying every 5 ms until ``deadline`` (time.time()): a
    broker that is just starting is connected within a few ms of accepting."""
    while True:
        try:
            client.connect("127.0.0.1", port, keepalive=60, clean_start=True)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.005)
