"""Moved to gateway.mosquitto; kept while bench/ moves over."""

from gateway.mosquitto import Mosquitto, free_port

__all__ = ["Mosquitto", "free_port"]
