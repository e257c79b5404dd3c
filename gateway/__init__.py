"""Fieldgate: an IoT edge telemetry gateway.

Site MQTT broker -> decode/validate -> durable log (SQLite WAL) -> sinks (cloud MQTT, ...).
"""

__version__ = "0.1.0"
