"""The cloud side of a fleet: `gateway cloud ingest`, the worker between the cloud broker's
shared subscription and InfluxDB (README "Fleet ingest").

- ``config``  the worker's config (cloud.yaml): broker, group, influx, state file
- ``decode``  uplink messages -> readings/events/status with their seq range, or a reason
- ``state``   SQLite: per-gateway seq high-water mark, gaps and resend requests, dead letters
- ``writes``  the InfluxDB write on its own thread
- ``metrics`` /metrics
- ``worker``  the loop: receive, write, then acknowledge
"""
