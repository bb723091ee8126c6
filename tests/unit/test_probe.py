"""CachedProbe: an answer kept for its TTL, and one probe in flight per process (web/probe.py)."""

from __future__ import annotations

import threading
import time

from web.probe import CachedProbe


def test_calls_within_the_ttl_get_the_last_answer():
    answers = iter(range(100))
    probe = CachedProbe("test", lambda: next(answers), 60)
    assert [probe.get() for _ in range(5)] == [0] * 5
    stale = CachedProbe("test", lambda: next(answers), 0)
    assert stale.get() != stale.get()


def test_parallel_calls_wait_for_the_one_probe_in_flight():
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow():
        calls.append(1)
        started.set()
        release.wait(10)
        return ["kafka"]

    probe = CachedProbe("test", slow, 60)
    results = []
    threads = [threading.Thread(target=lambda: results.append(probe.get())) for _ in range(20)]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    time.sleep(0.2)  # the other 19 are waiting on the lock, not probing
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and results == [["kafka"]] * 20


def test_the_ttl_may_depend_on_the_answer():
    answers = iter([["redis"], ["redis"], []])
    probe = CachedProbe("test", lambda: next(answers), lambda down: 0 if down else 60)
    assert probe.get() == ["redis"] and probe.get() == ["redis"] and probe.get() == [] and probe.get() == []
