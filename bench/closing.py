"""10,000 sockets closing at once, to a real webhook receiver: batches and drain rate.

    python bench/closing.py [-n 10000] [--channels 1000]

Starts a stack (bench/stack.py: Tansu, Redis, a worker, the bridge, one web
process) whose HERALD_WEBHOOK_URL is a receiver in this process, opens `-n`
WebSockets, each subscribed to one of `--channels` channels, then drops every
one of them at once (the TCP connection ends: code 1006, as when a network or
a client machine goes). The web process appends `connection.closed` for each,
`presence.leave` for each user and `channel.vacated` for each channel (the
grace is 0 here, so that the drain is measured and not the grace); the
receiver counts them. Printed: events expected and received, POSTs, events
per POST (min, mean), the drain rate (events/s, from the first close to the
last event received) and the web process's CPU for the closes. The same run
on a stack without a receiver is the peer: the ratio of the web's CPU for
the closes says what the events cost it. Targets (issue 22): at least 100
events a POST, at least 2,000 events/s. Prints one JSON object.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import gevent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from connections import Client, cpu_seconds, open_all  # bench/connections.py, imported once gevent patched

from tests.receivers import Receiver

SECRET = "webhook-secret-for-the-benchmark-0123456"
LIMITS = ["HERALD_WS_MAX_PER_USER=1000000", "HERALD_WS_MAX_PER_IP=1000000", "HERALD_PRESENCE_GRACE=0"]


def run(count: int, channels: int, receiver: Receiver | None) -> dict:
    """One stack, `count` sockets opened and dropped; the figures."""
    env = [*LIMITS]
    if receiver is not None:
        env += [f"HERALD_WEBHOOK_URL={receiver.url} connection.*,presence.leave,channel.vacated",
                f"HERALD_WEBHOOK_SECRET={SECRET}"]
    stack = subprocess.Popen([sys.executable, str(Path(__file__).with_name("stack.py")), *env],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(stack.stdout.readline())
        return _measure(info, count, channels, receiver)
    finally:
        stack.stdin.close()
        stack.wait(60)


def _measure(info: dict, count: int, channels: int, receiver: Receiver | None) -> dict:
    host = info["url"].split("://", 1)[1]
    tag = uuid.uuid4().hex[:6]
    stats = {"delivered": 0, "failed": 0, "retried": 0, "closed": 0, "latencies": [], "last": 0.0}
    clients = [Client(f"ws://{host}/ws?token={info['token']}", f"close:{tag}-{n % channels}", stats)
               for n in range(count)]
    connected, readers = open_all(clients, stats)
    gevent.sleep(2)
    before = len(receiver.events()) if receiver else 0
    cpu = cpu_seconds(info["pid"])
    started = time.time()
    for client in connected:
        # The connection just ends, as a client machine or its network goes.
        client.sock.sock.shutdown(socket.SHUT_RDWR)
        client.sock.sock.close()
    figures: dict = {"sockets": len(connected), "failed_connects": stats["failed"]}
    expected = 0
    if receiver is not None:
        # One token, one user: a channel's last socket is its user's last leave and its vacate.
        expected = len(connected) + 2 * min(channels, len(connected))
        deadline = time.monotonic() + 300
        while len(receiver.events()) - before < expected and time.monotonic() < deadline:
            gevent.sleep(0.05)
        posts = [p for p in receiver.accepted() if p.at >= started]
        sizes = [len(p.events) for p in posts]
        last = max(p.at for p in posts) if posts else started
        received = len(receiver.events()) - before
        figures.update({"events_expected": expected, "events_received": received, "posts": len(posts),
                        "per_post_min": min(sizes) if sizes else 0,
                        "per_post_mean": round(statistics.mean(sizes), 1) if sizes else 0,
                        "drain_seconds": round(last - started, 3),
                        "events_per_s": round(received / max(last - started, 1e-9))})
    else:
        gevent.sleep(5)  # the closes' work done, as the run with a receiver waits for its events
    figures["web_cpu_seconds_for_closes"] = round(cpu_seconds(info["pid"]) - cpu, 2)
    gevent.killall(readers, timeout=5)
    return figures


def main() -> None:
    """Run with a receiver, then the peer without one; print the figures and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--sockets", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=1000)
    args = parser.parse_args()
    receiver = Receiver().start()
    try:
        hooked = run(args.sockets, args.channels, receiver)
    finally:
        receiver.stop()
    peer = run(args.sockets, args.channels, None)
    ratio = hooked["web_cpu_seconds_for_closes"] / max(peer["web_cpu_seconds_for_closes"], 0.01)
    print(json.dumps({"with_webhooks": hooked, "without_webhooks_peer": peer,
                      "web_cpu_ratio_with_over_without": round(ratio, 2),
                      "targets": {"per_post_mean": 100, "events_per_s": 2000}}, indent=2))


if __name__ == "__main__":
    main()
