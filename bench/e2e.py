"""End-to-end benchmark: POST at a fixed rate for a fixed time, time each message to its WebSocket frame.

    python bench/e2e.py --spawn --rate 500 --duration 20        # starts its own stack
    python bench/e2e.py --url http://localhost:8000 --token T   # drives a running system

Prints accepted messages/s and the POST -> WebSocket latency p50/p95/p99.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(values, pct):
    """The pct-th percentile (nearest rank) of a list of numbers."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def run(base: str, token: str, rate: float, duration: float, channels: int, senders: int,
        namespace: str = "bench") -> dict:
    """Drive the system, on channels of `namespace`; returns the figures."""
    parts = urlsplit(base)
    prefix = f"{namespace}:{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}-{i}" for i in range(channels)]
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    ws_url = f"ws://{parts.netloc}/ws?token={token}"
    sock = websocket.create_connection(ws_url, timeout=10)
    sock.recv()
    for name in names:
        sock.send(json.dumps({"op": "subscribe", "channel": name}))
    subscribed = 0
    while subscribed < channels:
        if json.loads(sock.recv()).get("op") == "subscribed":
            subscribed += 1
    received = set()
    stop_reading = threading.Event()

    def reader():
        sock.settimeout(1.0)
        while not stop_reading.is_set():
            try:
                frame = json.loads(sock.recv())
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                return
            if frame.get("op") == "message":
                now = time.perf_counter()
                with lock:
                    started = sent_at.get(frame["data"]["k"])
                    received.add(frame["data"]["k"])
                if started is not None:
                    latencies.append(now - started)

    counts = {"accepted": 0, "rejected": 0, "errors": 0}
    ids: dict[str, str] = {}  # key -> message id, of each accepted message
    interval = senders / rate
    deadline = time.perf_counter() + duration

    def sender(index: int):
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
        next_at = time.perf_counter() + index * interval / senders
        n = 0
        while next_at < deadline:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            key = f"{index}-{n}"
            body = json.dumps({"channel": names[n % channels], "data": {"k": key}})
            with lock:
                sent_at[key] = time.perf_counter()
            try:
                conn.request("POST", "/api/v1/messages", body, {"Content-Type": "application/json",
                                                                "Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                raw = resp.read()
                with lock:
                    counts["accepted" if resp.status == 202 else "rejected"] += 1
                    if resp.status == 202:
                        ids[key] = json.loads(raw)["id"]
            except (OSError, http.client.HTTPException):
                with lock:
                    counts["errors"] += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
            n += 1
            next_at += interval
        conn.close()

    read_thread = threading.Thread(target=reader, daemon=True)
    read_thread.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    drain_until = time.perf_counter() + 30
    while len(received) < counts["accepted"] and time.perf_counter() < drain_until:
        time.sleep(0.1)
    stop_reading.set()
    read_thread.join(3)
    sock.close()
    # A message accepted and never seen must be explained: what Herald says of it.
    missing = [_status(parts, token, ids[key]) for key in list(ids) if key not in received][:20]
    return {
        "target_rate": rate, "seconds": round(elapsed, 1), **counts,
        "accepted_per_s": round(counts["accepted"] / elapsed, 1),
        "delivered": len(received), "lost": counts["accepted"] - len(received),
        "latency_ms_p50": round(percentile(latencies, 50) * 1000, 1),
        "latency_ms_p95": round(percentile(latencies, 95) * 1000, 1),
        "latency_ms_p99": round(percentile(latencies, 99) * 1000, 1),
        **({"missing": missing} if missing else {}),
    }


def _status(parts, token: str, msg_id: str) -> dict:
    """GET /api/v1/messages/{id}: its status, attempts and error."""
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    try:
        conn.request("GET", f"/api/v1/messages/{msg_id}", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return {"id": msg_id, "error": str(exc)}
    finally:
        conn.close()
    return {"id": msg_id, "http": resp.status, **{k: body.get(k) for k in ("channel", "status", "attempts", "error")}}


def main() -> None:
    """Parse arguments, optionally start a stack, run and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", default="")
    parser.add_argument("--rate", type=float, default=500, help="messages per second")
    parser.add_argument("--duration", type=float, default=20, help="seconds")
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--senders", type=int, default=16, help="concurrent HTTP connections")
    parser.add_argument("--spawn", action="store_true", help="start Tansu, Redis and Herald here first")
    parser.add_argument("--workers", type=int, default=2, help="with --spawn: Celery worker processes")
    args = parser.parse_args()
    stack = None
    try:
        if args.spawn:
            from tests.harness import Stack

            stack = Stack(Path(tempfile.mkdtemp(prefix="herald-bench-")))
            stack.worker(concurrency=args.workers)
            stack.bridge()
            web = stack.web(WEB_CONCURRENCY=1)
            args.url, args.token = web.base, stack.token()
        print(json.dumps(run(args.url, args.token, args.rate, args.duration, args.channels, args.senders)))
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
