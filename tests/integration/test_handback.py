"""The hand-back of a dead worker's deliveries (tasks/handback.py) against a real Redis broker:
it restores what it read and nothing recorded meanwhile, and a worker that was itself silent
for a lapse takes no one for dead."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pipeline.core.settings import Settings
from tests.harness import SECRET, start_environment


@pytest.fixture
def workers(spare_redis_url, monkeypatch):
    """Two Handbacks on one Redis broker, as two workers have; closed after."""
    monkeypatch.setenv("HERALD_SECRET_KEY", SECRET)  # `tasks` reads this process's settings on import
    from pipeline.taskqueue import make_celery
    from tasks.handback import Handback

    settings = Settings.from_env(start_environment(REDIS_URL=spare_redis_url, HERALD_WORKER_LAPSE="1",
                                                   HERALD_REDIS_PREFIX=f"hb{uuid.uuid4().hex[:8]}"))
    app = make_celery(settings)
    made = [Handback(settings, app, f"{name}@host") for name in ("alive", "other")]
    yield made
    for handback in made:
        handback.stopped.set()
        handback._connection.release()


def take(handback, tag: str) -> None:
    """What a worker's receipt of a task leaves: kombu's unacked entry, and the hand-back's record."""
    message = {"body": tag, "headers": {}, "properties": {"delivery_info": {}, "priority": 0}}
    handback.redis.hset(handback._channel.unacked_key, tag, json.dumps([message, "", queue(handback)]))
    handback.took(tag)


def queue(handback) -> str:
    return handback.celery.conf.task_default_queue


def test_a_delivery_recorded_while_deliveries_are_restored_is_kept(workers):
    sweeper, other = workers
    deliveries = sweeper.keys.worker_deliveries(other.hostname)
    take(other, "tag-1")
    take(other, "tag-2")
    restore = sweeper._channel.qos.restore_by_tag

    def restore_while_it_takes_another(tag, client=None):
        take(other, "tag-3")  # the worker, only taken for dead, receives a task meanwhile
        return restore(tag, client=client)

    sweeper._channel.qos.restore_by_tag = restore_while_it_takes_another
    assert sweeper._restore(other.hostname) == 2
    assert sweeper.redis.smembers(deliveries) == {b"tag-3"}
    assert sweeper.redis.llen(queue(sweeper)) == 2


def test_a_worker_silent_for_a_lapse_takes_no_one_for_dead_on_its_first_beat_back(workers):
    sweeper, other = workers
    sweeper.beat()
    other.beat()
    take(other, "running")
    deliveries = sweeper.keys.worker_deliveries(other.hostname)
    # A broker stall longer than HERALD_WORKER_LAPSE: every liveness key lapsed, the sweeper's too.
    time.sleep(1.3)
    assert not sweeper.redis.exists(sweeper.keys.worker(other.hostname))
    sweeper.beat()
    assert sweeper.redis.smembers(deliveries) == {b"running"}  # not restored: it may be alive
    assert sweeper.redis.llen(queue(sweeper)) == 0
    other.beat()  # it was: it answers within a beat
    sweeper.beat()
    assert sweeper.redis.smembers(deliveries) == {b"running"}
    # One that stays silent is taken for dead at the sweeper's next beat.
    time.sleep(1.3)
    sweeper.beat()
    sweeper.beat()
    assert sweeper.redis.smembers(deliveries) == set()
    assert sweeper.redis.llen(queue(sweeper)) == 1
