"""MQTT links driven by our own loops: paho-mqtt for the protocol, our code for the socket."""

from gateway.mqtt.link import Backoff, InboundMessage, MqttLink

__all__ = ["Backoff", "InboundMessage", "MqttLink"]
