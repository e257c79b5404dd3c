"""The status view: a terminal picture of a running gateway, for `gateway status` and
`gateway demo`.

It reads only what the gateway itself offers: its /metrics endpoint (links, rates, sink
depths) and its log file, read-only (the latest readings per device, recent events,
cursors). `sources` fetches, `state` accumulates poll by poll, `view` draws with rich,
`watch` polls and redraws. Errors: `StatusError`, one line for the CLI.
"""

from gateway.status.sources import StatusError
from gateway.status.watch import StatusWatcher, print_once, run_live, watcher_for

__all__ = ["StatusError", "StatusWatcher", "print_once", "run_live", "watcher_for"]
