"""Fault-injection stacks: tuned so that recovery happens within a test's time.

A short visibility timeout makes the Redis broker hand back the tasks of a
killed worker after seconds instead of an hour; short retry delays keep
within it (the settings refuse a delay over half of it).
"""

from __future__ import annotations

import uuid

import pytest

from tests.faults.load import Collector
from tests.harness import Stack

FAST_RECOVERY = {
    "HERALD_VISIBILITY_TIMEOUT": 10,
    "HERALD_RETRY_BASE_DELAY": 0.1,
    "HERALD_RETRY_MAX_DELAY": 2,
    "HERALD_RETRY_MAX": 20,
    "HERALD_BATCH_SIZE": 20,
    "HERALD_WORKER_LAPSE": 2,
}


@pytest.fixture
def make_stack(tmp_path):
    """Builds stacks with their own Kafka and Redis; stops them all after the test."""
    stacks = []

    def make(**options):
        env = {**FAST_RECOVERY, **options.pop("env", {})}
        stack = Stack(tmp_path / f"stack{len(stacks)}", own_kafka=True, own_redis=True, **options, **env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def channels():
    """Eight fresh channels."""
    tag = uuid.uuid4().hex[:8]
    return [f"fault:{tag}-{i}" for i in range(8)]


def start_collector(webs, token, channels) -> Collector:
    """A resuming subscriber to every channel, ready before the first publish."""
    collector = Collector(lambda: webs, token, channels)
    collector.start()
    assert collector.ready.wait(20), "the collector could not subscribe"
    return collector
