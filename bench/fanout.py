"""Fan-out benchmark: Herald's hub beside Flask-SocketIO, in one run, with the same client.

    python bench/fanout.py                          # 1,000, 5,000 and 10,000 connections
    python bench/fanout.py --sizes 1000 --quick --side herald

Each side is one gunicorn gevent worker holding N connections of one channel
(Herald) or room (Flask-SocketIO, gevent-websocket). Broadcasts go straight into
Redis pub/sub, no Kafka or Celery: for Herald the frame a worker publishes
(pipeline/store/lua/gate_pass.lua), for the peer its documented external emitter
(`RedisManager(write_only=True)`). The client is asyncio `websockets` without
compression, in a few processes. Server CPU is the worker's user+system time.
Prints JSON: per scenario both sides and the ratios herald/peer, and the
targets (docs/benchmarks.md) with their values and whether each is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its pipeline.py would hide the pipeline package

import redis
from websockets.asyncio.client import connect

from devtools import embedded
from pipeline.core.frames import message_frame_head
from pipeline.core.messages import Envelope, new_id
from pipeline.store.keys import Keys
from tests.harness import Stack, wait_until

CHANNEL = "bench.fanout"
BASE_MS = int(time.time() * 1000)  # stream ids above any real one: the channel has no history
# Broadcasts back to back per size, and 10 one second apart for latency.
BURSTS = {1000: 100, 5000: 40, 10000: 0}
LATENCY_BROADCASTS = 10
CONNECT_RATE = 2000.0  # connections opened a second, by all client processes together


# -- the client (child processes) ----------------------------------------------
async def _join_herald(ws, channel: str) -> None:
    json.loads(await ws.recv())  # `connected`
    await ws.send(json.dumps({"op": "subscribe", "channel": channel}))
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("op") == "subscribed":
            return
        if frame.get("op") == "error":
            raise ValueError(frame.get("code"))


async def _join_peer(ws, room: str) -> None:
    # Engine.IO v4 over a WebSocket: open packet "0{...}", Socket.IO connect "40",
    # then an event with ack id 1 ("421[...]"), acknowledged by "431[...]".
    if not (await ws.recv()).startswith("0"):
        raise ValueError("no Engine.IO open packet")
    await ws.send("40")
    if not (await ws.recv()).startswith("40"):
        raise ValueError("Socket.IO connect refused")
    await ws.send("421" + json.dumps(["join", room]))
    while not (await ws.recv()).startswith("431"):
        pass


class Tally:
    """What one client process received since the last `wait`."""

    def __init__(self, count: int):
        self.counts = [0] * count
        self.total = 0
        self.last = 0.0
        self.latencies: list[float] = []
        self.closed = 0

    def got(self, index: int, data: dict) -> None:
        """Count a broadcast at connection `index`."""
        now = time.time()
        self.counts[index] += 1
        self.total += 1
        self.last = now
        self.latencies.append(now - data["sent"])

    def reset(self) -> None:
        """Start the next phase."""
        self.counts = [0] * len(self.counts)
        self.total, self.last, self.latencies = 0, 0.0, []


def _why(exc: Exception) -> str:
    """A refusal's kind: the server's error code or close code, else the exception's name."""
    close = getattr(exc, "rcvd", None)  # websockets' ConnectionClosed: the server's close frame
    if close is not None:
        return f"closed {close.code}"
    return f"error {exc.args[0]}" if isinstance(exc, ValueError) and exc.args else type(exc).__name__


async def _read(ws, kind: str, index: int, tally: Tally) -> None:
    try:
        async for raw in ws:
            if kind == "herald":
                if raw.startswith('{"op":"message"'):
                    tally.got(index, json.loads(raw)["data"])
            elif raw.startswith("42"):
                tally.got(index, json.loads(raw[2:])[1])
            elif raw == "2":  # Engine.IO ping: unanswered, the server drops the client
                await ws.send("3")
    except Exception:
        pass
    tally.closed += 1


