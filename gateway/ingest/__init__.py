"""Inbound side: topic templates, payload decoding into readings or dead letters, and
recognising the site broker's redeliveries."""

from gateway.ingest.decode import DeadLetter, Decoder, Reading, Reason
from gateway.ingest.redelivery import Redeliveries, message_key
from gateway.ingest.topics import TopicMatch, TopicTemplates

__all__ = ["DeadLetter", "Decoder", "Reading", "Reason", "Redeliveries", "TopicMatch",
           "TopicTemplates", "message_key"]
