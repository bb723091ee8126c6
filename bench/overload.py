"""Overload: more offered than the workers can process, and what becomes of it (issue 20, docs/benchmarks.md).

Run as a stage of bench/pipeline.py (`--stages overload`), which hands it the
processing capacity measured alone in the same run. Each phase has a stack of
its own (a worker of 2 processes, the bridge, a web process of 2 gevent
workers, as the processing stage has). Sender processes POST at a fixed
offered rate for a fixed time, each thread (a lane) with channels of its own,
one request after the other, so each channel's publish order is its lane's
send order. A lane that falls behind its schedule sends at once until it
catches up: the offered rate is what the schedule asked, the posted rate what
the web answered 202 to. After the last POST the phase waits for the backlog
to drain, then reads every channel's history: a message's delivery time is
its stream id's milliseconds (Redis's clock, the senders' clock: one
machine), its latency that minus the time its POST was sent. Forced passes
are the workers' "passed out of order" log lines (tasks/processor.py).
"""

from __future__ import annotations

import collections
import http.client
import json
import multiprocessing
import resource
import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from bench.e2e import percentile

# History is where the deliveries are read back: a channel must keep every
# message of a run (the default keeps 1,000).
HISTORY_MAXLEN = 10_000_000
BOUND_SLACK = 5.0  # seconds past backlog / capacity (issue 20's bound)
BATCH_TARGET = {"overall_per_s": 5000, "within_s_of_last_post": 10}  # issue 20, batches at 7,000/s


def _lane(base: str, token: str, channels: list[str], batch: int, rate: float, seconds: float,
          tag: str, out: dict) -> None:
    """POST to `channels` in turn at `rate` messages a second for `seconds`, one request at a time."""
    parts = urlsplit(base)
    path = "/api/v1/messages" if batch == 1 else "/api/v1/messages/batch"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    sent: dict[str, list] = {channel: [] for channel in channels}  # channel -> [(id, sent at)] in send order
    refused: collections.Counter = collections.Counter()
    requests = errors = 0
    last_ack = 0.0
    interval = batch / rate
    started = time.perf_counter()
    next_at, deadline, n = started, started + seconds, 0
    # A lane behind its schedule stops at the deadline all the same: offered is the
    # schedule, not what a slow web was sent late.
    while next_at < deadline and time.perf_counter() < deadline:
        time.sleep(max(0.0, next_at - time.perf_counter()))
        items = [{"channel": channels[(n + i) % len(channels)], "data": {"tag": tag, "n": n + i}}
                 for i in range(batch)]
        body = json.dumps(items[0] if batch == 1 else {"messages": items})
        posted = time.time()
        try:
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        else:
            requests += 1
            if resp.status != 202:
                refused[str(resp.status)] += len(items)
            else:
                answer = json.loads(raw)
                for item, result in zip(items, answer["results"] if batch > 1 else [answer]):
                    if result.get("status") == "accepted":
                        sent[item["channel"]].append((result["id"], posted))
                    else:
                        refused[str(result.get("status"))] += 1
                last_ack = time.time()
        n += batch
        next_at += interval
    conn.close()
    out.update(sent=sent, refused=refused, requests=requests, errors=errors, last_ack=last_ack)


def _sender(base: str, token: str, lanes: list[list[str]], batch: int, lane_rate: float, seconds: float,
            tag: str, barrier, results) -> None:
    """One sender process: a thread per lane, started together with the other processes'."""
    outs: list[dict] = [{} for _ in lanes]
    threads = [threading.Thread(target=_lane, args=(base, token, channels, batch, lane_rate, seconds, tag, out))
               for channels, out in zip(lanes, outs)]
    barrier.wait(60)
    before = resource.getrusage(resource.RUSAGE_SELF)  # start-up (imports) left out
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    results.put({"lanes": outs, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime})


