"""`gateway query`: InfluxQL against the InfluxDB that the `influx` sink writes to.

Public API: `InfluxConnection` and `connection_from` (the sink's settings), `InfluxQLClient`
(runs statements over HTTP `/query`), the canned questions in `canned`, and `render` /
`chart` for output. Errors: `QueryError` (one line, for the CLI), `NoDataError` (a query
that matched nothing, with the reason).
"""

from gateway.query.client import (
    InfluxConnection,
    InfluxQLClient,
    NoDataError,
    QueryError,
    Series,
    connection_from,
)

__all__ = ["InfluxConnection", "InfluxQLClient", "NoDataError", "QueryError", "Series",
           "connection_from"]