async def _client(pipe, kind: str, url: str, channel: str, count: int, offset: float, step: float) -> None:
    """Open `count` connections one `step` apart from the driver's start time plus `offset`,
    hold them, answer the driver."""
    join = _join_herald if kind == "herald" else _join_peer
    tally, errors, held, finished = Tally(count), {}, [], 0.0

    async def open_one(index: int) -> None:
        nonlocal finished
        try:
            ws = await connect(url, compression=None, ping_interval=None, open_timeout=60, max_queue=None)
            await asyncio.wait_for(join(ws, channel), 60)
        except Exception as exc:
            why = _why(exc)
            errors[why] = errors.get(why, 0) + 1
            return
        finished = time.time()
        held.append(asyncio.create_task(_read(ws, kind, index, tally)))

    loop = asyncio.get_running_loop()
    pipe.send("ready")
    start_at = await loop.run_in_executor(None, pipe.recv) + offset
    opening = []
    for index in range(count):
        await asyncio.sleep(max(0.0, start_at + index * step - time.time()))
        opening.append(asyncio.create_task(open_one(index)))
    await asyncio.gather(*opening)
    pipe.send({"ok": len(held), "refused": sum(errors.values()), "errors": errors, "finished": finished})
    while True:
        command, expected, timeout, latencies = await loop.run_in_executor(None, pipe.recv)
        if command == "stop":
            os._exit(0)  # the kernel closes the sockets at once; a close handshake each would take long
        deadline = time.monotonic() + timeout
        while tally.total < expected * len(held) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        pipe.send({"received": tally.total, "last": tally.last, "closed": tally.closed,
                   "short": sum(1 for n in tally.counts if n < expected) - (count - len(held)),
                   "latencies": tally.latencies if latencies else []})
        tally.reset()


def _client_process(*args) -> None:
    asyncio.run(_client(*args))


class Clients:
    """`processes` client processes sharing N connections to one server."""

    def __init__(self, kind: str, url: str, count: int, processes: int):
        ctx = multiprocessing.get_context("spawn")
        step = processes / CONNECT_RATE
        self.pipes, self.procs = [], []
        self.expected = 0  # connections subscribed: each should get every broadcast
        for p in range(processes):
            mine = count // processes + (p < count % processes)
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_process, daemon=True,
                               args=(theirs, kind, url, CHANNEL, mine, p / CONNECT_RATE, step))
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        for pipe in self.pipes:  # started and imported: the connection rate is not theirs to catch up
            pipe.recv()
        self.start_at = time.time()
        for pipe in self.pipes:
            pipe.send(self.start_at)

    def connected(self) -> dict:
        """Wait until every connection is subscribed or refused."""
        replies = [pipe.recv() for pipe in self.pipes]
        errors = sum((Counter(r["errors"]) for r in replies), Counter())
        self.expected = sum(r["ok"] for r in replies)
        return {"connected": self.expected, "refused": sum(r["refused"] for r in replies),
                "errors": errors, "connect_seconds": round(max(r["finished"] for r in replies) - self.start_at, 2)}

    def wait(self, expected: int, timeout: float, latencies: bool = False) -> dict:
        """Wait until each connection got `expected` broadcasts (or `timeout`); what they got."""
        for pipe in self.pipes:
            pipe.send(("wait", expected, timeout, latencies))
        replies = [pipe.recv() for pipe in self.pipes]
        return {"received": sum(r["received"] for r in replies), "last": max(r["last"] for r in replies),
                "short": sum(r["short"] for r in replies), "closed": sum(r["closed"] for r in replies),
                "latencies": [x for r in replies for x in r["latencies"]]}

    def stop(self) -> None:
        """End the client processes."""
        for pipe in self.pipes:
            pipe.send(("stop", 0, 0, False))
        for proc in self.procs:
            proc.join(30)


