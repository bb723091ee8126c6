"""Pipeline benchmark: each stage alone, then the whole, side by side with a bare Kafka hop (docs/benchmarks.md).

    python bench/pipeline.py            # short run, a few minutes
    python bench/pipeline.py --full     # the sizes of docs/benchmarks.md

Stages, each on a stack of its own (own Tansu, Redis, fresh topic):
ingest (web alone, 2 gevent workers, driven by wrk from another process:
`GET /healthz`, single POSTs, batch POSTs, and single POSTs with the rate
limits at their defaults beside a web process with them off); processing (a backlog preloaded
through the batch API, then the bridge and a worker started: first to last
delivery); end to end (single POSTs at a fixed rate, POST to WebSocket frame);
the bare Kafka hop (a producer to a consumer group on the same Tansu, same
rate); overload (bench/overload.py: single POSTs at twice the processing
capacity measured in the same run, then batches at 7,000 msg/s; delivered
rates beside that capacity). Prints one JSON object, with the CPU seconds each process spent per
message (utime + stime from /proc). Figures are only as steady as the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

# This file's directory leaves the path: its name would shadow the `pipeline`
# package, a namespace package that any module of the same name beats.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.e2e import percentile
from bench.e2e import run as run_e2e
from bench.overload import overload
from tests.harness import Stack

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def family(pid: int) -> list[int]:
    """A process and its descendants (gunicorn and Celery fork their workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


class CpuMeter:
    """CPU seconds spent by named process families between `start()` and `stop()`."""

    def __init__(self, roots: dict[str, int]):
        self.pids = {name: family(pid) for name, pid in roots.items()}
        self.before: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}

    def start(self) -> None:
        """Take the first sample."""
        self.before = self._sample()

    def per_message(self, messages: int) -> dict[str, float]:
        """Microseconds of CPU per message of each family since `start()`."""
        after = self._sample()
        return {f"{name}_cpu_us_per_msg": round((after[name] - self.before[name]) / max(1, messages) * 1e6, 1)
                for name in after}


def services(stack: Stack) -> dict[str, int]:
    """The stack's own Redis and Tansu processes, when it started them (their CPU counts too)."""
    return {name: server.proc.pid for name, server in (("redis", stack.redis), ("kafka", stack.kafka))
            if server is not None}


