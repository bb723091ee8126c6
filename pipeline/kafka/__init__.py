"""Kafka plumbing shared by the web, the bridge and the workers: client settings, the admin
client and the producer (`Publisher`); Herald's topics are `topics.py`'s.

Plain confluent-kafka, so Herald runs on any Kafka cluster; clients are made
per process, after any fork (librdkafka's threads do not survive `fork()`).
"""

from __future__ import annotations

import logging
import socket
import time

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from pipeline.core.errors import KafkaUnavailable, TooLargeForKafka
from pipeline.core.green import ResultChannel, run_blocking, start_native_thread
from pipeline.core.metrics import PRODUCE_LATENCY

log = logging.getLogger("herald.kafka")


def client_config(settings, **extra) -> dict:
    """The librdkafka configuration every Herald client starts from: addresses, TLS, SASL.

    Certificates and keys are PEM text (`ssl.*.pem`), as Heroku-like hosts
    give them in the environment; nothing is written to disk.
    """
    conf = {"bootstrap.servers": settings.kafka_bootstrap_servers, "socket.keepalive.enable": True,
            "security.protocol": settings.kafka_security_protocol,
            # A producer would otherwise have the broker create a missing topic
            # with the broker's defaults (Tansu's: 4 partitions); only the
            # release phase makes topics (docs/operations.md: "Release phase").
            "allow.auto.create.topics": False}
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


# librdkafka logs every failed attempt to stderr; the start-up check reports
# the cause once, in its own words, so its client logs nowhere.
_quiet = logging.Logger("herald.kafka.check")
_quiet.addHandler(logging.NullHandler())


def open_admin(settings, timeout: float = 15.0):
    """An AdminClient that has fetched cluster metadata: returns (admin, metadata).

    librdkafka retries refused certificates and passwords forever without
    failing a call (docs/operations.md: "Managed Kafka"), so this bounds the wait
    and turns the errors it saw into one sentence naming the variable to fix;
    raises KafkaUnavailable. Drop the admin before a fork: no librdkafka
    thread may live across one.
    """
    seen: list[KafkaError] = []
    admin = AdminClient(client_config(settings, error_cb=seen.append, logger=_quiet))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin, admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except KafkaException as exc:
            admin.poll(0)  # serves the error callbacks queued meanwhile
            # A refused certificate or password will not get better: say so now.
            if time.monotonic() >= deadline or any(_refusal(e) for e in seen):
                raise KafkaUnavailable(_explain(settings, seen, exc.args[0])) from None


def _refusal(error: KafkaError) -> bool:
    return error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL) or "alert" in error.str()


def _explain(settings, seen: list[KafkaError], final: KafkaError) -> str:
    where = f"Kafka at {settings.kafka_bootstrap_servers}"
    texts = [e.str() for e in seen]
    if any(e.code() == KafkaError._AUTHENTICATION for e in seen):
        detail = next(e.str() for e in seen if e.code() == KafkaError._AUTHENTICATION)
        return (f"{where} refused KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD "
                f"({settings.kafka_sasl_mechanism}): {_last_clause(detail)}")
    if any("certificate verify failed" in t for t in texts):
        if any("hostname mismatch" in t or "IP address mismatch" in t for t in texts):
            return (f"{where}: the broker's certificate does not name its host (KAFKA_URL or "
                    "KAFKA_BOOTSTRAP_SERVERS; KAFKA_SSL_CHECK_HOSTNAME=off to accept it)")
        return f"{where}: the broker's certificate is not signed by KAFKA_TRUSTED_CERT (or the system's CAs)"
    alert = next((t for t in texts if "alert" in t and "SSL" in t), None)
    if alert:
        return (f"{where} refused the TLS client certificate (KAFKA_CLIENT_CERT/KAFKA_CLIENT_CERT_KEY): "
                f"{_last_clause(alert)}")
    ssl_error = next((t for t in texts if "SSL" in t), None)
    if ssl_error:
        return f"{where}: TLS failed (KAFKA_SECURITY_PROTOCOL, KAFKA_TRUSTED_CERT): {_last_clause(ssl_error)}"
    return f"{where} does not answer ({final.str()})"


def _last_clause(text: str) -> str:
    # "ssl://h:9093/bootstrap: SASL authentication error: ... (after 3ms in state AUTH_REQ)" -> the cause.
    return text.split("/bootstrap: ", 1)[-1].split(" (after ", 1)[0]


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
        future = self._results.future()

        def delivered(err, msg):
            if err is not None:
                self._fatal = self._fatal or err.fatal()
                self._results.resolve(future, error=_delivery_error(err))
            else:
                self._results.resolve(future, (msg.partition(), msg.offset(), msg.latency()))

        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
        except BufferError:
            raise KafkaUnavailable("the producer queue is full: Kafka is slow or down") from None
        except KafkaException as exc:
            raise _delivery_error(exc.args[0]) from None
        return future

    def wait(self, future) -> tuple[int, int]:
        """Block this greenlet or thread until the record is acknowledged."""
        try:
            # One extra second: librdkafka reports its own timeout at the deadline.
            partition, offset, latency = self._results.wait(future, self._timeout + 1.0)
        except TimeoutError:
            raise KafkaUnavailable("Kafka did not acknowledge the record in time") from None
        # Observed here, in the caller: the delivery callback runs in a native
        # thread, where the web's (gevent) metric locks must not be taken.
        if latency is not None:
            PRODUCE_LATENCY.observe(latency)
        return partition, offset

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
        return TooLargeForKafka("The message is larger than Kafka accepts")
    return KafkaUnavailable(f"Kafka did not take the record: {err.str()}")
