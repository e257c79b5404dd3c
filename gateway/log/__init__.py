"""The durable local log: every record is appended here before any sink sees it."""

from gateway.log.append import AppendResult, Message
from gateway.log.reader import LogReader, Row
from gateway.log.store import LogStore

__all__ = ["AppendResult", "LogReader", "LogStore", "Message", "Row"]