# -- the servers -----------------------------------------------------------------
def worker_pid(master: int) -> int:
    """The gunicorn worker of a master (there is one)."""
    def child():
        path = Path(f"/proc/{master}/task/{master}/children")
        return int(path.read_text().split()[0]) if path.exists() and path.read_text().split() else None
    return wait_until(child, 30, 0.1, "the gunicorn worker")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """A process's resident memory, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")


class HeraldSide:
    """A fresh Herald web process (one gevent worker) on the benchmark's stack; broadcasts are
    what a worker publishes after XADD: `<stream id>\\n<message frame>`."""

    name = "herald"

    def __init__(self, stack):
        self.stack, self.web = stack, stack.web(WEB_CONCURRENCY=1)
        self.pid = worker_pid(self.web.proc.proc.pid)
        self.url = f"ws://127.0.0.1:{self.web.port}/ws?token={stack.token('bench')}"
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.pubsub_channel = Keys(stack.settings.redis_prefix).message_channel(CHANNEL)
        self.seq = 0

    def broadcast(self, n: int) -> None:
        """Publish broadcast number `n`, as pipeline/store/lua/gate_pass.lua does."""
        self.seq += 1
        sid = f"{BASE_MS}-{self.seq}"
        envelope = Envelope(id=new_id(), channel=CHANNEL, type="message", data={"n": n, "sent": time.time()},
                            sender="bench", ts=int(time.time() * 1000))
        self.redis.publish(self.pubsub_channel, f'{sid}\n{message_frame_head(envelope)}{sid}"}}')

    def stop(self) -> None:
        """Stop the web process."""
        self.redis.close()
        self.web.proc.stop()


class PeerSide:
    """A fresh Flask-SocketIO server (bench/peers/socketio_app.py, gevent-websocket worker)."""

    name = "peer"

    def __init__(self, redis_url: str, workdir: Path):
        import socketio  # the `bench` extra: not needed for `--side herald`

        port, channel = embedded.free_port(), f"bench-socketio-{os.getpid()}"
        with open(workdir / "peer.log", "ab") as log:  # the server keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                 "-w", "1", "--worker-connections", "20000", "-b", f"127.0.0.1:{port}", "socketio_app:app"],
                cwd=ROOT / "bench" / "peers",  # not Herald's gunicorn.conf.py in ROOT
                env={**os.environ, "PEER_REDIS_URL": redis_url, "PEER_CHANNEL": channel},
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=embedded._die_with_parent,
                start_new_session=True)
        self.pid = worker_pid(self.proc.pid)
        wait_until(lambda: embedded.port_open("127.0.0.1", port), 30, 0.1, "the Flask-SocketIO server")
        self.url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        self.emitter = socketio.RedisManager(redis_url, channel=channel, write_only=True)

    def broadcast(self, n: int) -> None:
        """Emit broadcast number `n` to the room from outside the server."""
        self.emitter.emit("message", {"n": n, "sent": time.time()}, namespace="/", room=CHANNEL)

    def stop(self) -> None:
        """Stop the server."""
        self.proc.terminate()
        self.proc.wait(30)


# -- measuring -------------------------------------------------------------------------
def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (of a non-empty list)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def phase(side, clients: Clients, count: int, interval: float, timeout: float, latencies: bool) -> dict:
    """`count` broadcasts `interval` seconds apart; deliveries, missing ones, server CPU per delivery."""
    cpu, first = cpu_seconds(side.pid), time.time()
    for n in range(count):
        side.broadcast(n)
        if interval and n < count - 1:
            time.sleep(interval)
    got = clients.wait(count, timeout, latencies)
    cpu = cpu_seconds(side.pid) - cpu
    delivered = got["received"]
    out = {"broadcasts": count, "deliveries": delivered, "missing": clients.expected * count - delivered,
           "clients_short": got["short"], "closed_by_server": got["closed"], "server_cpu_s": round(cpu, 2),
           "server_cpu_us_per_delivery": round(cpu / delivered * 1e6, 2) if delivered else None}
    if not interval:  # from the first broadcast sent to the last delivery received
        out["deliveries_per_s"] = round(delivered / max(got["last"] - first, 1e-6))
    if latencies and delivered:  # from the time in the broadcast to its arrival
        out["latency_ms_p50"], out["latency_ms_p99"] = (round(percentile(got["latencies"], pct) * 1000, 1)
                                                        for pct in (50, 99))
    return out


def measure(side, size: int, bursts: int, latency: int, processes: int) -> dict:
    """Connect `size` clients to `side`, then the bursts and the latency phase."""
    before = rss_kib(side.pid)
    cpu = cpu_seconds(side.pid)
    clients = Clients(side.name, side.url, size, processes)
    try:
        result = clients.connected()
        # The server's own cost of a connect and subscribe: on a shared machine
        # the wall time says as much about the client processes.
        result["connect_cpu_ms_per_connection"] = round((cpu_seconds(side.pid) - cpu) * 1000
                                                        / max(1, result["connected"]), 3)
        time.sleep(2)  # let the connections settle before reading memory
        after = rss_kib(side.pid)
        result.update(rss_mib_before=round(before / 1024, 1), rss_mib_after=round(after / 1024, 1),
                      rss_kib_per_connection=round((after - before) / max(1, result["connected"]), 1))
        phase(side, clients, 1, 0, 30, False)  # warm-up: first broadcast, lazily made objects
        if bursts:
            result["burst"] = phase(side, clients, bursts, 0, 180, False)
        if latency:
            result["per_second"] = phase(side, clients, latency, 1.0, 60, True)
        return result
    finally:
        clients.stop()


RATIOS = {  # herald / peer, for each figure both sides have
    "connect_seconds": ("connect_seconds",), "rss_kib_per_connection": ("rss_kib_per_connection",),
    "connect_cpu_ms_per_connection": ("connect_cpu_ms_per_connection",),
    "burst_deliveries_per_s": ("burst", "deliveries_per_s"),
    "burst_cpu_us_per_delivery": ("burst", "server_cpu_us_per_delivery"),
    "per_second_cpu_us_per_delivery": ("per_second", "server_cpu_us_per_delivery"),
    "per_second_latency_ms_p99": ("per_second", "latency_ms_p99"),
}


def _get(result: dict | None, path) -> float | None:
    for key in path:
        result = (result or {}).get(key)
    return result


def ratios(herald: dict | None, peer: dict | None) -> dict:
    """herald / peer for each figure both sides measured."""
    out = {}
    for name, path in RATIOS.items():
        h, p = _get(herald, path), _get(peer, path)
        if h is not None and p:
            out[name] = round(h / p, 2)
    return out


def targets(scenarios: dict) -> list[dict]:
    """The targets (docs/benchmarks.md) this run measured: each with its value, limit and whether it is met."""
    out = []

    def target(name: str, value, limit: float, below: bool = True, condition: bool = True):
        if value is not None:
            out.append({"target": name, "value": value, "limit": limit,
                        "met": condition and (value <= limit if below else value >= limit)})

    for size in BURSTS:
        r = scenarios.get(size, {}).get("ratios", {})
        target(f"burst CPU/delivery vs peer at {size}", r.get("burst_cpu_us_per_delivery"), 0.5)
        target(f"deliveries/s vs peer at {size}", r.get("burst_deliveries_per_s"), 1.0, below=False)
        target(f"CPU/delivery vs peer at 1 broadcast/s, {size}", r.get("per_second_cpu_us_per_delivery"), 1.0)
    big = scenarios.get(10000, {})
    herald = big.get("herald") or {}
    target("KiB RSS per idle subscribed connection at 10,000", herald.get("rss_kib_per_connection"), 30)
    target("p99 ms at 10,000 subscribers, 1 broadcast/s", _get(herald, ("per_second", "latency_ms_p99")), 250)
    if herald:
        target("connections refused of 10,000 at 2,000/s", herald["refused"], 0)
    # The time counts only when every connection got in.
    target("connect time vs peer, 10,000 at 2,000/s, none refused", big.get("ratios", {}).get("connect_seconds"),
           1.5, condition=herald.get("refused") == 0)
    return out


def main() -> None:
    """Parse the arguments, run the scenarios side by side, print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="connections per scenario (1000, 5000, 10000)")
    parser.add_argument("--side", choices=("both", "herald", "peer"), default="both")
    parser.add_argument("--quick", action="store_true", help="a tenth of the bursts, 3 broadcasts for latency")
    parser.add_argument("--client-processes", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    unknown = set(sizes) - set(BURSTS)
    if unknown:
        parser.error(f"sizes are among {sorted(BURSTS)}, not {sorted(unknown)}")
    # One descriptor a connection, in the servers and in the clients (inherited).
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    workdir = Path(tempfile.mkdtemp(prefix="herald-fanout-"))
    # Tansu too: the web process checks its topics at start, though the hub never uses Kafka.
    stack = Stack(workdir, own_redis=True, HERALD_WS_MAX_PER_USER=1_000_000, HERALD_WS_MAX_PER_IP=1_000_000)
    sides = {"herald": lambda: HeraldSide(stack), "peer": lambda: PeerSide(stack.redis_url, workdir)}
    chosen = [name for name in sides if args.side in ("both", name)]
    scenarios: dict = {}
    try:
        for size in sizes:
            bursts = BURSTS[size] // 10 if args.quick else BURSTS[size]
            latency = 3 if args.quick else LATENCY_BROADCASTS
            scenario = scenarios[size] = {}
            for name in chosen:  # each side on a fresh server: memory is measured from its start
                side = sides[name]()
                try:
                    scenario[name] = measure(side, size, bursts, latency, args.client_processes)
                finally:
                    side.stop()
            scenario["ratios"] = ratios(scenario.get("herald"), scenario.get("peer"))
    finally:
        stack.stop()
    print(json.dumps({
        "connections_opened_per_s": CONNECT_RATE, "client_processes": args.client_processes,
        "cpus": os.cpu_count(), "quick": args.quick,
        "peer": {name: version(name) for name in ("flask-socketio", "python-socketio", "python-engineio",
                                                   "gevent-websocket")},
        "client": f"websockets {version('websockets')}",
        "scenarios": {str(size): result for size, result in scenarios.items()},
        "targets": targets(scenarios),
    }, indent=1))


if __name__ == "__main__":
    main()
