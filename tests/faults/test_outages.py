"""Outages of Kafka and Redis under load: never a 202 for a record Kafka did not take, never a lost message."""

from __future__ import annotations

import time

from tests.faults.conftest import start_collector
from tests.faults.load import (
    Publisher,
    assert_exactly_once,
    history_of,
    report,
    wait_for_delivery,
)
from tests.harness import close_code, wait_until


def test_kafka_down_answers_503_within_the_bound_and_recovers(make_stack, channel):
    stack = make_stack(env={"HERALD_PRODUCE_TIMEOUT": 3})
    web, token = stack.web(), stack.token()
    assert web.request("POST", "/api/v1/messages", {"channel": channel, "data": 0}, token=token)[0] == 202
    stack.kafka.kill()
    timings = []
    for n in range(5):
        started = time.monotonic()
        status, headers, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": n},
                                            token=token, timeout=30)
        timings.append(round(time.monotonic() - started, 2))
        assert status == 503, body
        assert headers["Retry-After"] and body["type"].endswith("kafka-unavailable")
    # The bound is HERALD_PRODUCE_TIMEOUT (3 s) plus the last delivery report.
    assert max(timings) < 3 + 2, timings
    status, _, body = web.request("GET", "/readyz")
    assert status == 503 and "kafka" in body["detail"]

    stack.kafka.start()  # comes back empty, as Tansu's memory store does
    recovered_at = time.monotonic()
    # Processes never create topics: until the release step runs again, as an
    # operator would after losing the cluster's data, publishing still fails.
    status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "early"},
                                  token=token, timeout=30)
    assert status == 503, body
    stack.release()
    wait_until(lambda: web.request("POST", "/api/v1/messages", {"channel": channel, "data": "back"},
                                   token=token, timeout=30)[0] == 202, 60, 0.5, "publishing to work again")
    print(f"\nFAULT-FIGURES {{\"test\": \"kafka down\", \"answers_503\": 5, \"answers_202_while_down\": 0, "
          f"\"seconds_per_503\": {timings}, \"seconds_to_recover\": {time.monotonic() - recovered_at:.1f}}}")


def test_state_redis_down_during_processing_retries_until_delivered(make_stack, channel):
    stack = make_stack(separate_broker=True)
    worker = stack.worker()
    stack.bridge()
    web, token = stack.web(), stack.token()
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    stack.redis.kill()
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "waits"}, token=token)
    assert status == 202, answer
    refused = web.ws(token)  # connection caps are counted in Redis: "try again later"
    assert close_code(refused) == 1013
    refused.close()
    worker.wait_for_log('"retrying"', 30)
    stack.redis.start()
    frame = client.expect(lambda f: f["op"] == "message", timeout=60)
    assert frame["id"] == answer["id"] and frame["data"] == "waits"
    message = wait_until(lambda: stack.store().get_message(answer["id"]), 10, what="status")
    assert message["status"] == "delivered"
    client.close()


def test_redis_restart_under_load_loses_nothing(make_stack, channels):
    # A production Redis for Celery keeps an append-only file; so does this one.
    stack = make_stack(persistent_redis=True)
    stack.worker()
    stack.bridge()
    web, token = stack.web(), stack.token()
    collector = start_collector([web], token, channels)
    publisher = Publisher([web], token, channels, count=800, rate=100)
    publisher.start()
    time.sleep(3)
    stack.redis.stop()
    time.sleep(4)
    stack.redis.start()
    publisher.join()
    wait_for_delivery(collector, publisher, timeout=120)
    collector.stop()
    # The hub listens again: a new subscriber gets a new message live.
    probe = web.ws(token)
    probe.recv()
    probe.subscribe(channels[0])
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channels[0], "data": "after"},
                                    token=token)
    assert status == 202
    assert probe.expect(lambda f: f["op"] == "message")["id"] == answer["id"]
    probe.close()
    figures = report("redis restart", publisher, collector, history_of(stack, channels))
    assert_exactly_once(figures)
