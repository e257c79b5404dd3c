#!/usr/bin/env python
"""What a turn of the gateway's loop costs after a pause, against the same turn hot.

Issue 10's paced figure (CPU per reading at 1,000 readings/s) is set by the turns of the
loop more than by the readings in them: the loop sleeps for ``ingest.commit_interval``
between turns, and a turn that follows a pause runs with cold caches. This bench measures
that effect alone, in one process, without brokers: the parts of one group commit of one
site message (``LogStore.append`` with ``log.synchronous: normal``, so no fsync) and two
trivial operations, each timed with the thread's CPU clock, 200 times

- back to back (hot),
- after a 50 ms sleep (what the loop does between turns), and
- after 50 ms of spinning in Python (the core stays busy: if this is as slow as after the
  sleep, the cost is the caches, not waking up).

The ratio cold / hot is the figure; the absolute numbers move with the machine.

    python bench/bench_cold_turn.py            # about 25 s
    python bench/bench_cold_turn.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from gateway.config import LogSection  # noqa: E402
from gateway.events import render  # noqa: E402
from gateway.log.store import LogStore, Message  # noqa: E402

PAUSE = 0.05


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(pause: Callable[[], None], turns: int) -> dict[str, float]:
    """Median thread CPU µs of each part of a commit of one message, ``pause`` before each."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        store = LogStore(LogSection(path=Path(tmp) / "log.db", synchronous="normal"), "gw",
                         ["uplink"], event_body=render)
        conn = store._conn   # the bench times the transaction's statements
        parts: dict[str, list[float]] = {}

        def timed(name: str, fn: Callable[[], object]) -> object:
            t0 = time.thread_time()
            out = fn()
            parts.setdefault(name, []).append((time.thread_time() - t0) * 1e6)
            return out

        for i in range(turns):
            now = time.time()
            msgs = [Message("sensors/d/telemetry", b'{"temp":21.5}', (i + 1) << 32,
                            [("d", now, {"temp": 21.5})], now)]
            pause()
            start = time.thread_time()
            timed("an empty call", lambda: None)
            timed("orjson.dumps of a reading",
                  lambda now=now: orjson.dumps({"seq": 1, "device": "d", "ts": now, "t": 1.5}))
            timed("zlib of 50 readings", lambda: zlib.compress(b'{"seq":1,"t":21.5}' * 50, 1))
            timed("BEGIN", lambda: conn.execute("BEGIN"))
            done = timed("inserts of one message", lambda msgs=msgs, now=now:
                         store._append.messages(
                             msgs, store.next_seq, now, Counter()))
            timed("COMMIT (no fsync)", lambda: conn.execute("COMMIT"))
            store.next_seq = done.next_seq  # type: ignore[attr-defined]
            parts.setdefault("the whole turn", []).append((time.thread_time() - start) * 1e6)
        store.close()
    return {name: statistics.median(values) for name, values in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 turns instead of 200")
    args = ap.parse_args()
    turns = 60 if args.quick else 200
    hot = measure(lambda: None, turns)
    slept = measure(lambda: time.sleep(PAUSE), turns)
    spun = measure(lambda: _spin(PAUSE), turns)
    print(f"Thread CPU µs, median of {turns} turns (cold: after a {PAUSE * 1000:.0f} ms pause)")
    print(f"{'part':28s} {'hot':>8s} {'slept':>8s} {'spun':>8s} {'slept/hot':>10s}")
    for name in hot:
        print(f"{name:28s} {hot[name]:8.1f} {slept[name]:8.1f} {spun[name]:8.1f} "
              f"{slept[name] / hot[name]:9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
