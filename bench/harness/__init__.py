"""What every bench shares: processes, brokers, accounting and the printed tables.

- ``children``: helper processes spawned with a pipe (``Child``: ready/done messages, CPU).
- ``mqtt``: plain paho-mqtt v5 clients for load and baselines (``paho_client``,
  ``connect_retry``).
- ``gateway``: ``BenchGateway``, the tests' ``GatewayProcess`` (tests/tools.py, the one
  gateway-process helper) with the bench's accounting: RSS peak, exit ``ru_maxrss``, disk
  writes, its stderr's warnings as notes; ``checkout`` runs an older tree beside this one.
- ``run``: ``Run``, everything one scenario started (brokers, gateways, children) so that
  ``close`` stops it all and gathers the brokers' and gateways' warnings.
- ``accounting``: CPU, RSS and I/O of a process; percentiles.
- ``table``: the summary tables the benches print.

The servers (Mosquitto from gateway/mosquitto.py, InfluxD and VictoriaMetrics from
tests/tsdb.py) and the gateway process come from the tests' helpers: bench imports tests,
never the other way round.
"""
