"""The gateway's MQTT links (site, cloud) on fieldmqtt's session, driven by the daemon's loop."""

from gateway.mqtt.link import Backoff, InboundMessage, MqttLink

__all__ = ["Backoff", "InboundMessage", "MqttLink"]
