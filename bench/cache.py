"""The archive's cache under penetration, stampede and avalanche, and its hit path.

    python bench/cache.py [--lookups 100000] [--stampede 1000] [--avalanche 10000] [--seconds 10]

Starts Redis, Tansu and two web processes (no worker: the archive is filled
directly, as workers write it, Bloom filter included) and prints one JSON
object:

- penetration: `--lookups` GETs of random ids that never existed, spread over
  both processes: archive queries (herald_archive_queries_total), the
  measured false-positive rate, p50/p99 latency;
- stampede: `--stampede` concurrent GETs of one archived, never cached id,
  half on each process: archive queries (the target is 1), p99 latency;
- avalanche: `--avalanche` ids cached as fast as the machine can, beside a
  web process with HERALD_CACHE_TTL_JITTER=0 (the peer): the spread of their
  expiry times and the most that expire within one second (each an archive
  query under traffic that reads every id); without jitter the spread is
  only the time the fill took;
- hit path: requests/s and p99 for an archived id served from the cache,
  beside the same for a message whose status is in Redis (the read Herald
  did before the archive existed), on the same processes in the same run.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.archive import Archive
from pipeline.archive.cache import bloom_filter
from pipeline.core.messages import Envelope
from pipeline.store.keys import Keys
from tests.harness import Stack

# Long beside the time the fill takes, so the spread measured is the jitter's,
# not the fill's (the avalanche part reads lifetimes; it does not wait for them).
CACHE_TTL = 3600


class Client:
    """One keep-alive HTTP connection to a web process."""

    def __init__(self, web, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> tuple[int, float]:
        """(status, seconds) of one GET."""
        started = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started


def metric(web, name: str, **labels) -> float:
    """A counter's value on one web process's /metrics."""
    text = web.request("GET", "/metrics")[2]
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{label_text}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    return float(re.search(pattern, text, re.M).group(1))


def queries(webs) -> float:
    """Archive queries of every process, summed."""
    return sum(metric(web, "herald_archive_queries_total") for web in webs)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, in milliseconds."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000, 2)


def fan_out(webs, token, paths: list[str], threads: int) -> list[tuple[int, float]]:
    """GET every path, spread over the processes, from `threads` keep-alive connections."""
    local = threading.local()

    def one(item):
        index, path = item
        if not hasattr(local, "clients"):
            local.clients = [Client(web, token) for web in webs]
        return local.clients[index % len(webs)].get(path)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, enumerate(paths)))


def archive_messages(stack, count: int, channel: str) -> list[str]:
    """Archive `count` messages as a worker does (rows, then their ids in the Bloom filter)."""
    archive = Archive(stack.settings.database_url, bloom_filter(stack.settings))
    ids = [f"b{uuid.uuid4().hex[:16]}" for _ in range(count)]
    now = int(time.time() * 1000)
    for start in range(0, count, 500):
        chunk = [Envelope(msg_id, channel, "message", {"n": start + n}, "bench", now, partition=0,
                          offset=start + n) for n, msg_id in enumerate(ids[start:start + 500])]
        archive.store(chunk)
        archive.record_offsets([(e.id, f"{now}-{e.offset}") for e in chunk])
    archive.dispose()
    return ids


def penetration(webs, token, lookups: int) -> dict:
    before = queries(webs)
    paths = [f"/api/v1/messages/never-{uuid.uuid4().hex}" for _ in range(lookups)]
    started = time.perf_counter()
    results = fan_out(webs, token, paths, 16)
    elapsed = time.perf_counter() - started
    statuses = collections.Counter(status for status, _ in results)
    reached = queries(webs) - before
    latencies = [seconds for _, seconds in results]
    return {"lookups": lookups, "statuses": dict(statuses), "archive_queries": int(reached),
            "false_positive_rate": round(reached / lookups, 5), "requests_per_s": round(lookups / elapsed),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def stampede(webs, token, msg_id: str, concurrent: int) -> dict:
    before = queries(webs)
    waits = sum(metric(web, "herald_singleflight_waits_total") for web in webs)
    barrier = threading.Barrier(concurrent)
    results: list = [None] * concurrent

    def one(index):
        client = Client(webs[index % len(webs)], token)
        client.conn.connect()
        barrier.wait()
        results[index] = client.get(f"/api/v1/messages/{msg_id}")
        client.conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies = [seconds for _, seconds in results]
    return {"requests": concurrent, "processes": len(webs),
            "statuses": dict(collections.Counter(status for status, _ in results)),
            "archive_queries": int(queries(webs) - before),
            "singleflight_waits": int(sum(metric(web, "herald_singleflight_waits_total") for web in webs) - waits),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def expiry_spread(stack, prefix: str, ids: list[str]) -> dict:
    """When the cache entries of `ids` expire, from their remaining lifetimes."""
    redis = stack.store().redis
    keys = Keys(prefix)
    pipe = redis.pipeline(transaction=False)
    now = time.time()
    for msg_id in ids:
        pipe.pttl(keys.cached(msg_id))
    at = [now + ttl / 1000 for ttl in pipe.execute() if ttl > 0]
    per_second = collections.Counter(int(t) for t in at)
    return {"entries": len(at), "expiry_spread_s": round(max(at) - min(at), 2),
            "expiry_stdev_s": round(statistics.pstdev(at), 2),
            "peak_expiring_per_s": max(per_second.values()),
            "seconds_with_expiries": len(per_second)}


def avalanche(stack, webs, flat, token, ids: list[str]) -> dict:
    out = {}
    for name, targets, prefix in (("jitter_10pct", webs, stack.settings.redis_prefix),
                                  ("peer_no_jitter", [flat], flat.prefix)):
        started = time.perf_counter()
        results = fan_out(targets, token, [f"/api/v1/messages/{msg_id}" for msg_id in ids], 32)
        fill = time.perf_counter() - started
        assert all(status == 200 for status, _ in results), collections.Counter(s for s, _ in results)
        out[name] = {"fill_s": round(fill, 2), **expiry_spread(stack, prefix, ids)}
    return {"ttl_s": CACHE_TTL, **out}


def hit_path(stack, webs, token, archived_id: str, seconds: float) -> dict:
    # A message whose status is in Redis, as the worker leaves it.
    status_id = f"s{uuid.uuid4().hex[:16]}"
    stack.store().redis.hset(Keys(stack.settings.redis_prefix).message(status_id), mapping={
        "channel": "bench:hits", "type": "message", "sender": "bench", "ts": "1", "data": '{"n": 0}',
        "partition": "0", "offset": "0", "status": "delivered", "attempts": "1", "stream_id": "1-0"})
    out = {}
    for name, msg_id in (("archived_from_cache", archived_id), ("status_in_redis", status_id)):
        fan_out(webs, token, [f"/api/v1/messages/{msg_id}"] * 200, 8)  # warm the connections and the entry
        latencies, stop = [], time.perf_counter() + seconds

        def run(web, msg_id=msg_id, stop=stop, latencies=latencies):
            client, mine = Client(web, token), []
            while time.perf_counter() < stop:
                status, took = client.get(f"/api/v1/messages/{msg_id}")
                assert status == 200, status
                mine.append(took)
            latencies.extend(mine)

        threads = [threading.Thread(target=run, args=(webs[i % len(webs)],)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out[name] = {"requests_per_s": round(len(latencies) / seconds), "p50_ms": percentile(latencies, 50),
                     "p99_ms": percentile(latencies, 99)}
    return out


def main() -> None:
    """Run each part and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--stampede", type=int, default=1000)
    parser.add_argument("--avalanche", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--parts", default="penetration,stampede,hit_path,avalanche",
                        help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    stack = Stack(Path(tempfile.mkdtemp(prefix="herald-cache-")), HERALD_CACHE_TTL=CACHE_TTL)
    try:
        webs = [stack.web("web1"), stack.web("web2")]
        flat_prefix = f"{stack.settings.redis_prefix}flat"
        flat = stack.web("web-flat", HERALD_CACHE_TTL_JITTER=0, HERALD_REDIS_PREFIX=flat_prefix)
        flat.prefix = flat_prefix
        token = stack.token()
        ids = archive_messages(stack, args.avalanche + 2, "bench:archive")
        report = {"machine_cores": os.cpu_count(), "load_average": os.getloadavg()[0]}
        if "penetration" in parts:
            report["penetration"] = penetration(webs, token, args.lookups)
        if "stampede" in parts:
            report["stampede"] = stampede(webs, token, ids[0], args.stampede)
        if "hit_path" in parts:
            report["hit_path"] = hit_path(stack, webs, token, ids[1], args.seconds)
        if "avalanche" in parts:
            report["avalanche"] = avalanche(stack, webs, flat, token, ids[2:])
        print(json.dumps(report, indent=2))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
