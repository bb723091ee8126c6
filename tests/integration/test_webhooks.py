"""Webhooks on the running system: the worker's message.* events reach real receivers, signed,
batched and in order; hostile receivers cost only their own share; dead letters are listed and
replayed through the API (docs/webhooks.md)."""

from __future__ import annotations

import time
import uuid

import pytest

from pipeline.taskqueue import webhook_queue
from pipeline.webhooks.signing import verify
from tests.harness import Stack, wait_until
from tests.receivers import Answer, Receiver

HOOK_SECRET = "webhook-secret-for-the-integration-tests-01"


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    """A stack whose receivers are: `good` (every message event), `slow` (hangs past the timeout),
    `huge` (answers 20 MiB), `refuser` (500 until a test says otherwise)."""
    receivers = {"good": Receiver(), "slow": Receiver(Answer(200, delay=30)),
                 "huge": Receiver(Answer(200, b"x" * (20 << 20))), "refuser": Receiver(Answer(500))}
    for receiver in receivers.values():
        receiver.start()
    urls = "; ".join([f"{receivers['good'].url} message.*", f"{receivers['slow'].url} message.delivered",
                      f"{receivers['huge'].url} message.delivered", f"{receivers['refuser'].url} message.delivered"])
    system = Stack(tmp_path_factory.mktemp("webhooks"), HERALD_WEBHOOK_URL=urls, HERALD_WEBHOOK_SECRET=HOOK_SECRET,
                   HERALD_WEBHOOK_TIMEOUT="1", HERALD_WEBHOOK_RETRY_FOR="2", HERALD_WEBHOOK_MAX_DELAY="1",
                   HERALD_MESSAGE_TYPES="message")
    try:
        # One slot a receiver at most (the lease), and slots left for the messages.
        system.worker(concurrency=6)
        system.bridge()
        web = system.web("web-hooks")
        names = {key: next(r.name for r in system.settings.webhooks if r.url == receiver.url)
                 for key, receiver in receivers.items()}
        yield system, web, receivers, names
    finally:
        system.stop()
        for receiver in receivers.values():
            receiver.stop()


def _publish(web, token, channel, count, **fields):
    ids = []
    for n in range(count):
        status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}, **fields},
                                      token=token)
        assert status == 202, body
        ids.append(body["id"])
    return ids


def _events(receiver, channel, event_type="message.delivered"):
    return [e for e in receiver.events() if e.get("channel") == channel and e["type"] == event_type]


def test_message_events_reach_the_receiver_signed_and_in_order(hooked):
    system, web, receivers, _names = hooked
    good, channel = receivers["good"], f"hooks:{uuid.uuid4().hex[:8]}"
    ids = _publish(web, system.token("alice"), channel, 20)
    events = wait_until(lambda: (got := _events(good, channel)) and len(got) >= 20 and got, 30, what="20 events")
    assert [e["message_id"] for e in events] == ids  # publish order, once each
    assert all(e["sender"] == "alice" and e["global_id"] and e["stream_id"] and e["id"] == f"{e['global_id']}.delivered"
               for e in events)
    assert [e["offset"] for e in events] == sorted(e["offset"] for e in events)
    for post in good.posts:
        assert verify(HOOK_SECRET, post.headers["Herald-Signature"], post.raw)


def test_many_events_at_once_go_in_few_posts(hooked):
    system, web, receivers, _names = hooked
    good, channel = receivers["good"], f"hooks:{uuid.uuid4().hex[:8]}"
    messages = [{"channel": f"{channel}-{n % 5}", "data": {"n": n}} for n in range(1000)]
    status, _, body = web.request("POST", "/api/v1/messages/batch", {"messages": messages}, token=system.token())
    assert status == 202, body
    wanted = {f"{channel}-{n}" for n in range(5)}

    def posts():
        return [p for p in good.accepted() if any(e.get("channel") in wanted for e in p.events)]
    wait_until(lambda: sum(len(p.events) for p in posts()) >= 1000, 60, what="1000 events")
    sizes = [len(p.events) for p in posts()]
    assert max(sizes) >= 50 and len(sizes) < 100, sizes


def test_hostile_receivers_cost_only_their_own_share(hooked):
    system, web, receivers, names = hooked
    good, slow, huge = receivers["good"], receivers["slow"], receivers["huge"]
    channel, token = f"hooks:{uuid.uuid4().hex[:8]}", system.token()
    subscriber = web.ws(token)
    subscriber.recv()
    subscriber.subscribe(channel)
    started = time.monotonic()
    [msg_id] = _publish(web, token, channel, 1)
    subscriber.expect(lambda f: f["op"] == "message" and f["id"] == msg_id, timeout=5)
    ws_seconds = time.monotonic() - started
    wait_until(lambda: _events(good, channel), 5, what="the good receiver's event")
    good_seconds = time.monotonic() - started
    # The huge answer was read no further than its bound: its events went through.
    wait_until(lambda: _events(huge, channel), 10, what="the huge answerer's event")
    assert not _events(slow, channel)  # it never answers in time
    listed = {r["name"]: r for r in web.request("GET", "/api/v1/webhooks", token=system.token("ops", admin=True))[2]
              ["receivers"]}
    assert set(listed) == set(names.values()) and listed[names["good"]]["url"] == good.url
    subscriber.close()
    print(f"WEBHOOK-SHARE ws={ws_seconds:.3f}s good_receiver={good_seconds:.3f}s")


