"""The bridge's look for lost tasks (pipeline/bridge/lost.py) on a real Redis, as store and as
Celery broker: what a worker took tells what the broker lost, and a long queue loses nothing."""

from __future__ import annotations

import time
import uuid

import pytest

from pipeline.bridge.lost import GRACE, SLACK, LostTasks, TakenBound
from pipeline.core.messages import Envelope
from pipeline.core.settings import Settings
from pipeline.store import Store, connect
from pipeline.taskqueue import TASK_NAME, make_celery, ready_tasks


class Clock:
    """Monotonic time the test moves on."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def system(spare_redis_url):
    """(store, celery app, settings, clock) with a prefix and a task queue of their own."""
    settings = Settings.from_env({"HERALD_SECRET_KEY": "k" * 32, "REDIS_URL": spare_redis_url,
                                  "HERALD_REDIS_PREFIX": f"l{uuid.uuid4().hex[:8]}"})
    store = Store(connect(settings, 2), settings)
    yield store, make_celery(settings), settings, Clock()
    store.redis.connection_pool.disconnect()


def envelope(n: int) -> Envelope:
    return Envelope(f"m{n}", "c", "message", n, "s", 0, partition=0, offset=n)


def look(system) -> LostTasks:
    store, app, settings, clock = system
    return LostTasks(store, lambda: ready_tasks(app, settings), TakenBound(clock=clock))


def test_a_task_queued_before_one_taken_a_while_ago_is_lost(system):
    store, app, settings, clock = system
    lost_tasks = look(system)
    now = time.time()
    store.track_dispatched([envelope(0), envelope(1)], now - 5)  # the first task, never taken
    store.track_dispatched([envelope(2)], now - 4)
    app.send_task(TASK_NAME, args=([],))  # something still queued: the empty queue says nothing
    store.mark_taken(["m2"], now - 4)
    assert lost_tasks.sweep() == []  # the taker may not have recorded the first one yet
    clock.now += GRACE
    assert [e.id for e in lost_tasks.sweep()] == ["m0", "m1"]
    assert store.queue_ends() == (now - 4, None)
    assert lost_tasks.sweep() == []  # claimed once


def test_tasks_behind_the_last_one_taken_are_never_lost(system):
    store, app, settings, clock = system
    lost_tasks = look(system)
    now = time.time()
    for n in range(5):
        store.track_dispatched([envelope(n)], now - 30 + n)
        app.send_task(TASK_NAME, args=([],))
    store.mark_taken(["m0"], now - 30)
    store.mark_taken(["m1"], now - 29)
    for _ in range(5):
        clock.now += GRACE
        assert lost_tasks.sweep() == []
    assert store.queue_ends() == (now - 29, now - 28)


def test_tasks_dispatched_a_moment_apart_by_two_bridges_are_not_lost(system):
    # A task stamped just before another yet queued behind it (two bridges' sends and clocks).
    store, app, settings, clock = system
    lost_tasks = look(system)
    now = time.time()
    store.track_dispatched([envelope(0)], now - SLACK / 2)
    store.mark_taken(["m1"], now)
    app.send_task(TASK_NAME, args=([],))
    clock.now += 3 * GRACE
    assert lost_tasks.sweep() == []


def test_the_last_task_before_a_quiet_spell_is_lost_once_the_queue_is_empty(system):
    store, app, settings, clock = system
    lost_tasks = look(system)
    store.track_dispatched([envelope(0)], time.time() - 2 * SLACK)
    assert ready_tasks(app, settings) == 0
    assert lost_tasks.sweep() == []  # the queue is empty now: lost unless recorded within the grace
    clock.now += GRACE
    assert [e.id for e in lost_tasks.sweep()] == ["m0"]


def test_a_message_that_finished_meanwhile_is_not_sent_again(system):
    store, app, settings, clock = system
    lost_tasks = look(system)
    now = time.time()
    store.track_dispatched([envelope(0)], now - 5)
    store.redis.hdel(store.keys.in_flight_envelopes, "m0")  # passed its gate, as if its taker went unrecorded
    store.mark_taken([], now - 1)
    lost_tasks.sweep()
    clock.now += GRACE
    assert lost_tasks.sweep() == []
    assert store.queue_ends()[1] is None
