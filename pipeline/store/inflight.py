"""The in-flight index: what the bridge handed to Celery and no worker finished.

The broker can still lose a task (a worker killed between taking it and
recording it as unacked); the bridge sends such stale ones again. A record
leaves the index once it passed its order gate: in gate_pass.lua on a
single Redis (the same two keys), with `forget` on a cluster.

Beside it, what no worker took yet: the bridge adds a task's messages to
`queued` by dispatch time, and a worker's main process removes them as it
takes the task off the broker, raising the `taken` mark to the task's
dispatch time. The broker's queue is first in, first out: a message queued
before something already taken a while ago is lost (docs/design.md: "Under
faults"). Each key is written by its own command: on a cluster they may live
on different nodes.
"""

from __future__ import annotations

import time
import typing
from typing import Any

from pipeline.core.messages import Envelope, decode, encode
from pipeline.core.settings import Settings
from pipeline.store.keys import Keys
from pipeline.store.scripts import Runner

TAKEN_MARK = "mark"  # the one member of the `taken` sorted set


def forget(pipe: Any, keys: Keys, ids: list[str]) -> None:
    """Queue on `pipe` the removal of `ids` from the in-flight index."""
    pipe.zrem(keys.in_flight_index, *ids)
    pipe.hdel(keys.in_flight_envelopes, *ids)


class InFlight:
    """Dispatched, unfinished messages, and how often each task started."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings) -> None:
        self.redis = runner.client
        self.keys = keys
        self.settings = settings

    def track(self, envelopes: list[Envelope], at: float) -> None:
        """Remember messages dispatched at `at` (seconds since the epoch) until they pass their
        order gate, and as queued until a worker takes them; one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.in_flight_index, {e.id: at for e in envelopes}, nx=True)
        pipe.hset(self.keys.in_flight_envelopes, mapping={e.id: encode(e) for e in envelopes})
        pipe.zadd(self.keys.queued, {e.id: at for e in envelopes})
        pipe.execute()

    def taken(self, ids: list[str], dispatched_at: float) -> None:
        """A worker took off the broker a task the bridge dispatched at `dispatched_at`: its
        messages are no longer queued, and the mark rises to that time (never falls)."""
        pipe = self.redis.pipeline(transaction=False)
        if ids:
            pipe.zrem(self.keys.queued, *ids)
        pipe.zadd(self.keys.taken, {TAKEN_MARK: dispatched_at}, gt=True)
        pipe.execute()

    def queue_ends(self) -> tuple[float | None, float | None]:
        """(the taken mark, the oldest queued message's dispatch time), None where there is
        none; one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(self.keys.taken, TAKEN_MARK)
        pipe.zrange(self.keys.queued, 0, 0, withscores=True)
        mark, oldest = pipe.execute()
        return (None if mark is None else float(mark)), (float(oldest[0][1]) if oldest else None)

    def claim_queued(self, before: float, limit: int = 500) -> list[Envelope]:
        """Take out of `queued` the messages dispatched before `before` and never taken; the
        envelopes of those still in flight, in (partition, offset) order. Each is claimed by
        one caller only (the bridge that removed it), so two bridges never both send it again."""
        ids = typing.cast(list[str], self.redis.zrangebyscore(self.keys.queued, "-inf", f"({before}",
                                                              start=0, num=limit))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for msg_id in ids:
            pipe.zrem(self.keys.queued, msg_id)
        claimed = [msg_id for msg_id, removed in zip(ids, pipe.execute()) if removed]
        if not claimed:
            return []
        envelopes = [decode(raw) for raw in self.redis.hmget(self.keys.in_flight_envelopes, claimed) if raw]
        return sorted(envelopes, key=lambda e: (e.partition or 0, -1 if e.offset is None else e.offset))

    def stale(self, older_than: float, limit: int = 500) -> list[Envelope]:
        """Messages dispatched more than `older_than` seconds ago and still not finished;
        their clock restarts, so each is returned once per period."""
        index = self.keys.in_flight_index
        now = time.time()
        ids = typing.cast(list[str], self.redis.zrangebyscore(index, "-inf", now - older_than, start=0, num=limit))
        if not ids:
            return []
        raw = self.redis.hmget(self.keys.in_flight_envelopes, ids)
        self.redis.zadd(index, {i: now for i in ids}, xx=True)
        return [decode(r) for r in raw if r]

    def before(self, first_offsets: dict[int, int]) -> dict[int, dict[str, int]]:
        """For each partition of `first_offsets` ({partition: offset}), the highest offset
        below that offset of each channel's dispatched, unfinished messages
        ({partition: {channel: offset}}, partitions with none left out); one scan of the index."""
        latest: dict[int, dict[str, int]] = {}
        for _id, raw in self.redis.hscan_iter(self.keys.in_flight_envelopes, count=500):
            envelope = decode(raw)
            at = -1 if envelope.offset is None else envelope.offset
            if envelope.partition is not None and 0 <= at < first_offsets.get(envelope.partition, -1):
                channels = latest.setdefault(envelope.partition, {})
                channels[envelope.channel] = max(at, channels.get(envelope.channel, -1))
        return latest

    def oldest(self, partitions: set[int]) -> dict[int, int]:
        """The lowest offset of each partition's dispatched, unfinished messages
        ({partition: offset}, partitions with none left out); one scan of the index."""
        lowest: dict[int, int] = {}
        for _id, raw in self.redis.hscan_iter(self.keys.in_flight_envelopes, count=500):
            envelope = decode(raw)
            if envelope.partition in partitions and envelope.offset is not None:
                lowest[envelope.partition] = min(envelope.offset, lowest.get(envelope.partition, envelope.offset))
        return lowest

    def count_run(self, task_id: str) -> int:
        """How many times a task has started (redeliveries and retries included)."""
        key = self.keys.task_runs(task_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.settings.status_ttl)
        return int(pipe.execute()[0])
