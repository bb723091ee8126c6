"""WebSocket scale benchmark: N connections to one web process, then broadcasts to them.

    python bench/connections.py --spawn -n 1000 --messages 20
    python bench/connections.py --url http://127.0.0.1:8000 --token T --pid WEB_WORKER_PID -n 5000

Prints connections held, the web process's RSS per connection, deliveries/s
and delivery latency p50/p99 (from the POST to the frame at the client), and
the web process's CPU time per delivery: on one machine the client competes
with the server for the cores, so deliveries/s says as much about the client.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import gevent
import gevent.lock
import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def family(pid: int) -> list[int]:
    """A process and its children (gunicorn's master and its worker)."""
    try:
        return [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its children."""
    ticks = 0
    for one in family(pid):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the gunicorn worker), in KiB."""
    total = 0
    for one in family(pid):
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def percentile(values, pct):
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


class Client:
    """One subscriber connection, counting the message frames it gets."""

    def __init__(self, url: str, channel: str, stats: dict):
        self.url, self.channel, self.stats = url, channel, stats
        self.sock = None

    def connect(self) -> bool:
        """Connect and subscribe, retrying a subscribe the server answers `unavailable` (as clients do)."""
        try:
            self.sock = websocket.create_connection(self.url, timeout=30)
            json.loads(self.sock.recv())
            for attempt in range(8):
                self.sock.send(json.dumps({"op": "subscribe", "channel": self.channel}))
                reply = self._reply()
                if reply.get("op") == "subscribed":
                    return True
                self.stats["retried"] += 1
                gevent.sleep(0.25 * 2 ** attempt)
        except (OSError, websocket.WebSocketException, ValueError):
            pass
        self.stats["failed"] += 1
        return False

    def _reply(self) -> dict:
        while True:
            frame = json.loads(self.sock.recv())
            if frame.get("op") in ("subscribed", "error"):
                return frame

    def read(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                raw = self.sock.recv()
            except (OSError, websocket.WebSocketException):
                self.stats["closed"] += 1
                return
            if not raw:  # the socket was closed under us
                return
            frame = json.loads(raw)
            if frame.get("op") == "message":
                now = time.time()
                self.stats["latencies"].append(now - frame["data"]["sent"])
                self.stats["delivered"] += 1
                self.stats["last"] = now


def open_all(clients: list[Client], stats: dict) -> tuple[list[Client], list]:
    """Connect `clients` in waves of 200 (within the listen backlog), each reading from the
    moment it is subscribed; returns (the connected ones, their readers) once each connected
    or failed."""
    gate = gevent.lock.BoundedSemaphore(200)
    connected: list[Client] = []

    def connect_and_read(client: Client) -> None:
        # A client that leaves the server's pings unanswered while the others connect is dropped.
        with gate:
            ok = client.connect()
        if ok:
            connected.append(client)
            client.read()

    readers = [gevent.spawn(connect_and_read, c) for c in clients]
    while len(connected) + stats["failed"] < len(clients):
        gevent.sleep(0.1)
    return connected, readers


def run(base: str, token: str, pid: int | None, count: int, channels: int, messages: int, interval: float):
    """Open, subscribe, broadcast, measure; returns the figures."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    url = f"ws://{parts.netloc}/ws?token={token}"
    tag = uuid.uuid4().hex[:6]
    names = [f"bench:{tag}-{i}" for i in range(channels)]
    stats = {"delivered": 0, "failed": 0, "retried": 0, "closed": 0, "latencies": [], "last": 0.0}
    before = rss_kb(pid) if pid else None
    clients = [Client(url, names[i % channels], stats) for i in range(count)]
    started = time.monotonic()
    connected, readers = open_all(clients, stats)
    connect_seconds = time.monotonic() - started
    gevent.sleep(2)
    after = rss_kb(pid) if pid else None

    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    first_sent = time.time()
    cpu_before = cpu_seconds(pid) if pid else None
    for n in range(messages):
        body = json.dumps({"messages": [{"channel": name, "data": {"n": n, "sent": time.time()}} for name in names]})
        conn.request("POST", "/api/v1/messages/batch", body, {"Content-Type": "application/json",
                                                               "Authorization": f"Bearer {token}"})
        conn.getresponse().read()
        gevent.sleep(interval)
    expected = len(connected) * messages
    deadline = time.monotonic() + 120
    while stats["delivered"] < expected and time.monotonic() < deadline:
        gevent.sleep(0.2)
    elapsed = max(stats["last"] - first_sent, 1e-9)
    web_cpu = cpu_seconds(pid) - cpu_before if pid else None
    for c in connected:
        c.sock.close()
    gevent.killall(readers, timeout=5)
    return {
        "connections": len(connected), "failed": stats["failed"], "subscribe_retries": stats["retried"],
        "connect_seconds": round(connect_seconds, 1),
        "rss_mb_before": round(before / 1024, 1) if before else None,
        "rss_mb_after": round(after / 1024, 1) if after else None,
        "rss_kb_per_connection": round((after - before) / max(1, len(connected)), 1) if pid else None,
        "messages": messages, "channels": channels, "deliveries": stats["delivered"], "expected": expected,
        "deliveries_per_s": round(stats["delivered"] / elapsed, 1),
        # The benchmark client shares the machine: the web process's own cost per delivery
        # says what a web process could do with the cores to itself.
        "web_cpu_seconds": round(web_cpu, 2) if pid else None,
        "deliveries_per_web_cpu_second": round(stats["delivered"] / web_cpu) if pid and web_cpu else None,
        "latency_ms_p50": round(percentile(stats["latencies"], 50) * 1000, 1),
        "latency_ms_p99": round(percentile(stats["latencies"], 99) * 1000, 1),
        "closed_by_server": stats["closed"],
    }


def main() -> None:
    """Parse arguments, optionally start a stack, run and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", default="")
    parser.add_argument("--pid", type=int, default=None, help="web process to measure (its children included)")
    parser.add_argument("-n", "--connections", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=1, help="1 = every connection on one channel")
    parser.add_argument("--messages", type=int, default=20, help="broadcasts per channel")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between broadcasts")
    parser.add_argument("--spawn", action="store_true", help="start Tansu, Redis and Herald here first")
    args = parser.parse_args()
    stack = None
    try:
        if args.spawn:
            # The stack runs in its own, unpatched process (bench/stack.py).
            stack = subprocess.Popen([sys.executable, str(Path(__file__).with_name("stack.py")),
                                      "HERALD_WS_MAX_PER_USER=1000000", "HERALD_WS_MAX_PER_IP=1000000"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            info = json.loads(stack.stdout.readline())
            args.url, args.token, args.pid = info["url"], info["token"], info["pid"]
        print(json.dumps(run(args.url, args.token, args.pid, args.connections, args.channels, args.messages,
                             args.interval)))
    finally:
        if stack is not None:
            stack.stdin.close()
            stack.wait(60)

if __name__ == "__main__":
    main()