def test_rejected_and_dead_lettered_messages_are_told(hooked):
    system, web, receivers, _names = hooked
    good, channel = receivers["good"], f"hooks:{uuid.uuid4().hex[:8]}"
    admin = system.token("ops", admin=True)
    rules = f"rules:\n  - id: no-{channel[6:]}\n    condition: {{channel: '{channel}-blocked'}}\n    action: block\n"
    status, _, body = web.request("PUT", "/api/v1/rules", raw=rules.encode(), content_type="application/yaml",
                                  token=admin)
    assert status == 200, body
    try:
        time.sleep(2)  # workers apply a new set within a second or two (pipeline/rules/repository.py)
        [blocked] = _publish(web, system.token(), f"{channel}-blocked", 1)
        [dead] = _publish(web, system.token(), channel, 1, type="unknown")
        rejected = wait_until(lambda: _events(good, f"{channel}-blocked", "message.rejected"), 30, what="rejected")
        assert rejected[0]["message_id"] == blocked and rejected[0]["rule"] == f"no-{channel[6:]}"
        lettered = wait_until(lambda: _events(good, channel, "message.dead_lettered"), 30, what="dead-lettered")
        assert lettered[0]["message_id"] == dead and "unknown message type" in lettered[0]["reason"]
    finally:
        web.request("PUT", "/api/v1/rules", raw=b"rules: []", content_type="application/yaml", token=admin)


def test_dead_letters_are_listed_and_replayed_through_the_api(hooked):
    system, web, receivers, names = hooked
    refuser, name, channel = receivers["refuser"], names["refuser"], f"hooks:{uuid.uuid4().hex[:8]}"
    admin = system.token("ops", admin=True)
    ids = _publish(web, system.token(), channel, 5)

    def lettered():
        found, after = [], None
        while True:
            query = f"?limit=100&after={after}" if after else "?limit=100"
            status, _, page = web.request("GET", f"/api/v1/webhooks/{name}/dead-letters{query}", token=admin)
            assert status == 200, page
            found += [i["event"] for i in page["items"] if i["event"].get("channel") == channel]
            if page["next"] is None:
                return found
            after = page["next"]
    events = wait_until(lambda: (got := lettered()) and len(got) == 5 and got, 30, what="5 dead letters")
    assert sorted(e["message_id"] for e in events) == sorted(ids)
    listed = {r["name"]: r for r in web.request("GET", "/api/v1/webhooks", token=admin)[2]["receivers"]}
    assert listed[name]["dead_letters"] >= 5
    refuser.answer = Answer(200)
    chosen = [events[0]["id"], events[1]["id"]]
    status, _, body = web.request("POST", f"/api/v1/webhooks/{name}/dead-letters/replay", {"ids": chosen},
                                  token=admin)
    assert status == 200 and body["replayed"] == 2, body
    assert sorted(e["id"] for e in _events(refuser, channel)) == sorted(chosen)  # same event ids
    status, _, body = web.request("POST", f"/api/v1/webhooks/{name}/dead-letters/replay", {}, token=admin)
    assert status == 200 and body["remaining"] == 0, body
    assert len({e["id"] for e in _events(refuser, channel)}) == 5


def test_the_webhook_api_bounds_its_inputs_and_is_for_admins(hooked):
    system, web, _receivers, names = hooked
    admin, name = system.token("ops", admin=True), names["refuser"]
    assert web.request("GET", "/api/v1/webhooks", token=system.token())[0] == 403
    assert web.request("GET", f"/api/v1/webhooks/{name}/dead-letters?limit=501", token=admin)[0] == 400
    assert web.request("GET", "/api/v1/webhooks/0123456789ab/dead-letters", token=admin)[0] == 404
    assert web.request("GET", "/api/v1/webhooks/not-a-name/dead-letters", token=admin)[0] == 400
    status, _, _ = web.request("POST", f"/api/v1/webhooks/{name}/dead-letters/replay",
                               {"ids": [str(n) for n in range(1001)]}, token=admin)
    assert status == 422
    status, _, document = web.request("GET", "/api/v1/openapi.json")
    assert "/api/v1/webhooks/{name}/dead-letters/replay" in document["paths"]


def test_webhooks_with_a_rabbitmq_broker(tmp_path):
    # The webhook queue is a quorum queue beside the messages' (pipeline/taskqueue.py).
    import kombu

    receiver = Receiver().start()
    system = Stack(tmp_path / "amqp", broker="amqp", HERALD_WEBHOOK_URL=receiver.url,
                   HERALD_WEBHOOK_SECRET=HOOK_SECRET)
    try:
        system.worker()
        system.bridge()
        web = system.web("web-amqp")
        channel = f"hooks:{uuid.uuid4().hex[:8]}"
        ids = _publish(web, system.token(), channel, 3)
        events = wait_until(lambda: (got := _events(receiver, channel)) and len(got) >= 3 and got, 30, what="events")
        assert [e["message_id"] for e in events] == ids
    finally:
        system.stop()
        receiver.stop()
        with kombu.Connection(system.settings.celery_broker_url, connect_timeout=5) as connection:
            connection.default_channel.queue_delete(webhook_queue(system.settings))  # durable: it would outlive us
