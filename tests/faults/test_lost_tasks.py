"""A task the Celery broker lost is sent again within seconds; one that is only slow, never
(docs/design.md: "Under faults"): lost 0, duplicated 0, reordered 0, on both brokers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.taskqueue import make_celery, ready_tasks
from tests.faults.load import forced_passes, history_of, inversions
from tests.harness import ROOT, wait_until

POISON = Path(__file__).with_name("poison")
# Far longer than the tests wait: the bridge's long sweep (twice it) cannot explain a recovery.
SLOW_FALLBACK = {"HERALD_VISIBILITY_TIMEOUT": 300}


def take_head(stack) -> str:
    """Take the task at the head of the broker's queue and drop it, as a worker killed the moment
    it took a task does; returns the task's body."""
    app = make_celery(stack.settings)
    with app.connection_for_write() as connection:
        message = connection.default_channel.basic_get(stack.settings.task_queue, no_ack=True)
    assert message is not None, "no task in the broker's queue"
    return message.body.decode() if isinstance(message.body, bytes) else json.dumps(message.body)


def figures_of(name: str, published: dict[str, list[str]], history: dict[str, list[str]], **extra) -> dict:
    """FAULT-FIGURES of channels' histories against their publish order, printed and returned."""
    order = {msg_id: n for n, msg_id in enumerate(i for ids in published.values() for i in ids)}
    delivered = [i for ids in history.values() for i in ids]
    figures = {"test": name, "published": len(order), "in_history": len(set(order) & set(delivered)),
               "lost": len(set(order) - set(delivered)), "duplicated": len(delivered) - len(set(delivered)),
               "reordered": inversions(history.values(), order), **extra}
    print("\nFAULT-FIGURES " + json.dumps(figures))
    return figures


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_task_the_broker_lost_is_sent_again_within_seconds(make_stack, channel, broker):
    stack = make_stack(broker=broker, env=SLOW_FALLBACK)
    bridge = stack.bridge()
    web = stack.web()
    token = stack.token()
    store = stack.store()
    app = make_celery(stack.settings)

    def post(n: int) -> str:
        return web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}}, token=token)[2]["id"]

    lost = post(-1)
    wait_until(lambda: ready_tasks(app, stack.settings) == 1, 20, what="the first message's task in the queue")
    time.sleep(1)  # the messages behind it come a moment later, as a channel's next ones do
    behind = [post(n) for n in range(20)]
    wait_until(lambda: store.redis.zcard(store.keys.in_flight_index) == 21, 30,
               what="the bridge to dispatch every message")
    assert lost in take_head(stack)
    started = time.monotonic()
    worker = stack.worker()
    wait_until(lambda: store.redis.xlen(store.keys.history(channel)) >= 21, 60, 0.1,
               what="the channel's messages in history")
    seconds = round(time.monotonic() - started, 1)
    bridge.wait_for_log("redispatching a message no worker took", 5)
    history = history_of(stack, [channel])
    figures = figures_of(f"lost task ({broker})", {channel: [lost, *behind]}, history, seconds=seconds,
                         visibility_timeout=300, forced=forced_passes(worker))
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == figures["forced"] == 0, figures
    assert history[channel] == [lost, *behind], figures


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_long_queue_of_slow_tasks_is_never_sent_twice(make_stack, channels, broker):
    # One worker process taking 50 ms a message, 150 tasks queued before it starts: the
    # last waits about 8 s in the queue, far past the bridge's grace, and is not lost.
    stack = make_stack(broker=broker, env=SLOW_FALLBACK)
    bridge = stack.bridge()
    web = stack.web()
    token = stack.token()
    store = stack.store()
    channels = channels[:4]
    published: dict[str, list[str]] = {channel: [] for channel in channels}
    for n in range(150):
        channel = channels[n % len(channels)]
        published[channel].append(web.request("POST", "/api/v1/messages",
                                              {"channel": channel, "data": {"n": n, "hang": 0.05}},
                                              token=token)[2]["id"])
    wait_until(lambda: store.redis.zcard(store.keys.in_flight_index) == 150, 30,
               what="the bridge to dispatch every message")
    started = time.monotonic()
    worker = stack.worker(concurrency=1, PYTHONPATH=f"{POISON}:{ROOT}")
    wait_until(lambda: sum(store.redis.xlen(store.keys.history(c)) for c in channels) >= 150, 90, 0.2,
               what="every message in history")
    seconds = round(time.monotonic() - started, 1)
    time.sleep(3)  # a sweep or two after the last: anything sent twice would show now
    history = history_of(stack, channels)
    redispatched = bridge.log().count("redispatching a message")
    figures = figures_of(f"long queue, slow worker ({broker})", published, history, redispatched=redispatched,
                         seconds=seconds, forced=forced_passes(worker))
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == figures["forced"] == 0, figures
    assert redispatched == 0, figures
    assert history == published, figures
