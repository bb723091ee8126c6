"""Webhook batching and drain rate: a burst of events to a real local receiver.

    python bench/webhooks.py [--events 10000]

Starts Redis, Tansu, a worker and the bridge with one webhook receiver (an
HTTP server in this process), appends `--events` events at once with
`Outbox.emit` (as as many WebSockets closing together would: one
`connection.closed` each) and measures, until the receiver has them all:
events per POST (min, mean) and the drain rate (events/s, from the first
append to the last event received). The same burst is then drained by a
worker and bridge started with HERALD_WEBHOOK_BATCH=1 (one event a POST,
the peer), and the ratio printed. Targets (issue 22): at least 100 events a
POST, at least 2,000 events/s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.events import event
from pipeline.store import Store, connect
from pipeline.webhooks import Outbox
from tests.harness import Stack, wait_until
from tests.receivers import Receiver

EMIT_CHUNK = 1000  # events a pipeline appends (a burst of closes comes from many processes at once)


def drain(stack: Stack, receiver: Receiver, count: int, **env) -> dict:
    """Start a worker and the bridge (with `env`), append `count` events, wait until the receiver
    has them; then stop both. The figures of that drain."""
    worker, bridge = stack.worker(f"worker{len(stack.procs)}", **env), stack.bridge(f"bridge{len(stack.procs)}", **env)
    store = Store(connect(stack.settings), stack.settings)
    outbox = Outbox(store, stack.settings)
    before = len(receiver.accepted())
    started = time.monotonic()
    for first in range(0, count, EMIT_CHUNK):
        pipe = store.redis.pipeline(transaction=False)
        outbox.emit([event("connection.closed", code=1001, user=f"u{n}", node="bench")
                     for n in range(first, min(count, first + EMIT_CHUNK))], pipe)
        pipe.execute()

    def received() -> int:
        return sum(len(p.events) for p in receiver.accepted()[before:])
    wait_until(lambda: received() >= count, 600, interval=0.01, what=f"{count} events")
    seconds = time.monotonic() - started
    sizes = [len(p.events) for p in receiver.accepted()[before:]]
    for proc in (bridge, worker):
        proc.stop(10)
    return {"events": received(), "posts": len(sizes), "per_post_min": min(sizes),
            "per_post_mean": round(statistics.mean(sizes), 1), "seconds": round(seconds, 3),
            "events_per_s": round(count / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    receiver = Receiver().start()
    with tempfile.TemporaryDirectory() as workdir:
        stack = Stack(Path(workdir), HERALD_WEBHOOK_URL=f"{receiver.url} connection.*",
                      HERALD_WEBHOOK_SECRET="webhook-secret-for-the-benchmark-0123456")
        try:
            batched = drain(stack, receiver, args.events)
            one = drain(stack, receiver, args.events, HERALD_WEBHOOK_BATCH=1)
        finally:
            stack.stop()
            receiver.stop()
    print(json.dumps({"batched": batched, "batch_1_peer": one,
                      "drain_ratio": round(batched["events_per_s"] / one["events_per_s"], 1),
                      "targets": {"per_post_mean": 100, "events_per_s": 2000}}, indent=2))


if __name__ == "__main__":
    main()