def wrk(url: str, seconds: float, connections: int, method: str = "GET", body: str = "", token: str = "") -> dict:
    """Drive `url` with wrk from its own process; returns requests/s, latency p50/p99 and failures."""
    script = f"""
wrk.method = {json.dumps(method)}
wrk.body = {json.dumps(body)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {json.dumps("Bearer " + token)}
done = function(summary, latency, requests)
  io.write(string.format('RESULT {{"requests": %d, "seconds": %.3f, "failed": %d, "p50_ms": %.2f, "p99_ms": %.2f}}\\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "-s", fh.name, url],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(fh.name)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["per_s"] = round(result["requests"] / result["seconds"], 1)
    return result


def new_stack(**env) -> Stack:
    """A stack of its own, with the default partition count (the test harness uses 4)."""
    return Stack(Path(tempfile.mkdtemp(prefix="herald-bench-")), HERALD_TOPIC_PARTITIONS=12, **env)


def ingest(args) -> dict:
    """The web alone (2 gevent workers): /healthz, single POSTs, batch POSTs."""
    stack = new_stack()
    try:
        web = stack.web(WEB_CONCURRENCY=2)
        token = stack.token()
        cpu = CpuMeter({"web": web.proc.proc.pid, **services(stack)})
        cpu.start()
        out = {"healthz": wrk(web.base + "/healthz", args.seconds, args.connections)}
        out["healthz"].update(cpu.per_message(out["healthz"]["requests"]))
        single = json.dumps({"channel": "bench:single", "data": {"n": 1}})
        cpu.start()
        out["single_post"] = wrk(web.base + "/api/v1/messages", args.seconds, args.connections, "POST", single, token)
        out["single_post"].update(cpu.per_message(out["single_post"]["requests"]))
        out["single_post"]["of_healthz"] = round(out["single_post"]["per_s"] / out["healthz"]["per_s"], 3)
        out["rate_limits"] = limits_cost(stack, web, args, single, token)
        batch = json.dumps({"messages": [{"channel": f"bench:b{i % 100}", "data": {"n": i}}
                                         for i in range(args.batch)]})
        cpu.start()
        # Fewer connections: each call holds `batch` messages.
        result = wrk(web.base + "/api/v1/messages/batch", args.seconds, max(2, args.connections // 8), "POST",
                     batch, token)
        result["msg_per_s"] = round(result["per_s"] * args.batch, 1)
        result.update(cpu.per_message(result["requests"] * args.batch))
        out[f"batch_post_{args.batch}"] = result
        return out
    finally:
        stack.stop()


def limits_cost(stack: Stack, limited, args, body: str, token: str) -> dict:
    """Single POSTs with the default rate limits (two counters in Redis a request) and on
    a web process with them off, alternated twice: the best rate of each, the web and
    Redis CPU per request of that run, and the ratios."""
    unlimited = stack.web("web-unlimited", WEB_CONCURRENCY=2, HERALD_RATE_LIMITS="off")
    try:
        best: dict[str, dict] = {}
        for _ in range(2):
            for side, web in (("defaults", limited), ("off", unlimited)):
                cpu = CpuMeter({"web": web.proc.proc.pid, **services(stack)})
                cpu.start()
                result = wrk(web.base + "/api/v1/messages", args.seconds, args.connections, "POST", body, token)
                if result["failed"]:
                    raise RuntimeError(f"{result['failed']} POSTs failed with rate limits {side}")
                result.update(cpu.per_message(result["requests"]))
                if result["per_s"] > best.get(side, {}).get("per_s", 0):
                    best[side] = result
        out = {f"{side}_{key}": best[side][key] for side in best
               for key in ("per_s", "web_cpu_us_per_msg", "redis_cpu_us_per_msg")}
        out["defaults_of_off_per_s"] = round(best["defaults"]["per_s"] / best["off"]["per_s"], 3)
        out["defaults_of_off_web_cpu"] = round(best["defaults"]["web_cpu_us_per_msg"]
                                               / best["off"]["web_cpu_us_per_msg"], 3)
        return out
    finally:
        unlimited.proc.stop()


def deliveries(stack: Stack):
    """A pub/sub on every channel's `message` frames (the worker publishes one per delivery)."""
    client = redis.Redis.from_url(stack.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(stack.store().keys.message_channel("*"))
    return pubsub


def processing(args) -> dict:
    """A preloaded backlog, then the bridge and a worker (as the Procfile starts them)."""
    stack = new_stack()
    try:
        web = stack.web(WEB_CONCURRENCY=2)
        token = stack.token()
        for start in range(0, args.backlog, 1000):
            items = [{"channel": f"bench:p{n % args.channels}", "data": {"n": n}}
                     for n in range(start, min(start + 1000, args.backlog))]
            status, _, body = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token,
                                          timeout=60)
            assert status == 202 and all(r.get("status") == "accepted" for r in body["results"]), body
        pubsub = deliveries(stack)
        worker = stack.worker()
        started = time.perf_counter()  # start-up is the bridge's: joining its consumer group
        bridge = stack.bridge(wait=False)
        first = last = None
        seen = 0
        cpu = None
        deadline = time.perf_counter() + 120 + args.backlog / 1000
        while seen < args.backlog and time.perf_counter() < deadline:
            if pubsub.get_message(timeout=1.0) is None:
                continue
            last = time.perf_counter()
            seen += 1
            if first is None:
                first = last
                cpu = CpuMeter({"bridge": bridge.proc.pid, "worker": worker.proc.pid, **services(stack)})
                cpu.start()
        out = {"messages": args.backlog, "channels": args.channels, "delivered": seen,
               "first_delivery_s": round(first - started, 2) if first else None,
               "msg_per_s": round((seen - 1) / (last - first), 1) if first and last > first else None}
        if cpu:
            out.update(cpu.per_message(seen - 1))
        pubsub.close()
        return out
    finally:
        stack.stop()


