"""Kafka plumbing shared by the web, the bridge and the workers: topics and the producer.

Plain confluent-kafka, so Herald runs on any Kafka cluster; clients are made
per process, after any fork (librdkafka's threads do not survive `fork()`).
"""

from __future__ import annotations

import logging
import socket
import time

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import KafkaUnavailable, ValidationError
from pipeline.green import ResultChannel, run_blocking, start_native_thread

log = logging.getLogger("herald.kafka")


def client_config(settings, **extra) -> dict:
    """The librdkafka configuration every Herald client starts from: addresses, TLS, SASL.

    Certificates and keys are PEM text (`ssl.*.pem`), as Heroku-like hosts
    give them in the environment; nothing is written to disk.
    """
    conf = {"bootstrap.servers": settings.kafka_bootstrap_servers, "socket.keepalive.enable": True,
            "security.protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol.endswith("SSL"):
        if settings.kafka_trusted_cert:
            conf["ssl.ca.pem"] = settings.kafka_trusted_cert
        if settings.kafka_client_cert:
            conf["ssl.certificate.pem"] = settings.kafka_client_cert
            conf["ssl.key.pem"] = settings.kafka_client_cert_key
        if not settings.kafka_check_hostname:
            conf["ssl.endpoint.identification.algorithm"] = "none"
    if settings.kafka_security_protocol.startswith("SASL"):
        conf.update({"sasl.mechanism": settings.kafka_sasl_mechanism,
                     "sasl.username": settings.kafka_sasl_username,
                     "sasl.password": settings.kafka_sasl_password})
    conf.update(extra)
    return conf


def kafka_reachable(settings, timeout: float = 3.0) -> bool:
    """A plain TCP check of the bootstrap servers: safe before a fork, unlike a client."""
    for server in settings.kafka_bootstrap_servers.split(","):
        host, _, port = server.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def ensure_topics(settings, timeout: float = 10.0) -> None:
    """Create the main and dead-letter topics when missing.

    A broker may come back empty (Tansu's memory store does), so every process
    calls this at start instead of trusting that topics exist.
    """
    admin = AdminClient(client_config(settings))
    wanted = [
        NewTopic(settings.topic, settings.topic_partitions, 1),
        NewTopic(settings.dlq_topic, settings.topic_partitions, 1),
    ]

    def create():
        existing = admin.list_topics(timeout=timeout).topics
        missing = [t for t in wanted if t.topic not in existing]
        if not missing:
            return
        for topic, future in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                future.result(timeout)
                log.info("topic created", extra={"topic": topic})
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    try:
        run_blocking(create)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot create topics: {exc}") from None


class Publisher:
    """An idempotent `acks=all` producer whose `publish` returns only once Kafka has the record."""

    def __init__(self, settings, *, client_id: str = "herald"):
        self._settings = settings
        self._timeout = settings.produce_timeout
        # message.timeout.ms bounds librdkafka's own retries to our answer's
        # deadline, so a record we answered 503 for is not written later.
        self._config = client_config(
            settings,
            **{
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "message.timeout.ms": int(self._timeout * 1000),
                "queue.buffering.max.messages": 100_000,
                "queue.buffering.max.kbytes": 131_072,
                "message.max.bytes": max(1_048_576, settings.max_message_bytes * 2 + 4096),
            },
        )
        self._producer = Producer(self._config)
        # A fatal error (say, a broker that restarted empty and forgot our
        # producer id) leaves an idempotent producer unusable: make a new one.
        self._fatal = False
        self._results = ResultChannel()
        # After a failed delivery the broker may have come back empty: check
        # the topics (at most every few seconds) before the next record.
        self._topics_suspect = False
        self._topics_checked = 0.0
        # A plain flag: the poll thread is native, where gevent's Event is not safe.
        self._running = True
        start_native_thread(self._poll_loop, "herald-producer-poll")

    def warm_up(self, timeout: float = 5.0) -> None:
        """Connect and fetch metadata now, so the first request does not pay for it."""
        try:
            run_blocking(self._producer.list_topics, None, timeout)
        except KafkaException as exc:
            raise KafkaUnavailable(f"Kafka did not answer: {exc}") from None

    def reachable(self, timeout: float = 2.0) -> bool:
        """True when a broker answers a metadata request within `timeout`."""
        try:
            run_blocking(self._producer.list_topics, self._settings.topic, timeout)
            return True
        except KafkaException:
            return False

    def publish(self, topic: str, key: str, value: bytes, headers=None) -> tuple[int, int]:
        """Produce one record and wait for its acknowledgement; returns (partition, offset)."""
        future = self.send(topic, key, value, headers)
        return self.wait(future)

    def send(self, topic: str, key: str, value: bytes, headers=None):
        """Queue one record; `wait()` on the returned future gives (partition, offset)."""
        if self._fatal:
            self._fatal = False
            retired, self._producer = self._producer, Producer(self._config)
            run_blocking(_retire, retired)
            log.warning("producer rebuilt after a fatal error")
        if self._topics_suspect and time.monotonic() - self._topics_checked > 2.0:
            self._topics_checked = time.monotonic()
            ensure_topics(self._settings, timeout=3.0)  # raises KafkaUnavailable while Kafka is down
            self._topics_suspect = False
        future = self._results.future()

        def delivered(err, msg):
            if err is not None:
                self._topics_suspect = True
                self._fatal = self._fatal or err.fatal()
                self._results.resolve(future, error=_delivery_error(err))
            else:
                self._results.resolve(future, (msg.partition(), msg.offset()))

        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
        except BufferError:
            raise KafkaUnavailable("the producer queue is full: Kafka is slow or down") from None
        except KafkaException as exc:
            self._topics_suspect = True
            raise _delivery_error(exc.args[0]) from None
        return future

    def wait(self, future) -> tuple[int, int]:
        """Block this greenlet or thread until the record is acknowledged."""
        try:
            # One extra second: librdkafka reports its own timeout at the deadline.
            return self._results.wait(future, self._timeout + 1.0)
        except TimeoutError:
            self._topics_suspect = True
            raise KafkaUnavailable("Kafka did not acknowledge the record in time") from None

    def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued (up to `timeout`), stop polling; returns records left."""
        self._running = False
        return self._producer.flush(timeout)

    def _poll_loop(self):
        while self._running:
            try:
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._fatal = self._fatal or exc.args[0].fatal()
                time.sleep(0.05)


def _retire(producer: Producer) -> None:
    # Fail what it still holds now (those callers get 503) rather than at their deadline.
    producer.purge()
    producer.poll(0)


def _delivery_error(err: KafkaError):
    if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return ValidationError("The message is larger than Kafka accepts", status=413, title="Message too large")
    return KafkaUnavailable(f"Kafka did not take the record: {err.str()}")
