"""What is readable of a message before a worker ran it, and dead-letter names (redact applies
before the message is readable anywhere; docs/design.md: "Message ids")."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from tests.harness import Stack, wait_until


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """A stack of its own whose worker and bridge start only when a test asks (`start`)."""
    system = Stack(tmp_path_factory.mktemp("quiet"), HERALD_MESSAGE_TYPES="message")
    web = system.web("web-quiet")
    started = []

    def start():
        if not started:
            started.extend([system.worker(), system.bridge()])

    try:
        yield system, web, start
    finally:
        system.stop()


def test_a_message_read_before_its_rules_ran_shows_no_data(quiet, channel):
    system, web, start = quiet
    admin, token = system.token("ops", admin=True), system.token()
    status, _, body = web.request("PUT", "/api/v1/rules", content_type="application/yaml", token=admin,
                                  raw=f"rule: {{id: pii, condition: {{channel: '{channel}'}}, "
                                      "action: {redact: [data.card]}}".encode())
    assert status == 200, body
    card = "4111111111111111"
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"card": card, "n": 1}},
                                    token=token)
    assert status == 202
    # No worker runs yet: the message is `accepted`, and its data not readable as published.
    status, _, message = web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)
    assert status == 200 and message["status"] == "accepted" and message["data"] is None, message
    raw = system.store().redis.hgetall(system.store().keys.message(answer["global_id"]))
    assert raw["status"] == "accepted" and card not in str(raw)
    start()
    delivered = wait_until(lambda: (m := web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2])
                           and m["status"] == "delivered" and m, 60, what="delivered")
    assert card not in str(delivered) and delivered["data"]["n"] == 1


def test_a_clients_id_never_takes_the_dead_letter_of_an_undecodable_record(quiet, channel):
    system, web, start = quiet
    start()
    admin, token = system.token("ops", admin=True), system.token()
    placed = []
    producer = Producer({"bootstrap.servers": system.bootstrap})
    producer.produce(system.settings.topic, key=channel, value=b"<xml>not json</xml>",
                     on_delivery=lambda err, record: placed.append((record.partition(), record.offset())))
    producer.flush(10)
    (partition, offset), = placed
    raw_id = f"raw-{partition}-{offset}"

    def letters():
        return {item["id"]: item for item in web.request("GET", "/api/v1/dlq?limit=500", token=admin)[2]["items"]}

    wait_until(lambda: raw_id in letters(), 30, what="the undecodable record's dead letter")
    # A message whose id is that letter's, which the worker dead-letters too (a type it does not know).
    status, _, answer = web.request("POST", "/api/v1/messages",
                                    {"id": raw_id, "channel": channel, "data": 1, "type": "bogus"}, token=token)
    assert status == 202
    wait_until(lambda: answer["global_id"] in letters(), 30, what="the message's dead letter")
    time.sleep(0.5)
    found = letters()
    assert found[raw_id]["message"] is None and "not JSON" in found[raw_id]["reason"]
    assert found[answer["global_id"]]["message"]["data"] == 1
    assert web.request("POST", f"/api/v1/dlq/{raw_id}/replay", token=admin)[0] == 409
