"""Kafka over TLS with a client certificate, and SASL: Herald's own client_config against
Tansu behind stunnel (tests/tls.py), and the one line each bad credential gives at start-up."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from devtools import embedded
from pipeline.core.settings import Settings
from pipeline.kafka import Publisher, client_config
from pipeline.release import release
from tests.harness import ROOT, SECRET
from tests.tls import make_pki, tls_kafka


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_port(pki, tmp_path_factory):
    """Tansu behind stunnel, which demands a client certificate from the test CA."""
    servers = tls_kafka(pki, tmp_path_factory.mktemp("tls-kafka"))
    yield servers[-1].port
    for server in reversed(servers):
        server.stop()


@pytest.fixture(scope="module")
def sasl_port(pki, tmp_path_factory):
    """The same, with Tansu demanding SCRAM-SHA-512 credentials behind the TLS."""
    servers = tls_kafka(pki, tmp_path_factory.mktemp("sasl-kafka"), authentication=True)
    yield servers[-1].port
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def make_env(pki, spare_redis_url):
    """The environment of a process on the TLS Kafka at a port, with `overrides` (None removes one)."""
    def make(port, **overrides) -> dict:
        env = {"HERALD_SECRET_KEY": SECRET, "KAFKA_URL": f"kafka+ssl://127.0.0.1:{port}",
               "KAFKA_TRUSTED_CERT": pki.text("ca.pem"), "KAFKA_CLIENT_CERT": pki.text("client.pem"),
               "KAFKA_CLIENT_CERT_KEY": pki.text("client.key"), "HERALD_TOPIC_PARTITIONS": "2",
               "KAFKA_PREFIX": f"tenant-{uuid.uuid4().hex[:6]}.", "HERALD_TOPIC": "herald.tls",
               "REDIS_URL": spare_redis_url}
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    return make


def test_release_publish_and_consume_through_tls_with_a_client_certificate(pki, make_env, tls_port, tmp_path):
    settings = Settings.from_env(make_env(tls_port, DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}"))
    assert settings.topic.startswith("tenant-") and settings.kafka_security_protocol == "SSL"
    report = release(settings)
    assert f"topic {settings.topic}: created (2 partitions, replication 1, min.insync.replicas 1)" in report
    publisher = Publisher(settings, client_id="tls-test")
    try:
        publisher.warm_up()
        partition, offset = publisher.publish(settings.topic, "chat:tls", b"over tls")
    finally:
        publisher.close(5)
    consumer = Consumer(client_config(settings, **{"group.id": settings.consumer_group,
                                                   "enable.auto.commit": False}))
    try:
        consumer.assign([TopicPartition(settings.topic, partition, offset)])
        record = None
        deadline = time.monotonic() + 15
        while record is None and time.monotonic() < deadline:
            record = consumer.poll(0.5)
        assert record is not None and not record.error(), record and record.error()
        assert record.value() == b"over tls" and record.key() == b"chat:tls"
    finally:
        consumer.close()


def _start(argv: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(argv, env={"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


BRIDGE = [sys.executable, "-m", "pipeline.bridge"]
RELEASE = [sys.executable, "-m", "flask", "--app", "app", "release"]


@pytest.mark.parametrize("argv, overrides, words", [
    (BRIDGE, {"KAFKA_TRUSTED_CERT": "rogue-ca.pem"}, "not signed by KAFKA_TRUSTED_CERT"),
    (RELEASE, {"KAFKA_TRUSTED_CERT": "rogue-ca.pem"}, "not signed by KAFKA_TRUSTED_CERT"),
    (BRIDGE, {"KAFKA_CLIENT_CERT": "rogue-client.pem", "KAFKA_CLIENT_CERT_KEY": "rogue-client.key"},
     "refused the TLS client certificate (KAFKA_CLIENT_CERT/KAFKA_CLIENT_CERT_KEY)"),
    (RELEASE, {"KAFKA_CLIENT_CERT": None, "KAFKA_CLIENT_CERT_KEY": None},
     "refused the TLS client certificate (KAFKA_CLIENT_CERT/KAFKA_CLIENT_CERT_KEY)"),
], ids=["bridge-bad-ca", "release-bad-ca", "bridge-bad-client-cert", "release-no-client-cert"])
def test_bad_certificates_are_one_quick_line_at_start(pki, make_env, tls_port, argv, overrides, words):
    env = make_env(tls_port, **{k: pki.text(v) if v else None for k, v in overrides.items()})
    result, took = _start(argv, env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert words in lines[0] and "Traceback" not in result.stderr
    assert took < 10, took  # librdkafka alone would retry forever


@pytest.mark.parametrize("argv", [BRIDGE, RELEASE], ids=["bridge", "release"])
def test_a_password_the_broker_refuses_is_one_quick_line_at_start(pki, make_env, sasl_port, argv):
    env = make_env(sasl_port, KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="herald",
               KAFKA_SASL_PASSWORD="not-the-password")
    assert Settings.from_env(env).kafka_security_protocol == "SASL_SSL"
    result, took = _start(argv, env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "refused KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD (SCRAM-SHA-512)" in lines[0]
    assert took < 10, took


def test_web_with_a_bad_ca_is_one_quick_line(pki, make_env, tls_port):
    env = make_env(tls_port, KAFKA_TRUSTED_CERT=pki.text("rogue-ca.pem"), PORT=str(embedded.free_port()))
    result, took = _start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("herald web: cannot start:") and "KAFKA_TRUSTED_CERT" in lines[0]
    assert took < 10, took
