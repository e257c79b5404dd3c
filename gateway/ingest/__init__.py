"""Inbound side: topic templates and payload decoding into readings or dead letters."""

from gateway.ingest.decode import DeadLetter, Decoder, Reading, Reason
from gateway.ingest.topics import TopicMatch, TopicTemplates

__all__ = ["DeadLetter", "Decoder", "Reading", "Reason", "TopicMatch", "TopicTemplates"]
