"""docs/operations.md: "RabbitMQ as the Celery broker": the whole journey, a quorum queue, publisher confirms."""

from __future__ import annotations

import subprocess
import sys

import kombu
import pytest
from amqp.exceptions import PreconditionFailed

from tests.harness import ROOT, Stack


@pytest.fixture(scope="module")
def amqp_stack(tmp_path_factory):
    """A stack whose Celery broker is RabbitMQ; Kafka and Redis are the session's or its own."""
    system = Stack(tmp_path_factory.mktemp("amqp"), broker="amqp")
    try:
        system.worker()
        system.bridge()
        system.web_process = system.web()
        yield system
    finally:
        system.stop()


def test_a_message_goes_through_rabbitmq_to_its_subscriber_and_is_delivered(amqp_stack, channel):
    web, token = amqp_stack.web_process, amqp_stack.token()
    client = web.ws(token)
    client.recv()
    client.subscribe(channel, status=True)
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"text": "hi"}},
                                    token=token)
    assert status == 202, answer
    frame = client.expect(lambda f: f["op"] == "message", timeout=30)
    assert frame["id"] == answer["id"] and frame["data"] == {"text": "hi"}
    client.expect(lambda f: f["op"] == "status" and f["status"] == "delivered", timeout=10)
    assert web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2]["status"] == "delivered"
    client.close()


def test_the_task_queue_is_a_quorum_queue(amqp_stack):
    # Declaring an existing queue with another type is refused (406): so it exists, and is not classic.
    with kombu.Connection(amqp_stack.settings.celery_broker_url) as connection, \
            pytest.raises(PreconditionFailed, match="x-queue-type"):
        connection.default_channel.queue_declare(f"{amqp_stack.settings.redis_prefix}.tasks", durable=True,
                                                 auto_delete=False, arguments={"x-queue-type": "classic"})


def test_a_publish_rabbitmq_refuses_raises_instead_of_vanishing(amqp_stack):
    # Without publisher confirms, basic.publish to a missing exchange returns as if it had worked.
    probe = """
import kombu
from tasks import celery_app
with celery_app.connection_for_write() as connection:
    try:
        kombu.Producer(connection).publish({}, exchange="herald-no-such-exchange", routing_key="x")
    except connection.channel_errors as exc:
        print("refused", exc)
    else:
        print("vanished")
"""
    out = subprocess.run([sys.executable, "-c", probe], env=amqp_stack.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.startswith("refused") and "NOT_FOUND" in out.stdout, out.stdout + out.stderr
