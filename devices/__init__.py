"""The Fieldgate device emulator: simulated sensors that talk to the gateway over MQTT only."""

__version__ = "0.1.0"
