"""The cluster's gauges on web's /metrics, read at scrape time.

On a Heroku-like host only the web process is reachable, so its /metrics
also says how the whole system is doing: consumer lag per partition, Celery
queue depth, dead letters, messages in flight, live web nodes. Each source is
read concurrently within SCRAPE_BUDGET; one that does not answer in time is
left out and reported by `herald_cluster_source_up{source} 0`, so a scrape
never hangs on a broken service. The gauges come from a probe kept
HERALD_PROBE_TTL seconds (web/probe.py), one at a time per process, on
connections kept open between probes: scrapes cost the services nothing more.
"""

from __future__ import annotations

import logging
import threading
import time

import gevent
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client.core import GaugeMetricFamily

from pipeline.core.green import run_blocking
from pipeline.kafka import client_config
from web.probe import CachedProbe

log = logging.getLogger("herald.metrics")
SCRAPE_BUDGET = 2.0  # seconds all sources together may take; Prometheus' default scrape timeout is 10 s
# kombu's Redis transport keeps priorities 3, 6 and 9 in lists of their own, named after the queue.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)


class ClusterCollector:
    """A prometheus-client collector of the cluster's gauges (see the module's docstring)."""

    def __init__(self, services):
        self.services = services
        self.settings = services.settings
        self._consumer = None
        self._kafka_lock = threading.Lock()  # a gevent lock in the web: one Kafka read at a time
        self._broker = None
        self._amqp = None
        self._gauges = CachedProbe("cluster", self._probe, self.settings.probe_ttl)

    def describe(self):
        """Nothing to check at registration: the gauges are made by each probe."""
        return []

    def collect(self):
        """The gauges of the last probe, or of a new one if it is older than HERALD_PROBE_TTL."""
        yield from self._gauges.get()

    def _probe(self) -> list:
        """Read every source at once; the gauges of those that answered in time."""
        families = []
        sources = {"kafka": self._consumer_lag, "redis": self._redis_gauges, "celery": self._queue_depth}
        jobs = {name: gevent.spawn(read) for name, read in sources.items()}
        gevent.joinall(list(jobs.values()), timeout=SCRAPE_BUDGET)
        up = GaugeMetricFamily("herald_cluster_source_up",
                               "1 when the source of the cluster gauges answered within the scrape's budget",
                               labels=["source"])
        for name, job in jobs.items():
            if not job.ready():
                job.kill(block=False)
                log.warning("metrics source too slow", extra={"source": name, "budget": SCRAPE_BUDGET})
            elif not job.successful():
                log.warning("metrics source failed", extra={"source": name, "error": str(job.exception)})
            ok = job.ready() and job.successful()
            up.add_metric([name], 1 if ok else 0)
            if ok:
                families.extend(job.value)
        return [*families, up]

    # -- sources -------------------------------------------------------------
    def _consumer_lag(self) -> list:
        with self._kafka_lock:
            lags = run_blocking(self._read_lag, time.monotonic() + SCRAPE_BUDGET)
        family = GaugeMetricFamily("herald_consumer_group_lag", "Records of the topic the bridges' consumer group "
                                   "has not committed yet, per partition", labels=["partition"])
        for partition, lag in sorted(lags.items()):
            family.add_metric([str(partition)], lag)
        return [family]

    def _read_lag(self, deadline: float) -> dict[int, int]:
        # Runs in a native thread: librdkafka's calls block in C.
        def left():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("out of time")
            return remaining

        if self._consumer is None:
            # Never subscribes: it only reads the group's committed offsets, it does not join it.
            self._consumer = Consumer(client_config(self.settings, **{
                "group.id": self.settings.consumer_group, "enable.auto.commit": False,
                "client.id": f"herald-metrics-{self.settings.node_id}"}))
        topic = self.settings.topic
        metadata = self._consumer.list_topics(topic, timeout=left())
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]
        committed = self._consumer.committed(partitions, timeout=left())
        lags = {}
        for tp in committed:
            if tp.error is not None:
                raise KafkaException(tp.error)
            low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=left(),
                                                             cached=False)
            # No commit yet: the group starts from the earliest record it can still read.
            done = tp.offset if tp.offset >= 0 else low
            lags[tp.partition] = max(0, high - done)
        return lags

    def _redis_gauges(self) -> list:
        store = self.services.store
        keys = store.keys
        now = time.time()
        pipe = store.redis.pipeline(transaction=False)
        pipe.zcard(keys.dead_letter_index)
        pipe.zcard(keys.in_flight_index)
        pipe.zcount(keys.nodes, now - self.settings.presence_ttl, "+inf")
        dead, in_flight, nodes = pipe.execute()
        return [
            GaugeMetricFamily("herald_dlq_size", "Dead letters kept in the index (GET /api/v1/dlq)", value=dead),
            GaugeMetricFamily("herald_in_flight_messages", "Messages dispatched to workers and not finished yet",
                              value=in_flight),
            GaugeMetricFamily("herald_web_nodes", "Web processes (hub nodes) that sent a heartbeat lately",
                              value=nodes),
        ]

    def _queue_depth(self) -> list:
        queue = self.settings.task_queue
        if self.settings.redis_broker:
            if self._broker is None:
                from pipeline.store import connect

                self._broker = connect(self.settings, 2, url=self.settings.celery_broker_url)
            pipe = self._broker.pipeline(transaction=False)
            for step in _PRIORITY_STEPS:
                pipe.llen(queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}")
            depth = sum(pipe.execute())
        elif self.settings.amqp_broker:
            depth = self._amqp_depth(queue)
        else:
            return []
        return [GaugeMetricFamily("herald_celery_queue_depth", "Tasks waiting in the Celery broker's queue",
                                  value=depth)]

    def _amqp_depth(self, queue: str) -> int:
        """The ready messages of a RabbitMQ queue (a passive declare: it is never created here),
        on one connection kept between probes; a failed one is dropped and made again next time."""
        import kombu

        if self._amqp is None:
            # Without heartbeats (kombu's default): nothing would answer them between probes.
            self._amqp = kombu.Connection(self.settings.celery_broker_url, connect_timeout=SCRAPE_BUDGET)
        try:
            return self._amqp.default_channel.queue_declare(queue, passive=True).message_count
        except BaseException:  # an error, or the budget's kill in the middle of a call
            connection, self._amqp = self._amqp, None
            connection.release()
            raise

