"""A message's whole journey: HTTP -> Kafka -> bridge -> Celery -> Redis -> WebSocket."""

from __future__ import annotations

import collections
import json
import time

from confluent_kafka import Producer

from tests.harness import read_topic, wait_until


def publish(web, token, channel, data, **extra):
    status, headers, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": data, **extra},
                                        token=token)
    assert status == 202, body
    return body, headers


def test_message_reaches_subscriber_with_every_field_and_statuses_in_order(stack, web, token, channel):
    plain = web.ws(token)
    plain.recv()
    plain.subscribe(channel)
    watcher = web.ws(token)
    connected = watcher.recv()
    assert connected["op"] == "connected" and connected["user"] == "tester" and connected["ping_interval"] > 0
    watcher.subscribe(channel, status=True)

    answer, headers = publish(web, token, channel, {"text": "hi"})
    assert set(answer) == {"id", "global_id", "channel", "status", "partition", "offset"}
    assert answer["status"] == "accepted" and answer["channel"] == channel
    assert isinstance(answer["partition"], int) and isinstance(answer["offset"], int)
    assert headers["X-Request-ID"]

    frame = plain.expect(lambda f: f["op"] == "message")
    assert frame == {"op": "message", "channel": channel, "id": answer["id"], "type": "message",
                     "data": {"text": "hi"}, "sender": "tester", "ts": frame["ts"], "offset": frame["offset"]}
    assert abs(frame["ts"] - time.time() * 1000) < 60_000
    statuses = []
    while len(statuses) < 2:
        got = watcher.expect(lambda f: f["op"] == "status" or f["op"] == "message")
        if got["op"] == "status":
            assert got["id"] == answer["id"] and got["channel"] == channel
            statuses.append(got["status"])
    assert statuses == ["processing", "delivered"]

    status, _, message = web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)
    assert status == 200
    assert message["status"] == "delivered" and message["attempts"] == 1 and message["error"] is None
    assert message["data"] == {"text": "hi"} and message["offset"] == answer["offset"]
    plain.close()
    watcher.close()


def test_tasks_leave_no_result_in_redis(stack, web, token, channel):
    # Nothing reads task results (a message's status is its outcome): a
    # result backend would write a key per task for nothing.
    answer, _ = publish(web, token, channel, "no result")
    wait_until(lambda: web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2]["status"]
               == "delivered", 20, what="delivered")
    assert list(stack.store().redis.scan_iter("celery-task-meta-*", count=1000)) == []


def test_a_post_is_one_log_line_saying_where_kafka_put_the_message(stack, web, token, channel):
    answer, _ = publish(web, token, channel, "logged once")
    line = f'"message_id": "{answer["id"]}", "channel": "{channel}", "partition": {answer["partition"]}, ' \
           f'"offset": {answer["offset"]}'
    wait_until(lambda: line in web.proc.log(), 5, what="the access line")
    mentions = [entry for entry in web.proc.log().splitlines() if answer["id"] in entry]
    assert len(mentions) == 1 and '"event": "request"' in mentions[0], mentions


def test_five_hundred_messages_over_twenty_channels_arrive_once_each(stack, web, token, channel):
    channels = [f"{channel}-{i}" for i in range(20)]
    client = web.ws(token)
    client.recv()
    for name in channels:
        client.subscribe(name)
    sent = collections.defaultdict(list)
    for i in range(500):
        name = channels[i % 20]
        status, _, body = web.request("POST", "/api/v1/messages/batch",
                                      {"messages": [{"channel": name, "data": {"n": i}}]}, token=token) \
            if i % 50 == 0 else web.request("POST", "/api/v1/messages", {"channel": name, "data": {"n": i}},
                                            token=token)
        assert status == 202, body
        msg_id = body["results"][0]["id"] if "results" in body else body["id"]
        sent[name].append(msg_id)
    seen = collections.Counter()
    order = collections.defaultdict(list)
    deadline = time.monotonic() + 60
    while sum(seen.values()) < 500 and time.monotonic() < deadline:
        frame = client.expect(lambda f: f["op"] == "message", timeout=30)
        seen[frame["id"]] += 1
        order[frame["channel"]].append(frame["id"])
    expected = {i for ids in sent.values() for i in ids}
    assert set(seen) == expected, f"missing {len(expected - set(seen))}"
    assert max(seen.values()) == 1
    for name in channels:
        assert order[name] == sent[name], f"{name} out of order"
    client.close()


def test_two_web_processes_share_messages(stack, token, channel):
    first, second = stack.webs
    a, b = first.ws(token), second.ws(token)
    a.recv(), b.recv()
    a.subscribe(channel)
    b.subscribe(channel)
    one, _ = publish(first, token, channel, "via first")
    two, _ = publish(second, token, channel, "via second")
    for client in (a, b):
        got = [client.expect(lambda f: f["op"] == "message")["id"] for _ in range(2)]
        assert got == [one["id"], two["id"]]
        client.close()


def test_history_returns_delivered_messages_oldest_first(stack, web, token, channel):
    ids = [publish(web, token, channel, n)[0]["id"] for n in range(5)]
    wait_until(lambda: web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"]
               .__len__() == 5, 20, what="history of 5")
    page = web.request("GET", f"/api/v1/channels/{channel}/history?limit=2", token=token)[2]
    assert [m["id"] for m in page["messages"]] == ids[:2] and page["recovered"] is True
    rest = web.request("GET", f"/api/v1/channels/{channel}/history?since={page['next']}&limit=10", token=token)[2]
    assert [m["id"] for m in rest["messages"]] == ids[2:] and rest["next"] is None


def test_undecodable_record_is_dead_lettered_and_the_next_one_still_delivered(stack, web, token, channel):
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(stack.settings.topic, key=channel, value=b"\xff not json {")
    producer.flush(10)
    good, _ = publish(web, token, channel, "after the bad one")
    assert client.expect(lambda f: f["op"] == "message")["id"] == good["id"]
    letters = [r for r in read_topic(stack, stack.settings.dlq_topic) if r.key() == channel.encode()]
    assert len(letters) == 1
    headers = dict(letters[0].headers())
    assert b"not JSON" in headers["herald-error"]
    assert letters[0].value() == b"\xff not json {"
    letter_id = f"raw-{headers['herald-partition'].decode()}-{headers['herald-offset'].decode()}"
    entry = json.loads(stack.store().redis.get(stack.store().keys.dead_letter(letter_id)))
    assert "not JSON" in entry["reason"]
    client.close()


def test_message_archived_once(stack, web, token, channel):
    from sqlalchemy import func, select

    from pipeline.archive import Archive
    from pipeline.archive.tables import messages

    answer, _ = publish(web, token, channel, {"archived": True})
    wait_until(lambda: stack.store().get_message(answer["id"])["status"] == "delivered", 20, what="delivery")
    archive = Archive(stack.settings.database_url)
    with archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages).where(messages.c.channel == channel)
                            ).scalar_one() == 1
    archive.dispose()