def offer(base: str, token: str, channels: list[str], *, processes: int, lanes: int, batch: int, rate: float,
          seconds: float) -> dict:
    """Offer `rate` messages a second for `seconds` from `processes` sender processes holding `lanes`
    lanes in all (lane l owns channels[l::lanes]); what each lane sent and what the web answered."""
    if lanes > len(channels) or processes > lanes:
        raise SystemExit(f"overload: {lanes} lanes over {processes} processes need at least as many channels "
                         f"({len(channels)}) as lanes and lanes as processes")
    owned = [channels[lane::lanes] for lane in range(lanes)]
    # spawn, not fork: this process holds threads and sockets (the stack's).
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes + 1), context.Queue()
    tag = uuid.uuid4().hex[:8]
    children = [context.Process(target=_sender, args=(base, token, owned[p::processes], batch, rate / lanes, seconds,
                                                       tag, barrier, results))
                for p in range(processes)]
    for child in children:
        child.start()
    barrier.wait(120)
    started = time.time()
    gathered = [results.get(timeout=seconds + 300) for _ in children]
    for child in children:
        child.join()
    lane_outs = [lane for result in gathered for lane in result["lanes"]]
    sent: dict[str, list] = {}
    refused: collections.Counter = collections.Counter()
    for lane in lane_outs:
        sent.update(lane["sent"])
        refused.update(lane["refused"])
    return {"started": started, "sent": sent, "refused": dict(refused),
            "requests": sum(lane["requests"] for lane in lane_outs),
            "errors": sum(lane["errors"] for lane in lane_outs),
            "last_ack": max(lane["last_ack"] for lane in lane_outs),
            "senders_cpu_s": round(sum(result["cpu_s"] for result in gathered), 1)}


def _delivered(store, channels: list[str]) -> int:
    """Messages in the channels' history (one pipeline round trip)."""
    pipe = store.redis.pipeline(transaction=False)
    for channel in channels:
        pipe.xlen(store.keys.history(channel))
    return sum(pipe.execute())


def history(store, channel: str) -> list[tuple[str, float]]:
    """A channel's history as (message id, delivered at: the stream id's ms as seconds), in stream order."""
    key, found, start = store.keys.history(channel), [], "-"
    while True:
        chunk = store.redis.xrange(key, start, "+", count=10_000)
        # A stored frame ends at its offset's opening quote (pipeline/core/frames.py).
        found += [(json.loads(fields["f"] + '0-0"}')["id"], int(sid.split("-")[0]) / 1000) for sid, fields in chunk]
        if len(chunk) < 10_000:
            return found
        start = "(" + chunk[-1][0]


def _statuses(web, token: str, sent: dict[str, list], delivered: dict[str, list], sample: int = 100) -> dict:
    """What Herald says of up to `sample` messages missing from history at the end: still
    `processing` (parked at their gate) is not lost."""
    in_history = {msg_id for ids in delivered.values() for msg_id, _ in ids}
    missing = [msg_id for ids in sent.values() for msg_id, _ in ids if msg_id not in in_history][:sample]
    found: collections.Counter = collections.Counter()
    for msg_id in missing:
        status, _, body = web.request("GET", f"/api/v1/messages/{msg_id}", token=token)
        found[body.get("status") if status == 200 and isinstance(body, dict) else f"http {status}"] += 1
    return dict(found)


def account(sent: dict[str, list], delivered: dict[str, list]) -> dict:
    """Per channel, against its send order: lost (sent, never in history), duplicated (in history
    more than once) and reordered (adjacent pairs of history against send order)."""
    totals = {"lost": 0, "duplicated": 0, "reordered": 0}
    faulty = {}
    for channel, ids in sent.items():
        rank = {msg_id: n for n, (msg_id, _) in enumerate(ids)}
        seen = collections.Counter(msg_id for msg_id, _ in delivered.get(channel, []))
        ranks = [rank[msg_id] for msg_id, _ in delivered.get(channel, []) if msg_id in rank]
        counts = {"lost": sum(1 for msg_id in rank if not seen[msg_id]),
                  "duplicated": sum(c - 1 for c in seen.values() if c > 1),
                  "reordered": sum(1 for a, b in zip(ranks, ranks[1:]) if a > b)}
        for name, count in counts.items():
            totals[name] += count
        if any(counts.values()):
            faulty[channel] = counts
    return {**totals, "channels_with_any": faulty}


