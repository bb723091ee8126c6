"""Outages of Kafka and Redis: never a 202 for a record Kafka did not take, never a lost message."""

from __future__ import annotations

import time

import pytest

from tests.harness import Stack, wait_until


@pytest.fixture
def kafka_stack(tmp_path):
    system = Stack(tmp_path, own_kafka=True, HERALD_PRODUCE_TIMEOUT=3)
    try:
        system.web_proc = system.web("web")
        yield system
    finally:
        system.stop()


def test_kafka_down_answers_503_within_the_bound_and_recovers(kafka_stack, channel):
    web, token = kafka_stack.web_proc, kafka_stack.token()
    assert web.request("POST", "/api/v1/messages", {"channel": channel, "data": 0}, token=token)[0] == 202
    kafka_stack.kafka.kill()
    answers = []
    for n in range(3):
        started = time.monotonic()
        status, headers, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": n},
                                            token=token, timeout=30)
        answers.append((status, time.monotonic() - started))
        assert status == 503, body
        assert headers["Retry-After"] and body["type"].endswith("kafka-unavailable")
    # The bound is HERALD_PRODUCE_TIMEOUT (3 s) plus the last delivery report.
    assert all(elapsed < 3 + 2 for _, elapsed in answers), answers
    status, _, body = web.request("GET", "/readyz")
    assert status == 503 and "kafka" in body["detail"]

    kafka_stack.kafka.start()  # comes back empty, as Tansu's memory store does
    wait_until(lambda: web.request("POST", "/api/v1/messages", {"channel": channel, "data": "back"},
                                   token=token, timeout=30)[0] == 202, 60, 0.5, "publishing to work again")


def test_state_redis_down_during_processing_retries_until_delivered(tmp_path, channel):
    system = Stack(tmp_path, own_redis=True, separate_broker=True, HERALD_RETRY_BASE_DELAY=0.2,
                   HERALD_RETRY_MAX_DELAY=2, HERALD_RETRY_MAX=30)
    try:
        system.worker()
        system.bridge()
        web = system.web()
        token = system.token()
        client = web.ws(token)
        client.recv()
        client.subscribe(channel)
        system.redis.kill()
        status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "waits"},
                                        token=token)
        assert status == 202, answer
        worker = system.procs[0]
        worker.wait_for_log("retrying", 30)
        system.redis.start()
        frame = client.expect(lambda f: f["op"] == "message", timeout=60)
        assert frame["id"] == answer["id"] and frame["data"] == "waits"
        message = wait_until(lambda: system.store().get_message(answer["id"]), 10, what="status")
        # The restarted Redis kept nothing: the status was rebuilt by the retry that succeeded.
        assert message["status"] == "delivered" and message["data"] == "waits"
        assert worker.log().count('"retrying"') >= 1
        client.close()
    finally:
        system.stop()
