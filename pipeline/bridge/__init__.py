"""The bridge: a Kafka consumer group that turns records into Celery tasks.

At least once: a record's offset is stored only after its task was handed to
the Celery broker and Redis has kept it (`pipeline.bridge.durability`);
stored offsets are committed in the background, on
partition revocation and at shutdown. Effects stay exactly once because the
tasks deduplicate (see `pipeline.store`). Run it with `python -m pipeline.bridge`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable

import redis
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from pipeline.bridge.durability import Durability, rewind_positions, watched_servers
from pipeline.bridge.lost import SWEEP_INTERVAL, LostTasks
from pipeline.bridge.records import ChannelOrder, OffsetGaps, pack_tasks
from pipeline.bridge.webhooks import WebhookStarter
from pipeline.core.errors import PermanentError
from pipeline.core.logs import configure_logging
from pipeline.core.messages import Envelope, decode, from_headers, offset_spans
from pipeline.core.metrics import (
    BRIDGE_LAG,
    DISPATCH_BATCHES,
    OFFSET_GAPS,
    RECORDS_CONSUMED,
    REDISPATCHED,
    serve,
)
from pipeline.core.settings import current
from pipeline.dlq import DeadLetters
from pipeline.kafka import Publisher, client_config, open_admin
from pipeline.kafka.topics import require_topics
from pipeline.store import Store, check_at_start, connect
from pipeline.taskqueue import DISPATCHED_HEADER, TASK_NAME, make_celery, ready_tasks

log = logging.getLogger("herald.bridge")
LAG_INTERVAL = 1.0  # seconds between updates of the consumer lag gauge


def consumer_config(settings) -> dict:
    """The bridge's librdkafka consumer configuration."""
    session_ms = int(settings.kafka_session_timeout * 1000)
    return client_config(
        settings,
        **{
            "group.id": settings.consumer_group,
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "auto.offset.reset": "earliest",
            # Eager rebalancing: with Tansu, cooperative-sticky never hands
            # revoked partitions to the new member (seen with two bridges).
            "partition.assignment.strategy": "range",
            "fetch.wait.max.ms": 5,
            # Small per-partition fetches (a record larger still comes whole):
            # with the 1 MiB default a backlog's poll held 500 records of one
            # partition, whose five batches the workers then ran one after
            # the other, each waiting at its channels' gates for the one
            # before; at 16 KiB a poll mixes several partitions.
            "max.partition.fetch.bytes": 16384,
            # Tansu answers a new group's first join after half the session
            # timeout (measured: 10 s -> 5.0 s, 6 s -> 3.0 s, 2 s -> 1.0 s).
            "session.timeout.ms": session_ms,
            # Also the rebalance timeout: how long a rebalance waits for a
            # member that left mid-rebalance without being heard (300 s by default).
            "max.poll.interval.ms": 30000,
            "heartbeat.interval.ms": min(1000, session_ms // 3),
        },
    )


class Bridge:
    """The consumer loop: decode, dispatch, store offsets."""

    def __init__(self, settings, celery_app, dead_letters: DeadLetters):
        self.settings = settings
        self.celery = celery_app
        self.dead_letters = dead_letters
        self.order = ChannelOrder(forget_after=settings.channel_idle_ttl / 2)
        self.unseeded: set[int] = set()  # assigned partitions whose first record has not come yet
        self.gaps = OffsetGaps()
        self.running = True
        self.store = dead_letters.store
        self.next_sweep = time.monotonic() + settings.sweep_interval
        self.lost = LostTasks(self.store, lambda: ready_tasks(celery_app, settings))
        self.next_lost_sweep = time.monotonic() + SWEEP_INTERVAL
        self.next_lag = 0.0
        self.consumer = Consumer(consumer_config(settings))
        self.durable = Durability(watched_servers(settings, self.store))
        self.webhooks = WebhookStarter(settings, self.store, celery_app)

    def stop(self, *_args) -> None:
        """Finish the current batch, commit, leave the group (SIGTERM handler)."""
        self.running = False

    def run(self) -> None:
        """Consume until stopped; always closes the consumer (which commits stored offsets)."""
        self.consumer.subscribe([self.settings.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while self.running:
                # A short timeout: consume() waits for it whenever fewer
                # records than asked for are ready, which is most of the time.
                records = self.consumer.consume(num_messages=self.settings.batch_size * 5, timeout=0.01)
                if records:
                    self.handle(records)
                if time.monotonic() >= self.durable.next_check:
                    self.keep_durable()
                # Also on RabbitMQ, which loses no task it confirmed: the sweep
                # is what runs a line's head parked past HERALD_ORDER_WAIT
                # again, for its last-resort pass (docs/design.md: "Order").
                if time.monotonic() >= self.next_sweep:
                    self.sweep()
                if time.monotonic() >= self.next_lost_sweep:
                    self.sweep_lost()
                if time.monotonic() >= self.next_lag:
                    self.measure_lag()
                if time.monotonic() >= self.webhooks.next_check:
                    self.webhooks.check()
            self._store(self.durable.settle())
        finally:
            self.consumer.close()
            log.info("bridge stopped")

    def handle(self, records) -> None:
        """Dispatch one polled set of records and store their offsets."""
        RECORDS_CONSUMED.inc(len(records))
        decoded, last_offsets = [], {}
        rereading: set[int] = set()
        if self.unseeded:
            self._seed({record.partition(): record.offset() for record in reversed(records)
                        if not record.error() and record.partition() in self.unseeded})
        for record in records:
            if record.error():
                self._record_error(record.error())
                continue
            partition, offset = record.partition(), record.offset()
            if partition in rereading:
                continue
            skipped = self.gaps.see(partition, offset)
            if skipped is not None and self._reread(partition, skipped[0]):
                rereading.add(partition)  # this poll's later records of it come again, in order
                continue
            if skipped is not None:
                OFFSET_GAPS.inc(skipped[1] - skipped[0] + 1)
                log.error("offsets skipped: the broker gave no records for them",
                          extra={"partition": partition, "first": skipped[0], "last": skipped[1]})
            last_offsets[partition] = offset
            try:
                message = decode(record.value())
            except PermanentError as exc:
                self.dead_letters.send(reason=str(exc), partition=partition, offset=offset, attempts=0,
                                       raw=record.value(), key=record.key())
                continue
            origin, request_id = from_headers(record.headers())
            kind, stamp = record.timestamp()
            envelope = dataclasses.replace(
                message.stripped(), partition=partition, offset=offset,
                prev=self.order.stamp(partition, message.channel, offset), origin=origin, request_id=request_id,
                kafka_ts=None if kind == TIMESTAMP_NOT_AVAILABLE else stamp)
            decoded.append((partition, envelope))
        if decoded:
            self._dispatch(list(pack_tasks(decoded, self.settings.batch_size)))
        if last_offsets:
            # Stored once Redis has kept the tasks (keep_durable).
            self.durable.hold({partition: offset + 1 for partition, offset in last_offsets.items()})

    def _reread(self, partition: int, first: int) -> bool:
        # Read the partition again from its first missing offset, if the gap has not
        # stayed through GAP_REREADS reads already and the consumer can seek there.
        if not self.gaps.reread(partition, first):
            return False
        try:
            self.consumer.seek(TopicPartition(self.settings.topic, partition, first))
        except KafkaException as exc:
            log.warning("reading a gap again failed", extra={"partition": partition, "first": first,
                                                             "error": str(exc)})
            return False
        self.gaps.expect(partition, first)
        log.warning("offsets skipped: reading them again", extra={"partition": partition, "first": first})
        return True

    def keep_durable(self) -> None:
        """Store the offsets Redis has kept; read again what a restarted Redis may have lost
        (pipeline.bridge.durability)."""
        self._store(self.durable.check())
        if not self.durable.rewind_needed:
            return
        assigned = self.consumer.assignment()
        partitions = {tp.partition for tp in assigned}
        if not partitions:  # nothing to read again: a new assignment starts from what is committed
            self.durable.rewound()
            return
        try:
            oldest = self.store.oldest_in_flight(partitions)
        except redis.RedisError as exc:  # the in-flight seed still orders what is read again
            log.warning("in-flight index unavailable", extra={"error": str(exc)})
            oldest = {}
        try:
            positions = rewind_positions(self.settings.topic, self.consumer.committed(assigned, timeout=10),
                                         oldest)
            for tp in positions:
                self.consumer.seek(tp)
        except KafkaException as exc:  # tried again at the next check; nothing is stored meanwhile
            log.warning("reading again failed", extra={"error": str(exc)})
            return
        # What was seen of these partitions is ahead of the records read again.
        self.order.forget(partitions)
        self.gaps.forget(partitions)
        self.unseeded.update(partitions)
        self.durable.rewound()
        log.warning("reading again after a redis restart",
                    extra={"positions": {tp.partition: tp.offset for tp in positions}})

    def _store(self, offsets: dict[int, int]) -> None:
        # Only for partitions still assigned: a revoked one's next owner reads them again.
        assigned = {tp.partition for tp in self.consumer.assignment()}
        kept = [TopicPartition(self.settings.topic, p, o) for p, o in offsets.items() if p in assigned]
        if kept:
            self.consumer.store_offsets(offsets=kept)

    def _seed(self, first_offsets: dict[int, int]) -> None:
        # Records before a partition's first offset read here were dispatched
        # by its previous owner (or before a restart); those no worker
        # finished are in the in-flight index. The first record read again of
        # each channel must wait for them, or it could overtake them. One scan
        # of the index for every partition first seen in this poll.
        if not first_offsets:
            return
        self.unseeded.difference_update(first_offsets)
        try:
            pending = self.store.in_flight_before(first_offsets)
        except redis.RedisError as exc:
            log.warning("order seed unavailable", extra={"partitions": sorted(first_offsets), "error": str(exc)})
            return
        for partition, offsets in pending.items():
            self.order.seed(partition, offsets)
            log.info("order seeded from in-flight messages", extra={"partition": partition,
                                                                   "channels": len(offsets)})

    def sweep_lost(self) -> None:
        """Send again at once what no worker took while something dispatched after it was
        taken, or the queue emptied (LostTasks)."""
        self.next_lost_sweep = time.monotonic() + SWEEP_INTERVAL
        lost = self._look("lost task sweep skipped", self.lost.sweep)
        self._redispatch(lost, "untaken", "redispatching a message no worker took",
                         list(pack_tasks([(e.partition, e) for e in lost], self.settings.batch_size)))

    def sweep(self) -> None:
        """Send again what was dispatched long ago and never finished, the fallback for what
        `sweep_lost` cannot see (a worker that recorded a task and lost it). Each goes alone:
        it still passes its channel's gate in order, and a predecessor lost with it is in
        this index too, sent again as well."""
        self.next_sweep = time.monotonic() + self.settings.sweep_interval
        stale = self._look("sweep skipped",
                           lambda: self.store.stale_dispatched(self.settings.redispatch_after))
        self._redispatch(stale, "unfinished", "redispatching a message no worker finished",
                         [[envelope] for envelope in stale])

    @staticmethod
    def _look(skipped: str, find: Callable[[], list[Envelope]]) -> list[Envelope]:
        # A sweep's look; a Redis or broker failure skips it, the next one tries again.
        try:
            return find()
        except Exception as exc:
            log.warning(skipped, extra={"error": str(exc)})
            return []

    def _redispatch(self, envelopes: list[Envelope], reason: str, event: str,
                    batches: list[list[Envelope]]) -> None:
        for envelope in envelopes:
            log.warning(event, extra={"message_id": envelope.id})
        if envelopes:
            REDISPATCHED.labels(reason).inc(len(envelopes))
            self._dispatch(batches)

    def _dispatch(self, batches: list[list[Envelope]]) -> None:
        """Send each batch as a task, in order, once all of them are in the in-flight index
        (one Redis round trip for a poll's batches, not one each)."""
        at = time.time()
        try:
            self.store.track_dispatched([envelope for batch in batches for envelope in batch], at)
        except redis.RedisError as exc:
            # Only the safety net is missing: the Celery broker (maybe another
            # Redis) still gets the tasks, which the state outage must not stop.
            log.warning("in-flight index unavailable", extra={"message_id": batches[0][0].id, "error": str(exc)})
        for batch in batches:
            self._send(batch, at)
        DISPATCH_BATCHES.inc(len(batches))

    def measure_lag(self) -> None:
        """Set the lag gauge of each partition this bridge owns: records between its
        position and the high watermark its last fetch saw (no broker round trip)."""
        self.next_lag = time.monotonic() + LAG_INTERVAL
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                if tp.offset < 0:  # nothing fetched yet: no position to measure from
                    continue
                high = self.consumer.get_watermark_offsets(tp, cached=True)[1]
                if high >= 0:
                    BRIDGE_LAG.labels(str(tp.partition)).set(max(0, high - tp.offset))
        except KafkaException as exc:
            log.warning("consumer lag unavailable", extra={"error": str(exc)})

    def _send(self, batch: list[Envelope], at: float) -> None:
        delay = 0.1
        while True:
            try:
                self.celery.send_task(TASK_NAME, args=([e.to_wire() for e in batch],),
                                      headers={DISPATCHED_HEADER: at})
                log.info("dispatched", extra={"message_id": batch[0].id, "count": len(batch),
                                              "partitions": offset_spans(batch)})
                return
            except Exception as exc:  # kombu raises many types; none may lose the batch
                if not self.running:
                    # Offsets of this poll are not stored: another bridge re-reads them.
                    raise SystemExit(0) from exc
                log.warning("celery broker unavailable, retrying", extra={"error": str(exc), "delay": delay})
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _record_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise KafkaException(error)
        log.warning("consumer error", extra={"error": error.str()})

    def _on_assign(self, _consumer, partitions) -> None:
        self.unseeded.update(p.partition for p in partitions)
        self.gaps.forget(p.partition for p in partitions)
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})

    def _on_revoke(self, consumer, partitions) -> None:
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:  # nothing stored yet is not a failure
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit on revoke failed", extra={"error": str(exc)})
        self.order.forget(p.partition for p in partitions)
        self.gaps.forget(p.partition for p in partitions)
        for p in partitions:  # another bridge reports them now
            try:
                BRIDGE_LAG.remove(str(p.partition))
            except KeyError:
                pass
        self.unseeded.difference_update(p.partition for p in partitions)
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})


def main() -> None:
    """Entry point of the `bridge` process."""
    settings = current()
    configure_logging("bridge", settings.log_level)

    try:
        warning = check_at_start(settings)  # Redis first, then Kafka, as the web does
        admin, metadata = open_admin(settings)
        del admin  # its threads end here; the consumer makes its own connections
        require_topics(settings, metadata)
        store = Store(connect(settings, settings.redis_pool_size), settings)
        store.redis.ping()
        serve(settings)  # a port in use stops the bridge here, in one line
    except Exception as exc:  # one clear line, never a traceback
        raise SystemExit(f"herald bridge: cannot start: {exc}") from None
    if warning:
        log.warning(warning)
    publisher = Publisher(settings, client_id=f"herald-bridge-{settings.node_id}")
    bridge = Bridge(settings, make_celery(settings), DeadLetters(publisher, store, settings))
    signal.signal(signal.SIGTERM, bridge.stop)
    signal.signal(signal.SIGINT, bridge.stop)
    log.info("bridge started", extra={"topic": settings.topic, "group": settings.consumer_group})
    try:
        bridge.run()
    finally:
        publisher.close()

