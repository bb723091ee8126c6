"""What the bridge works out from the records alone, with no I/O: each channel's
previous offset (`ChannelOrder`), offsets the broker skipped (`OffsetGaps`), and
the tasks a poll's records are packed into (`group_batches`, `pack_tasks`).
"""

from __future__ import annotations

import time
from collections import OrderedDict

GAP_REREADS = 3  # reads of a partition again from offsets the broker skipped, before the gap stands


class ChannelOrder:
    """Remembers, per partition, the last offset seen of each channel (bounded, LRU).

    Each envelope carries `prev`, the offset of the previous message of its
    channel, so workers running in parallel can deliver a channel in order.
    A channel quiet for `forget_after` seconds starts again with no `prev`:
    its order gate in Redis expires (HERALD_CHANNEL_IDLE_TTL), and a record
    would otherwise wait HERALD_ORDER_WAIT for a gate that no longer exists.
    """

    def __init__(self, capacity: int = 100_000, forget_after: float | None = None, clock=time.monotonic):
        self.capacity = capacity
        self.forget_after = forget_after
        self.clock = clock
        self._last: dict[int, OrderedDict] = {}

    def stamp(self, partition: int, channel: str, offset: int) -> int | None:
        """Record `offset` for the channel and return the one before it (None when unknown)."""
        seen = self._last.setdefault(partition, OrderedDict())
        now = self.clock()
        before = seen.pop(channel, None)
        seen[channel] = (offset, now)
        if len(seen) > self.capacity:
            seen.popitem(last=False)
        if before is None or (self.forget_after is not None and now - before[1] > self.forget_after):
            return None
        return before[0]

    def seed(self, partition: int, offsets: dict[str, int]) -> None:
        """Take over what an earlier owner of the partition dispatched and no worker finished yet."""
        now = self.clock()
        seen = self._last.setdefault(partition, OrderedDict())
        for channel, offset in offsets.items():
            seen[channel] = (offset, now)

    def forget(self, partitions) -> None:
        """Drop what is known of partitions this bridge no longer owns."""
        for partition in partitions:
            self._last.pop(partition, None)


class OffsetGaps:
    """Notices offsets a partition's records skipped while this bridge owned it.

    Herald's topic has no transactions and no compaction, so within an
    assignment every offset is a record: a jump means records the broker
    did not hand over (seen on Tansu under load: bench/overload.py), whose
    messages were accepted. The bridge reads the partition again from the
    first one missing, up to GAP_REREADS times, before the records after the
    gap go on; a gap that stays is made seen (an error line naming the
    offsets, herald_bridge_skipped_offsets_total), where it was silent.
    """

    def __init__(self):
        self._next: dict[int, int] = {}
        self._rereads: dict[tuple[int, int], int] = {}  # (partition, first missing): reads again asked

    def see(self, partition: int, offset: int) -> tuple[int, int] | None:
        """Record a consumed offset; returns (first, last) skipped before it, or None."""
        expected = self._next.get(partition)
        self._next[partition] = offset + 1
        if expected is not None and offset > expected:
            return expected, offset - 1
        return None

    def reread(self, partition: int, first: int) -> bool:
        """Whether to read `partition` again from `first`, its first missing offset, or to
        let the gap stand: it stayed through GAP_REREADS reads."""
        asked = self._rereads.get((partition, first), 0)
        if asked >= GAP_REREADS:
            self._rereads.pop((partition, first), None)
            return False
        if len(self._rereads) > 1000:  # gaps of partitions this bridge no longer reads
            self._rereads.clear()
        self._rereads[(partition, first)] = asked + 1
        return True

    def expect(self, partition: int, offset: int) -> None:
        """The partition is read again from `offset`: the next record expected."""
        self._next[partition] = offset

    def forget(self, partitions) -> None:
        """A new assignment starts from the committed offset: no gap to measure against."""
        for partition in partitions:
            self._next.pop(partition, None)


def group_batches(records, batch_size: int):
    """Split decoded (partition, envelope) pairs into per-partition batches in offset order,
    taking the partitions in turn: two workers given consecutive tasks then get different
    partitions, whose records never wait for each other at an order gate."""
    by_partition: dict[int, list] = {}
    for partition, envelope in records:
        by_partition.setdefault(partition, []).append(envelope)
    rounds = max((len(envelopes) for envelopes in by_partition.values()), default=0)
    for start in range(0, rounds, batch_size):
        for partition, envelopes in by_partition.items():
            if start < len(envelopes):
                yield partition, envelopes[start:start + batch_size]


def pack_tasks(records, batch_size: int):
    """Tasks of up to `batch_size` decoded (partition, envelope) pairs: group_batches'
    per-partition batches, in its order, with consecutive ones put together while
    they fit.

    A Celery task costs the worker about 2.5 ms of CPU and a broker round
    trip whatever it holds. At 250 msg/s (bench/pipeline.py) a task per
    partition of a poll held 2.7 records, a task per poll 3.8: the worker's
    CPU per message went from 1,456 to 1,272 us. A batch of one partition
    never goes before an earlier one of the same partition, so each channel
    stays in Kafka order.
    """
    task: list = []
    for _partition, batch in group_batches(records, batch_size):
        if task and len(task) + len(batch) > batch_size:
            yield task
            task = []
        task.extend(batch)
    if task:
        yield task
