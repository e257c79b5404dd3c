"""Fieldgate's MQTT v5 client layer: a session on the ``mqtt5`` codec, driven by the
caller's select loop. Shared by the gateway (``gateway.mqtt``) and the emulator
(``devices``); it imports neither."""
