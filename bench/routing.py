"""What each web process receives from Redis pub/sub when its clients hold only some channels.

    python bench/routing.py --webs 4 --channels 1000 --messages 5

Starts Redis, Tansu and `--webs` web processes; one WebSocket client per
process subscribes to its share of `--channels` (each channel held by exactly
one process), then `--messages` messages per channel are delivered straight
into Redis (the worker's Lua script, no Kafka or Celery). Prints, as JSON, the
pub/sub messages each process's listener received
(`herald_hub_pubsub_messages_total`) and what its clients were sent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.messages import parse_publish
from tests.harness import Stack, wait_until


def received(web) -> int:
    """The web process's count of pub/sub messages its listener received."""
    text = web.request("GET", "/metrics")[2]
    return int(float(re.search(r"^herald_hub_pubsub_messages_total (\S+)$", text, re.M).group(1)))


def main() -> None:
    """Run the measurement and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webs", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5, help="per channel")
    args = parser.parse_args()
    share = -(-args.channels // args.webs)
    stack = Stack(Path(tempfile.mkdtemp(prefix="herald-routing-")),
                  HERALD_WS_MAX_SUBSCRIPTIONS=share, HERALD_WS_RATE=share)
    clients = []
    try:
        webs = [stack.web(f"web{n}") for n in range(args.webs)]
        channels = [f"bench:{n}" for n in range(args.channels)]
        holders = {}
        for n, web in enumerate(webs):
            client = web.ws(stack.token())
            client.recv()
            clients.append(client)
            for channel in channels[n::args.webs]:
                client.subscribe(channel)
                holders[channel] = n
        before = [received(web) for web in webs]
        store = stack.store()
        started = time.monotonic()
        for _ in range(args.messages):
            store.deliver([parse_publish({"channel": c, "data": 1}, sender="bench") for c in channels])
        total = args.channels * args.messages
        sent_to_clients = []
        for client in clients:
            expected = sum(1 for n in holders.values() if clients[n] is client) * args.messages
            frames = [client.expect(lambda f: f["op"] == "message", timeout=60) for _ in range(expected)]
            sent_to_clients.append(len(frames))
        wait_until(lambda: sum(received(w) for w in webs) - sum(before) >= total, 30, what="the listeners")
        time.sleep(0.5)  # anything beyond a process's share would show by now
        per_process = [received(web) - b for web, b in zip(webs, before)]
        print(json.dumps({
            "web_processes": args.webs, "channels": args.channels, "messages_published": total,
            "seconds_to_deliver": round(time.monotonic() - started, 2),
            "pubsub_messages_received_per_process": per_process,
            "frames_sent_to_clients_per_process": sent_to_clients,
            # Every process PSUBSCRIBEd to `:m:*` and `:s:*` received each message and its status frame.
            "before_issue_10_each_process_received": 2 * total,
        }))
    finally:
        for client in clients:
            client.close()
        stack.stop()


if __name__ == "__main__":
    main()
