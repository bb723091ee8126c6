"""The deployment docs/operations.md promises ("Running on a Heroku-like host"), end to end: the
Procfile's release step, web, bridge and worker against Kafka over TLS with a client
certificate and a topic prefix, Redis over TLS, and RabbitMQ as the Celery broker."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests.harness import ROOT, Stack, tls_certificates
from tests.tls import make_pki, tls_kafka


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    pki = make_pki(base / "kafka-pki")
    kafka = tls_kafka(pki, base)
    redis_certs = tls_certificates(base / "redis-pki")
    system = None
    try:
        system = Stack(base / "stack", kafka_url=f"kafka+ssl://127.0.0.1:{kafka[-1].port}", redis_tls=redis_certs,
                       broker="amqp", KAFKA_TRUSTED_CERT=pki.text("ca.pem"), KAFKA_CLIENT_CERT=pki.text("client.pem"),
                       KAFKA_CLIENT_CERT_KEY=pki.text("client.key"), KAFKA_PREFIX=f"tenant-{uuid.uuid4().hex[:6]}.",
                       REDIS_TLS_CA=redis_certs["ca"].read_text())
        system.worker()
        system.bridge()
        system.webs = [system.web()]
        yield system
    finally:
        if system is not None:
            system.stop()
        for server in reversed(kafka):
            server.stop()


def test_the_procfile_release_line_runs_against_the_managed_services(deployed):
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "release"], cwd=ROOT, env=deployed.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert deployed.settings.topic in done.stdout and deployed.settings.topic.startswith("tenant-")


def test_a_message_goes_through_tls_kafka_tls_redis_and_rabbitmq(deployed):
    settings = deployed.settings
    assert settings.kafka_security_protocol == "SSL" and settings.redis_url.startswith("rediss://")
    assert settings.celery_broker_url.startswith("amqp://")
    web, token, channel = deployed.webs[0], deployed.token(), "deploy:lobby"
    client = web.ws(token)
    client.recv()
    client.subscribe(channel, status=True)
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "managed"}, token=token)
    assert status == 202, answer
    frame = client.expect(lambda f: f["op"] == "message", timeout=30)
    assert frame["id"] == answer["id"] and frame["data"] == "managed"
    client.expect(lambda f: f["op"] == "status" and f["id"] == answer["id"] and f["status"] == "delivered")
    assert web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2]["status"] == "delivered"
    client.close()
