"""The gateway's MQTT links (site, cloud) on fieldmqtt's session, driven by the daemon's loop.

- ``link``: ``MqttLink`` (a session plus the gateway's policy: callbacks, logging) and
  ``poll_links`` (one wait for every link);
- ``reconnect``: when a link tries its broker again.
"""

from gateway.mqtt.link import InboundMessage, MqttLink, poll_links

__all__ = ["InboundMessage", "MqttLink", "poll_links"]