def end_to_end(args, rate: float) -> dict:
    """Single POSTs at `rate` for the e2e duration, POST to WebSocket frame."""
    stack = new_stack()
    try:
        worker = stack.worker()
        bridge = stack.bridge()
        web = stack.web(WEB_CONCURRENCY=2)
        token = stack.token()
        run_e2e(web.base, token, 50, 2, 4, 4)  # warm-up: producers, the group, worker pools
        cpu = CpuMeter({"web": web.proc.proc.pid, "bridge": bridge.proc.pid, "worker": worker.proc.pid,
                        **services(stack)})
        cpu.start()
        out = run_e2e(web.base, token, rate, args.e2e_seconds, 20, max(16, int(rate // 60)))
        out.update(cpu.per_message(out["accepted"]))
        return out
    finally:
        stack.stop()


def kafka_hop(bootstrap: str, rate: float, seconds: float) -> dict:
    """A confluent-kafka producer to a consumer group on a fresh 12-partition topic; latency p50/p99."""
    topic, group = f"bench.hop.{uuid.uuid4().hex[:8]}", f"hop-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 12, 1)])[topic].result(30)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "fetch.wait.max.ms": 5, "partition.assignment.strategy": "range"})
    assigned = threading.Event()
    consumer.subscribe([topic], on_assign=lambda *_: assigned.set())
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})
    latencies, done = [], threading.Event()

    def consume():
        # poll() returns as soon as a record is there; consume(n, timeout) would hold each
        # record until n arrived or the timeout passed, adding that wait to every latency.
        while not done.is_set():
            record = consumer.poll(0.05)
            if record is not None and not record.error():
                latencies.append(time.time() - float(record.value()))

    while not assigned.is_set():
        consumer.poll(0.1)
    thread = threading.Thread(target=consume)
    thread.start()
    for n in range(50):  # warm-up: a new idempotent producer's first messages are slow
        producer.produce(topic, key=str(n), value=str(time.time() + 1e9))
    producer.flush(10)
    interval, count = 1 / rate, int(rate * seconds)
    next_at = time.perf_counter()
    for n in range(count):
        time.sleep(max(0.0, next_at - time.perf_counter()))
        producer.produce(topic, key=str(n), value=str(time.time()))
        producer.poll(0)
        next_at += interval
    producer.flush(10)
    deadline = time.monotonic() + 10
    while sum(1 for x in latencies if x >= 0) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join()
    consumer.close()
    measured = [x for x in latencies if x >= 0]
    return {"rate": rate, "sent": count, "received": len(measured),
            "latency_ms_p50": round(percentile(measured, 50) * 1000, 1),
            "latency_ms_p99": round(percentile(measured, 99) * 1000, 1)}


def whole(args) -> dict:
    """End to end at each rate, with the bare Kafka hop at the same rate on a Tansu of the same kind."""
    out = {}
    for rate in args.rates:
        herald = end_to_end(args, rate)
        stack = new_stack()
        try:
            bare = kafka_hop(stack.bootstrap, rate, args.e2e_seconds)
        finally:
            stack.stop()
        out[f"at_{int(rate)}"] = {
            "herald": herald, "bare_kafka": bare,
            "p50_ratio": round(herald["latency_ms_p50"] / max(0.1, bare["latency_ms_p50"]), 1),
            "p99_ratio": round(herald["latency_ms_p99"] / max(0.1, bare["latency_ms_p99"]), 1),
        }
    return out


def main() -> None:
    """Parse arguments, run the chosen stages, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the sizes of docs/benchmarks.md (several minutes)")
    parser.add_argument("--stages", default="ingest,processing,e2e,overload", help="comma-separated")
    parser.add_argument("--seconds", type=int, help="each ingest measurement (5; --full 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for ingest")
    parser.add_argument("--batch", type=int, default=100, help="messages per batch POST")
    parser.add_argument("--backlog", type=int, help="messages preloaded for processing (10,000; --full 30,000)")
    parser.add_argument("--channels", type=int, default=100, help="channels of the backlog")
    parser.add_argument("--rates", type=float, nargs="+", help="end-to-end rates (250; --full 250 2000)")
    parser.add_argument("--e2e-seconds", type=float, help="each end-to-end run (10; --full 30)")
    parser.add_argument("--overload-seconds", type=float, help="single POSTs offered (10; --full 30)")
    parser.add_argument("--batch-seconds", type=float, help="batches offered (--overload-seconds, or 10; --full 20)")
    parser.add_argument("--overload-factor", type=float, default=2.0, help="single POSTs offered, times capacity")
    parser.add_argument("--overload-batch-rate", default="7000",
                        help="batches offered, msg/s, or a factor of capacity (e.g. 2x)")
    parser.add_argument("--overload-channels", type=int, default=40, help="channels of the overload runs")
    parser.add_argument("--overload-senders", type=int, default=4,
                        help="sender processes of single POSTs (a thread and a connection per channel in all)")
    parser.add_argument("--batch-senders", type=int, default=8, help="sender processes of batches (one each)")
    parser.add_argument("--overload-drain", type=float, help="seconds to wait for deliveries after the last "
                        "POST (60; --full 120)")
    args = parser.parse_args()
    args.seconds = args.seconds or (10 if args.full else 5)
    args.backlog = args.backlog or (30_000 if args.full else 10_000)
    args.rates = args.rates or ([250, 2000] if args.full else [250])
    args.e2e_seconds = args.e2e_seconds or (30 if args.full else 10)
    args.batch_seconds = args.batch_seconds or args.overload_seconds or (20 if args.full else 10)
    args.overload_seconds = args.overload_seconds or (30 if args.full else 10)
    args.overload_drain = args.overload_drain or (120 if args.full else 60)
    stages = args.stages.split(",")
    out = {"cpus": os.cpu_count()}
    if "ingest" in stages:
        out["ingest"] = ingest(args) if shutil.which("wrk") else {"skipped": "wrk is not installed"}
    if "processing" in stages:
        out["processing"] = processing(args)
    if "e2e" in stages:
        out["end_to_end"] = whole(args)
    if "overload" in stages:
        # The capacity of this run: the processing stage's, measured alone (run here if not asked for).
        if "processing" not in out:
            out["processing"] = processing(args)
        if not out["processing"]["msg_per_s"]:
            raise SystemExit(f"overload: no processing capacity measured: {out['processing']}")
        out["overload"] = overload(args, out["processing"]["msg_per_s"], new_stack)
        # Measured again after: on a shared machine the spread says how far to trust the ratios.
        out["overload"]["capacity_after_msg_per_s"] = processing(args)["msg_per_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
