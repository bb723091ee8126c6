"""The occupancy leaves of a burst of closing sockets: batched as the hub batches them, beside
one round trip a leave (the baseline), in the same run.

    python bench/occupancy.py [--sockets 10000]

Starts a Redis, counts `--sockets` subscriptions (each its own user, half of them on one
shared channel, half alone in a channel), then takes them off as 10,000 sockets closing
at once do: in calls of 500 (web/hub/batch.py's MAX_BATCH), and again one call a leave.
HERALD_PRESENCE_GRACE=0, so every leave and vacate is appended to the event stream.
Prints one JSON object: leaves/s and round trips of each, their ratio, and the events
appended.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools import embedded
from pipeline.core.settings import Settings
from pipeline.store import Store, connect
from pipeline.webhooks import Outbox
from tests.harness import SECRET
from web.hub.batch import MAX_BATCH
from web.hub.occupancy import Occupancy


def run(occupancy: Occupancy, sockets: int, batch: int) -> dict:
    calls = [(f"socket{n}", f"room:{n}" if n % 2 else "room:shared", f"user{n}") for n in range(sockets)]
    for start in range(0, sockets, MAX_BATCH):
        occupancy.join_all(calls[start:start + MAX_BATCH])
    leaves = [(client, user, [channel], None) for client, channel, user in calls]
    started, trips = time.perf_counter(), 0
    for start in range(0, sockets, batch):
        occupancy.leave_all(leaves[start:start + batch])
        trips += 1
    elapsed = time.perf_counter() - started
    return {"leaves_per_s": round(sockets / elapsed), "round_trips": trips, "seconds": round(elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sockets", type=int, default=10_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = embedded.redis_server(embedded.free_port(), f"{workdir}/redis.log").start()
        try:
            settings = Settings.from_env({"REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
                                          "HERALD_SECRET_KEY": SECRET, "HERALD_PRESENCE_GRACE": "0",
                                          "HERALD_REDIS_PREFIX": f"b{uuid.uuid4().hex[:6]}",
                                          "HERALD_WEBHOOK_URL": "http://127.0.0.1:9/hook",
                                          "HERALD_WEBHOOK_SECRET": "s" * 40})
            store = Store(connect(settings), settings)
            occupancy = Occupancy(store, Outbox(store, settings), settings, "bench")
            batched = run(occupancy, options.sockets, MAX_BATCH)
            one_by_one = run(occupancy, options.sockets, 1)
            events = store.redis.xlen(store.keys.events)
        finally:
            server.stop()
    print(json.dumps({"sockets": options.sockets, "batched": batched, "one_by_one": one_by_one,
                      "ratio": round(batched["leaves_per_s"] / one_by_one["leaves_per_s"], 1),
                      "events_appended": events}))


if __name__ == "__main__":
    main()
