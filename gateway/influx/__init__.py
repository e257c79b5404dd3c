"""InfluxDB line protocol and HTTP writes, shared by the ``influx`` sink (and, later,
``gateway query`` and the cloud ingest workers). Nothing here knows about the log or MQTT."""
