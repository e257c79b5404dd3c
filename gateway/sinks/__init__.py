"""Sinks forward records from the durable log to a destination; each has its own cursor.

Sinks never import each other; the daemon's wiring module (``gateway.daemon``) is the only
place that knows the concrete classes, registered in its ``SINKS`` table.
"""
