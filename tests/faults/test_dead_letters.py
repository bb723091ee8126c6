"""Retries that run out, messages no handler can process, and replay from the DLQ."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil

from confluent_kafka import Producer

from tests.harness import read_topic, wait_until


def test_always_failing_task_is_dead_lettered_once_then_replayed(make_stack, channel, tmp_path):
    missing = tmp_path / "not-yet"  # the archive's directory: the fault, fixed by creating it again
    missing.mkdir()  # for the release step, which creates the archive's schema
    stack = make_stack(env={"DATABASE_URL": f"sqlite:///{missing}/archive.db", "HERALD_RETRY_MAX": 4})
    shutil.rmtree(missing)
    worker = stack.worker()
    stack.bridge()
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    watcher = web.ws(token)
    watcher.recv()
    watcher.subscribe(channel, status=True)

    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "doomed"},
                                    token=token)
    assert status == 202
    failed = watcher.expect(lambda f: f["op"] == "status" and f["status"] == "failed", timeout=60)
    assert failed["id"] == answer["id"]
    message = web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2]
    assert message["status"] == "failed" and message["attempts"] == 4 + 1 and "archive" in message["error"]
    ceilings = [float(c) for c in re.findall(r'"ceiling": ([0-9.]+)', worker.log())]
    assert len(ceilings) == 4 and ceilings == sorted(ceilings) and ceilings[0] < ceilings[-1]

    page = web.request("GET", "/api/v1/dlq", token=admin)[2]
    assert page["total"] == 1 and page["items"][0]["id"] == answer["id"]
    assert page["items"][0]["attempts"] == 5 and "archive" in page["items"][0]["reason"]
    letters = read_topic(stack, stack.settings.dlq_topic)
    assert len(letters) == 1
    headers = dict(letters[0].headers())
    assert headers["herald-attempts"] == b"5" and headers["herald-offset"] == str(answer["offset"]).encode()
    assert headers["herald-partition"] == str(answer["partition"]).encode() and headers["herald-failed-at"]
    assert web.request("GET", "/api/v1/dlq", token=token)[0] == 403

    missing.mkdir()
    # Two replays at once (an operator's retry, the CLI and the API): one publishes, the other is refused.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = sorted(pool.map(lambda _: web.request("POST", f"/api/v1/dlq/{answer['id']}/replay", token=admin),
                                  range(2)), key=lambda response: response[0])
    (status, _, replayed), (refused, _, _) = answers
    assert status == 202 and replayed["id"] == answer["id"] and refused in (404, 409)
    frame = watcher.expect(lambda f: f["op"] == "message")
    assert frame["id"] == answer["id"] and frame["data"] == "doomed"
    wait_until(lambda: web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2]["status"]
               == "delivered", 20, what="delivered after replay")
    assert web.request("GET", "/api/v1/dlq", token=admin)[2]["total"] == 0
    assert web.request("POST", f"/api/v1/dlq/{answer['id']}/replay", token=admin)[0] == 404
    history = web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"]
    assert [m["id"] for m in history] == [answer["id"]]
    print("\nFAULT-FIGURES " + json.dumps({"test": "always failing", "attempts": message["attempts"],
                                           "backoff_ceilings": ceilings, "dlq_entries": 1,
                                           "deliveries_after_replay": 1}))
    watcher.close()


def test_undecodable_and_unknown_type_are_dead_lettered_and_the_next_is_delivered(make_stack, channel):
    stack = make_stack(env={"HERALD_MESSAGE_TYPES": "message,chat"})
    stack.worker()
    stack.bridge()
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    client = web.ws(token)
    client.recv()
    client.subscribe(channel, status=True)
    # The id of a dead letter long expired: the next dead letter takes it off the index (total counts 2, not 3).
    store = stack.store()
    store.redis.zadd(store.keys.dead_letter_index, {"expired-letter": 1})
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(stack.settings.topic, key=channel, value=b"<xml>not json</xml>")
    producer.flush(10)
    # Its id is the name the dead-letter index once had: it must not overwrite it.
    status, _, unknown = web.request("POST", "/api/v1/messages",
                                     {"id": "index", "channel": channel, "data": 1, "type": "bogus"}, token=token)
    assert status == 202
    status, _, good = web.request("POST", "/api/v1/messages", {"channel": channel, "data": 2, "type": "chat"},
                                  token=token)
    assert client.expect(lambda f: f["op"] == "message")["id"] == good["id"]
    rejected = web.request("GET", f"/api/v1/messages/{unknown['id']}", token=token)[2]
    assert rejected["status"] == "failed" and "unknown message type" in rejected["error"]
    items = wait_until(lambda: (lambda p: p["total"] == 2 and p["items"])(
        web.request("GET", "/api/v1/dlq", token=admin)[2]), 10, what="two dead letters")
    reasons = sorted(item["reason"] for item in items)
    assert "not JSON" in reasons[0] and "unknown message type" in reasons[1]
    raw = next(item for item in items if item["message"] is None)
    assert web.request("POST", f"/api/v1/dlq/{raw['id']}/replay", token=admin)[0] == 409
    client.close()