def phase(make_stack: Callable, capacity: float, *, channels: int, processes: int, lanes: int, batch: int,
          rate: float, seconds: float, drain: float) -> dict:
    """One overload run on a stack of its own: offer, drain, read history back; the figures."""
    stack = make_stack(HERALD_HISTORY_MAXLEN=HISTORY_MAXLEN)
    try:
        worker = stack.worker()
        stack.bridge()
        web = stack.web(WEB_CONCURRENCY=2)
        token = stack.token()
        store = stack.store()
        names = [f"bench:o{uuid.uuid4().hex[:6]}-{i}" for i in range(channels)]
        run = offer(web.base, token, names, processes=processes, lanes=lanes, batch=batch, rate=rate,
                    seconds=seconds)
        accepted = sum(len(ids) for ids in run["sent"].values())
        deadline = time.time() + drain
        while _delivered(store, names) < accepted and time.time() < deadline:
            time.sleep(0.2)
        delivered = {name: history(store, name) for name in names}
        forced = worker.log().count("passed out of order")
        statuses = _statuses(web, token, run["sent"], delivered)
    finally:
        stack.stop()
    posted_at = {msg_id: at for ids in run["sent"].values() for msg_id, at in ids}
    in_history = {msg_id for ids in delivered.values() for msg_id, _ in ids}
    times = sorted(at for ids in delivered.values() for msg_id, at in ids if msg_id in posted_at)
    latencies = [at - posted_at[msg_id] for ids in delivered.values() for msg_id, at in ids if msg_id in posted_at]
    first_post, last_post = run["started"], run["last_ack"]
    during = sum(1 for at in times if at <= last_post)
    backlog = accepted - during
    bound = backlog / capacity + BOUND_SLACK if capacity else None
    last_delivery = times[-1] if times else None
    after = round(last_delivery - last_post, 2) if last_delivery else None
    overall = round(len(times) / (last_delivery - first_post), 1) if last_delivery else None
    during_rate = round(during / max(0.001, last_post - first_post), 1)
    return {
        "channels": channels, "sender_processes": processes, "lanes": lanes, "batch": batch,
        "offered_per_s": rate, "seconds": seconds,
        "posted_per_s": round(accepted / max(0.001, last_post - first_post), 1),
        "posted_of_offered": round(accepted / max(0.001, last_post - first_post) / rate, 3),
        "requests": run["requests"], "accepted": accepted, "refused": run["refused"], "errors": run["errors"],
        "senders_cpu_s": run["senders_cpu_s"],
        "delivered": len(in_history & posted_at.keys()), "undelivered_at_end": len(posted_at.keys() - in_history),
        "undelivered_statuses": statuses,
        "delivered_per_s_during": during_rate, "delivered_per_s_overall": overall,
        "delivered_by_last_post_of_accepted": round(during / max(1, accepted), 3),
        "during_of_capacity": round(during_rate / capacity, 3) if capacity else None,
        "overall_of_capacity": round(overall / capacity, 3) if capacity and overall else None,
        "backlog_at_last_post": backlog, "last_delivery_after_last_post_s": after,
        "bound_s": round(bound, 2) if bound is not None else None,
        "within_bound": after is not None and bound is not None and after <= bound and len(times) >= accepted,
        "latency_s_p50": round(percentile(latencies, 50), 3),
        "latency_s_p99": round(percentile(latencies, 99), 3),
        **account(run["sent"], delivered),
        "forced_out_of_order": forced,
    }


def overload(args, capacity: float, make_stack: Callable) -> dict:
    """Single POSTs at `--overload-factor` times `capacity`, then batches at `--overload-batch-rate`."""
    out: dict = {"capacity_msg_per_s": capacity}
    single_rate = round(capacity * args.overload_factor, 1)
    out["single_posts"] = phase(make_stack, capacity, channels=args.overload_channels,
                                processes=args.overload_senders, lanes=args.overload_channels, batch=1,
                                rate=single_rate, seconds=args.overload_seconds, drain=args.overload_drain)
    batch_rate = args.overload_batch_rate
    if batch_rate.endswith("x"):
        batch_rate = capacity * float(batch_rate[:-1])
    batches = phase(make_stack, capacity, channels=args.overload_channels, processes=args.batch_senders,
                    lanes=args.batch_senders, batch=args.batch, rate=round(float(batch_rate), 1),
                    seconds=args.batch_seconds, drain=args.overload_drain)
    batches["target"] = {**BATCH_TARGET, "met": bool(
        batches["delivered_per_s_overall"] and batches["delivered_per_s_overall"] >= BATCH_TARGET["overall_per_s"]
        and batches["undelivered_at_end"] == 0 and batches["last_delivery_after_last_post_s"] is not None
        and batches["last_delivery_after_last_post_s"] <= BATCH_TARGET["within_s_of_last_post"])}
    out["batches"] = batches
    out["of_capacity"] = {name: {"during": out[name]["during_of_capacity"], "overall": out[name]["overall_of_capacity"]}
                          for name in ("single_posts", "batches")}
    return out
