"""Ephemeral messages beside durable ones: POST at a steady rate, time each message to its WebSocket frame.

    python bench/ephemeral.py                          # 1,000 msg/s for 10 s on each path
    python bench/ephemeral.py --rate 300 --duration 5

One stack (Tansu, Redis, a worker, the bridge, one web process) whose `eph` namespace is
ephemeral (HERALD_EPHEMERAL_NAMESPACES); the same load (bench/e2e.py: single POSTs from
concurrent connections, one WebSocket subscriber) on `eph:` channels, then on durable `bench:`
ones. Prints one JSON object: for each path the rate, what was lost, the POST -> frame latency
p50/p95/p99, and the CPU microseconds per message of the web, worker, bridge, Redis and Tansu
processes (utime + stime from /proc, as bench/pipeline.py reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# This file's directory leaves the path: bench/pipeline.py would shadow the `pipeline` package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.e2e import run as run_e2e
from bench.pipeline import CpuMeter, services
from tests.harness import Stack

NAMESPACE = "eph"


def measure(stack: Stack, web, roots: dict[str, int], args, namespace: str) -> dict:
    """One path's run: the e2e figures and the CPU per message of each process."""
    cpu = CpuMeter(roots)
    cpu.start()
    result = run_e2e(web.base, stack.token(), args.rate, args.duration, args.channels, args.senders, namespace)
    result.update(cpu.per_message(result["accepted"]))
    return result


def main() -> None:
    """Parse arguments, start the stack, run both paths and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="messages per second, on each path")
    parser.add_argument("--duration", type=float, default=10, help="seconds, on each path")
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--senders", type=int, default=16, help="concurrent HTTP connections")
    args = parser.parse_args()
    # The WebSocket subscriber sends nothing: HERALD_WS_RATE is not in the way.
    stack = Stack(Path(tempfile.mkdtemp(prefix="herald-bench-")), HERALD_EPHEMERAL_NAMESPACES=NAMESPACE)
    try:
        worker = stack.worker()
        bridge = stack.bridge()
        web = stack.web(WEB_CONCURRENCY=1)
        roots = {"web": web.proc.proc.pid, "worker": worker.proc.pid, "bridge": bridge.proc.pid, **services(stack)}
        out = {"cpus": os.cpu_count(), "rate": args.rate, "seconds": args.duration,
               "ephemeral": measure(stack, web, roots, args, NAMESPACE),
               "durable": measure(stack, web, roots, args, "bench")}
    finally:
        stack.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
