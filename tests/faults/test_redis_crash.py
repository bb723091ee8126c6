"""kill -9 of the one Redis (state and Celery broker, `appendfsync everysec`) under load,
losing its last seconds: every message answered 202 is in its channel's history once, in order."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path

from tests.faults.conftest import start_collector
from tests.faults.load import Publisher, forced_passes, history_of, inversions, settled_in_flight
from tests.harness import wait_until

# Seconds of writes the crash takes: everysec's worst case, when an fsync is
# slow (docs/operations.md: "Redis: persistence").
LOSS = 2.0


class AofTail(threading.Thread):
    """Samples the sizes of Redis's append-only files, so that after a kill -9 they can be cut
    back to what they held LOSS seconds before.

    A kill -9 of the process alone loses nothing Redis answered: what it wrote
    is in the kernel's page cache, which outlives the process. A machine that
    dies keeps only what the last fsync reached; with `appendfsync everysec`
    that is the files as they were up to two seconds earlier. Redis loads a
    file cut mid-command or mid-transaction up to its last whole one
    (`aof-load-truncated`, on by default): a prefix of its history, as after
    a power loss.
    """

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        self.directory = directory
        self.samples: collections.deque = collections.deque(maxlen=1000)  # (monotonic time, {file: size})
        self.running = True

    def run(self) -> None:
        while self.running:
            self.samples.append((time.monotonic(), self._sizes()))
            time.sleep(0.02)

    def _sizes(self) -> dict[Path, int]:
        return {path: path.stat().st_size for path in self.directory.glob("*.incr.aof")}

    def cut(self, killed_at: float) -> int:
        """Cut each file back to its size LOSS seconds before `killed_at`; returns the bytes cut."""
        self.running = False
        self.join(2)
        before = [sizes for at, sizes in self.samples if at <= killed_at - LOSS][-1]
        cut = 0
        for path, size in self._sizes().items():
            assert path in before, f"{path.name} appeared within the last {LOSS:g}s (an AOF rewrite)"
            cut += size - before[path]
            with open(path, "r+b") as fh:
                fh.truncate(before[path])
        return cut


def test_redis_kill_9_losing_its_last_seconds_loses_no_accepted_message(make_stack, channels):
    stack = make_stack(persistent_redis=True)  # one Redis: Herald's state and the Celery broker
    worker = stack.worker()
    bridge = stack.bridge()
    web, token = stack.web(), stack.token()
    collector = start_collector([web], token, channels)
    tail = AofTail(stack.workdir / "redis-data" / "appendonlydir")
    tail.start()
    done = threading.Event()  # the publisher goes on until the restarted Redis has had load too
    publisher = Publisher([web], token, channels, count=0, rate=100, give_up_after=90, until=done)
    publisher.start()
    time.sleep(6)  # past LOSS and the bridge's holding back: some offsets are committed
    stack.redis.kill()
    cut = tail.cut(time.monotonic())
    time.sleep(1)
    stack.redis.start()
    time.sleep(6)
    done.set()
    publisher.join()

    accepted = list(publisher.accepted)
    try:
        wait_until(lambda: set(accepted) <= {i for ids in history_of(stack, channels).values() for i in ids},
                   120, 0.5, "every accepted message in history")
    except AssertionError:
        pass  # the figures tell what is missing
    in_flight = settled_in_flight(stack)
    collector.stop()
    history = history_of(stack, channels)
    order = {msg_id: rank for rank, msg_id in enumerate(accepted)}
    in_history = collections.Counter(i for ids in history.values() for i in ids)
    figures = {
        "test": "redis kill -9 losing its last seconds",
        "published": publisher.published,
        "accepted": len(accepted),
        "refused": dict(publisher.refused),
        "aof_bytes_cut": cut,
        "lost": len(set(accepted) - set(in_history)),
        "duplicated": sum(c - 1 for c in in_history.values() if c > 1),
        "reordered": inversions(history.values(), order),
        "unexpected": len(set(in_history) - set(accepted)),
        "in_flight": in_flight,
        "forced": forced_passes(worker),
        "read_again": bridge.log().count("reading again after a redis restart"),
        # A subscriber saw live the messages whose history entries the crash took;
        # delivered again, they reach it again (same id, a new stream id).
        "subscriber_lost": len(set(accepted) - set(collector.seen)),
        "subscriber_repeats": sum(c - 1 for c in collector.seen.values() if c > 1),
        "subscriber_reordered": inversions(collector.arrivals.values(), order),
    }
    print("\nFAULT-FIGURES " + json.dumps(figures))
    assert figures["accepted"] > 0 and figures["aof_bytes_cut"] > 0, figures
    for name in ("lost", "duplicated", "reordered", "unexpected", "in_flight", "forced",
                 "subscriber_lost", "subscriber_reordered"):
        assert figures[name] == 0, figures
