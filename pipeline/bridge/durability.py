"""Which Kafka offsets the bridge may commit: only those whose records Redis has kept.

Redis with `appendfsync everysec` writes its append-only file to disk once a
second, and a machine that dies loses what the last fsync did not cover:
the last second, or two when the disk is slow (Redis's persistence
documentation). What survives is a consistent prefix of Redis's history
(docs/operations.md: "Redis: persistence"). The bridge used to store a
record's offset the moment its task was sent; a crash then took the task,
its in-flight entry and whatever the worker wrote, while the committed
offset said the record was done: an accepted message never delivered.

So a poll's offsets are held back until Redis, still the same server (its
`run_id`), answered a check begun at least DURABILITY_LAG after the poll's
tasks were sent: by then the tasks and their in-flight entries are on disk,
and a later crash leaves each record queued, in flight or finished. A server
that restarted (a new `run_id`) may have lost the last seconds: the bridge
then reads again from what is committed, or from the oldest record still in
the in-flight index when that is older (a task Redis holds as taken by a
worker that finished it in the lost seconds would otherwise wait for the
broker's hand-back). Records read again are dispatched again; those already
handled pass their gate as duplicates (docs/design.md: "Under faults").
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import redis
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from pipeline.store import Store, connect, run_ids

log = logging.getLogger("herald.bridge")

# Past everysec's worst case (two seconds, when an fsync is slow) with a
# margin for the checks' own pace. A constant, not a setting: a smaller one
# saves nothing worth having (it only shortens what a new owner of a
# partition reads twice), and a larger fsync period is not Redis's to have.
DURABILITY_LAG = 3.0
CHECK_INTERVAL = 0.5  # seconds between checks of the servers' run ids


def watched_servers(settings, store: Store) -> Callable[[], tuple[str, ...]]:
    """What the bridge checks: the run ids of the state Redis and of a Redis Celery broker
    apart from it (RabbitMQ confirms each task to disk: nothing of it to watch)."""
    broker = []
    if settings.redis_broker and settings.celery_broker_url != settings.redis_url:
        broker.append(connect(settings, 1, url=settings.celery_broker_url))
    return lambda: tuple(run_id for client in (store.redis, *broker) for run_id in run_ids(client))


class Durability:
    """Polls' offsets held back until Redis has kept their tasks; notices a Redis that restarted."""

    def __init__(self, servers: Callable[[], tuple[str, ...]], lag: float = DURABILITY_LAG,
                 interval: float = CHECK_INTERVAL, clock=time.monotonic):
        self.servers, self.lag, self.interval, self.clock = servers, lag, interval, clock
        self.known: tuple[str, ...] | None = None  # the run ids of the last check that answered
        self.rewind_needed = False  # a restart was seen and the bridge has not read again yet
        self.next_check = 0.0
        self._held: deque[tuple[float, dict[int, int]]] = deque()  # (sent at, {partition: next offset})

    def hold(self, offsets: dict[int, int]) -> None:
        """A poll's tasks were sent: its next offsets ({partition: offset}) wait for Redis to keep them."""
        if not self.rewind_needed:  # those records will be read and sent again
            self._held.append((self.clock(), offsets))

    def check(self) -> dict[int, int]:
        """Ask the servers for their run ids; returns the offsets now safe to store
        ({partition: next offset}), none when a server restarted (then `rewind_needed`)."""
        started = self.clock()
        self.next_check = started + self.interval
        try:
            found = self.servers()
        except redis.RedisError as exc:
            log.warning("redis durability check failed", extra={"error": str(exc)})
            return {}
        # Held offsets sent before the first answer cannot be tied to a server: read them again.
        if found != self.known and (self.known is not None or self._held):
            log.warning("redis restarted: reading again what it may have lost",
                        extra={"run_ids": list(found), "before": list(self.known or ())})
            self.rewind_needed = True
            self._held.clear()
        self.known = found
        kept: dict[int, int] = {}
        if self.rewind_needed:
            return kept
        while self._held and self._held[0][0] <= started - self.lag:
            for partition, offset in self._held.popleft()[1].items():
                kept[partition] = max(offset, kept.get(partition, offset))
        return kept

    def rewound(self) -> None:
        """The bridge now reads again from its rewind positions."""
        self.rewind_needed = False
        self._held.clear()

    def settle(self, sleep=time.sleep) -> dict[int, int]:
        """At a clean stop: wait until what is held is DURABILITY_LAG old (at most that
        long), check, and return what is safe to store, so the next owner of the
        partitions does not read it all again."""
        if not self._held:
            return {}
        sleep(max(0.0, self._held[-1][0] + self.lag - self.clock()))
        return self.check()


def rewind_positions(topic: str, committed: list[TopicPartition], oldest: dict[int, int]) -> list[TopicPartition]:
    """Where to read each partition again: its committed offset, or the oldest of its records
    still in flight (`oldest`, {partition: offset}) when lower; from the start when nothing
    was committed (as the consumer's `auto.offset.reset` would). Raises KafkaException when
    the committed offset of one is unknown."""
    positions = []
    for tp in committed:
        if tp.error:
            raise KafkaException(tp.error)
        at = OFFSET_BEGINNING if tp.offset < 0 else min(tp.offset, oldest.get(tp.partition, tp.offset))
        positions.append(TopicPartition(topic, tp.partition, at))
    return positions
