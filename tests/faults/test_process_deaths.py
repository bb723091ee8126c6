"""kill -9 of workers and bridges, rebalances, and a worker that stops answering: lost 0, duplicated 0, reordered 0."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.messages import Envelope
from tests.faults.conftest import start_collector
from tests.faults.load import (
    Publisher,
    assert_exactly_once,
    forced_passes,
    history_of,
    report,
    settled_in_flight,
    wait_for_delivery,
)
from tests.harness import ROOT, wait_until

STALL = Path(__file__).with_name("stall")


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_kill_9_worker_repeatedly(make_stack, channels, broker):
    # On RabbitMQ a killed worker's tasks come back at once; the backlog they held
    # up must drain well within 10 s (the default waits out a heartbeat, 65 s).
    stack = make_stack(broker=broker, env={"HERALD_ORDER_WAIT": 10} if broker == "amqp" else {})
    workers = [stack.worker("worker0")]
    stack.bridge()
    web = stack.web()
    token = stack.token()
    collector = start_collector([web], token, channels)
    killed = threading.Event()  # the publisher goes on until the third kill is done
    publisher = Publisher([web], token, channels, count=1000, rate=120, until=killed)
    publisher.start()
    kills = 0
    while kills < 3:
        time.sleep(2.0)
        workers[-1].kill()
        kills += 1
        workers.append(stack.worker(f"worker{kills}"))
    killed.set()
    publisher.join()
    wait_for_delivery(collector, publisher)
    collector.stop()
    figures = report(f"kill -9 worker ({broker})", publisher, collector, history_of(stack, channels),
                     in_flight=settled_in_flight(stack), kills=kills, forced=forced_passes(*workers))
    assert_exactly_once(figures)


def test_kill_9_bridge_repeatedly(make_stack, channels):
    stack = make_stack()
    worker = stack.worker()
    bridges = [stack.bridge("bridge0")]
    web = stack.web()
    token = stack.token()
    collector = start_collector([web], token, channels)
    killed = threading.Event()  # the publisher goes on until the third kill is done
    publisher = Publisher([web], token, channels, count=2000, rate=150, until=killed)
    publisher.start()
    kills = 0
    while kills < 3:
        time.sleep(2.5)
        bridges[-1].kill()
        kills += 1
        bridges.append(stack.bridge(f"bridge{kills}", wait=False))
    killed.set()
    publisher.join()
    wait_for_delivery(collector, publisher, timeout=120)
    collector.stop()
    figures = report("kill -9 bridge", publisher, collector, history_of(stack, channels),
                     in_flight=settled_in_flight(stack), kills=kills, forced=forced_passes(worker))
    assert_exactly_once(figures)


def test_two_bridges_rebalancing_in_turn(make_stack, channels):
    stack = make_stack()
    worker = stack.worker()
    first = stack.bridge("bridge-a")
    web = stack.web()
    token = stack.token()
    collector = start_collector([web], token, channels)
    publisher = Publisher([web], token, channels, count=1500, rate=100)
    publisher.start()
    # Each step waits for the rebalance it caused to finish: Tansu's group
    # coordinator wedges when a member leaves in the middle of one.
    second = stack.bridge("bridge-b")
    first.wait_for_log("partitions assigned", 60, count=2)
    first.stop()
    second.wait_for_log("partitions assigned", 60, count=2)
    third = stack.bridge("bridge-c")
    second.wait_for_log("partitions assigned", 60, count=3)
    second.stop()
    third.wait_for_log("partitions assigned", 60, count=2)
    publisher.join()
    wait_for_delivery(collector, publisher, timeout=120)
    collector.stop()
    # Each bridge's first assignment is its join; every later one is a rebalance it lived through.
    reassignments = sum(bridge.log().count("partitions assigned") - 1 for bridge in (first, second, third))
    figures = report("rebalancing bridges", publisher, collector, history_of(stack, channels),
                     in_flight=settled_in_flight(stack), reassignments=reassignments,
                     forced=forced_passes(worker))
    assert reassignments >= 4, figures
    assert_exactly_once(figures)


def test_a_task_the_broker_lost_is_dispatched_again(make_stack, channel):
    # Visibility timeout 4 s: the bridge re-sends what is unfinished after 8 s.
    stack = make_stack(env={"HERALD_VISIBILITY_TIMEOUT": 4, "HERALD_RETRY_MAX_DELAY": 1})
    stack.worker()
    bridge = stack.bridge()
    web = stack.web()
    token = stack.token()
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    # As if the bridge had dispatched it and a dying worker took it off the queue unrecorded.
    envelope = Envelope(id="lost-in-broker", channel=channel, type="message", data="found", sender="tester",
                        ts=int(time.time() * 1000), partition=0, offset=-1)
    store = stack.store()
    store.track_dispatched([envelope])
    store.redis.zadd(store.keys.in_flight_index, {envelope.id: time.time() - 60})
    frame = client.expect(lambda f: f["op"] == "message", timeout=30)
    assert frame["id"] == "lost-in-broker" and frame["data"] == "found"
    bridge.wait_for_log("redispatching a message no worker finished", 5)
    assert store.redis.zcard(store.keys.in_flight_index) == 0
    client.close()


def test_a_dead_workers_tasks_come_back_within_seconds_not_the_visibility_timeout(make_stack, channel):
    # A visibility timeout far longer than the test waits: only the hand-back can deliver in time.
    stack = make_stack(env={"HERALD_VISIBILITY_TIMEOUT": 300, "HERALD_WORKER_LAPSE": 2})
    stalling = stack.worker("stalling", concurrency=1, PYTHONPATH=f"{STALL}:{ROOT}")
    stack.bridge()
    web = stack.web()
    token = stack.token()
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    stalled = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"stall": True}},
                          token=token)[2]["id"]
    store = stack.store()
    wait_until(lambda: (store.get_message(stalled) or {}).get("status") == "processing", 20,
               what="the stalling worker to hold the message")
    behind = [web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}}, token=token)[2]["id"]
              for n in range(10)]
    stalling.kill()
    started = time.monotonic()
    healthy = stack.worker("healthy")
    seen, deadline = [], started + 60
    while len(seen) < 11:
        seen.append(client.expect(lambda f: f["op"] == "message", timeout=max(0.1, deadline - time.monotonic()))["id"])
    seconds = round(time.monotonic() - started, 1)
    healthy.wait_for_log("handed back the tasks of a worker that stopped answering", 10)
    print("\nFAULT-FIGURES " + json.dumps({"test": "hand-back", "delivered": len(seen), "seconds": seconds,
                                           "visibility_timeout": 300, "forced": forced_passes(healthy)}))
    assert seen == [stalled, *behind]
    assert forced_passes(healthy) == 0
    client.close()


def test_a_lost_task_behind_a_long_waiting_line_passes_before_the_order_wait(make_stack, channel):
    # A worker killed as it took a task off the Redis queue loses it: only the
    # bridge sends it again. Meanwhile every message behind it in its channel
    # is parked at the gate; the re-sent task passes and takes the whole line
    # on, in order, before HERALD_ORDER_WAIT could let any of it pass without
    # it (docs/design.md: "Order").
    behind_count = 300
    stack = make_stack(env={"HERALD_ORDER_WAIT": 10})
    bridge = stack.bridge()
    web = stack.web()
    token = stack.token()
    store = stack.store()
    queue = f"{stack.settings.redis_prefix}.tasks"

    def post(n: int) -> str:
        return web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}}, token=token)[2]["id"]

    lost = post(-1)
    wait_until(lambda: store.redis.llen(queue) == 1, 20, what="the first message's task in the broker's queue")
    store.redis.delete(queue)  # taken off the queue by a worker that died at once
    # ... and lost where only the bridge's long sweep finds it (its quick look at what no
    # worker took is tests/faults/test_lost_tasks.py's).
    store.redis.zrem(store.keys.queued, lost)
    behind = []
    for n in range(behind_count):
        behind.append(post(n))
        store.redis.zadd(store.keys.in_flight_index, {lost: time.time()}, xx=True)  # not swept yet
    # Dispatched, however many records each poll's task holds (a task per poll: on a fast machine
    # several of them, so the queue's length says nothing about how many were sent).
    wait_until(lambda: store.redis.zcard(store.keys.in_flight_index) == behind_count + 1, 30,
               what="the bridge to dispatch every message behind it")
    worker = stack.worker()
    wait_until(lambda: store.redis.zcard(store.keys.waiting(channel)) == behind_count, 30, 0.05,
               what="every message behind it to be parked at the gate")
    # Now the sweep finds it (within its period, 2 s here) and sends it again.
    store.redis.zadd(store.keys.in_flight_index, {lost: time.time() - 3600}, xx=True)
    wait_until(lambda: store.redis.xlen(store.keys.history(channel)) == behind_count + 1, 90, 0.2,
               what="the channel's messages in history")
    bridge.wait_for_log("redispatching a message no worker finished", 5)
    history = history_of(stack, [channel])[channel]
    figures = {"test": "lost task behind a waiting line", "waiting": behind_count,
               "in_order": history == [lost, *behind], "forced": forced_passes(worker)}
    print("\nFAULT-FIGURES " + json.dumps(figures))
    assert figures["forced"] == 0, figures
    assert history == [lost, *behind], figures
