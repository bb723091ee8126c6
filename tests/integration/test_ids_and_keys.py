"""Message ids are scoped to their sender; a rule effect's marker is no message's; user input never
names Herald's own keys (docs/design.md: "Message ids", "Redis keys")."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pipeline.core.ids import scoped
from pipeline.core.messages import Envelope, now_ms
from tests.harness import topic_size, wait_until

APPLY = 1.5  # seconds: every worker applies a new rule set version within 1 s


@pytest.fixture
def put_rules(stack, web):
    """PUT a rule set (YAML text) on the shared stack; emptied after the test."""
    admin = stack.token("ids-admin", admin=True)

    def put(text: str):
        status, _, body = web.request("PUT", "/api/v1/rules", raw=text.encode(), content_type="application/yaml",
                                      token=admin)
        assert status == 200, body
        time.sleep(APPLY)

    yield put
    web.request("PUT", "/api/v1/rules", raw=b"rules: []", content_type="application/yaml", token=admin)


def _delivered(web, token, msg_id, **query):
    suffix = "".join(f"?{name}={value}" for name, value in query.items())
    return wait_until(lambda: (m := web.request("GET", f"/api/v1/messages/{msg_id}{suffix}", token=token)[2])
                      and m.get("status") == "delivered" and m, 20, what=f"{msg_id} delivered")


def test_two_senders_may_publish_the_same_id_and_both_are_delivered(stack, web, channel):
    alice, mallory, reader = stack.token("alice"), stack.token("mallory"), stack.token("reader")
    watcher = web.ws(reader)
    watcher.recv()
    watcher.subscribe(channel)
    msg_id = f"invoice-{uuid.uuid4().hex[:8]}"
    first = web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": "alice's"},
                        token=alice)
    # Another sender's same id is its own message: a 202, which tells nothing of alice's (no 409 to probe with).
    second = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "mallory's"}, token=mallory,
                         headers={"Idempotency-Key": msg_id})
    assert first[0] == second[0] == 202, (first, second)
    assert first[2]["id"] == second[2]["id"] == msg_id
    assert first[2]["global_id"] == scoped("alice", msg_id) != second[2]["global_id"] == scoped("mallory", msg_id)
    frames = [watcher.expect(lambda f: f["op"] == "message") for _ in range(2)]
    assert sorted((f["id"], f["sender"], f["data"]) for f in frames) == [
        (msg_id, "alice", "alice's"), (msg_id, "mallory", "mallory's")]
    # Each sender reads its own message by the id it sent; a reader names the sender, or the global id.
    assert _delivered(web, alice, msg_id)["data"] == "alice's"
    assert _delivered(web, mallory, msg_id)["data"] == "mallory's"
    assert _delivered(web, reader, msg_id, sender="alice")["data"] == "alice's"
    by_global = _delivered(web, reader, second[2]["global_id"])
    assert by_global["data"] == "mallory's" and by_global["id"] == msg_id
    assert web.request("GET", f"/api/v1/messages/{msg_id}", token=reader)[0] == 404  # reader sent none
    watcher.close()


def test_a_retry_by_the_same_sender_gets_the_first_answer_and_sends_nothing(stack, web, channel):
    alice, mallory = stack.token("alice"), stack.token("mallory")
    msg_id = f"retry-{uuid.uuid4().hex[:8]}"
    first = web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": 1}, token=alice)
    assert first[0] == 202
    theirs = web.request("POST", "/api/v1/messages/batch",
                         {"messages": [{"id": msg_id, "channel": channel, "data": 2}]}, token=mallory)
    assert theirs[2]["results"][0]["status"] == "accepted", theirs
    before = topic_size(stack)
    again = web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}, token=alice,
                        headers={"Idempotency-Key": msg_id})
    assert again[0] == 202 and again[2] == first[2]
    assert topic_size(stack) == before


def test_the_same_id_over_websocket_from_another_sender_is_acked(stack, web, channel):
    msg_id = f"ws-{uuid.uuid4().hex[:8]}"
    assert web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": 1},
                       token=stack.token("alice"))[0] == 202
    client = web.ws(stack.token("mallory"))
    client.recv()
    client.send({"op": "publish", "channel": channel, "id": msg_id, "data": 2, "ref": "r1"})
    frame = client.expect(lambda f: f.get("ref") == "r1")
    assert frame["op"] == "ack" and frame["id"] == msg_id, frame
    client.close()


def test_an_id_longer_than_its_scope_leaves_room_for_is_refused(stack, web, token, channel):
    status, _, body = web.request("POST", "/api/v1/messages", {"id": "x" * 116, "channel": channel, "data": 1},
                                  token=token)
    assert status == 422 and body["errors"] == [{"field": "id", "problem": "longer than 115 characters"}], body
    assert web.request("POST", "/api/v1/messages", {"id": "x" * 115, "channel": channel, "data": 1},
                       token=token)[0] == 202


def test_a_message_id_cannot_cancel_another_messages_alert(stack, web, token, channel, put_rules):
    # A message named `X:alerts:alerts:rules`, delivered first, must not be taken for the marker of X's alert.
    put_rules(f"rule: {{id: big-{channel[5:]}, condition: {{channel: '{channel}', field: data.amount, gte: 100}}, "
              "action: alert}")
    alerts = web.ws(token)
    alerts.recv()
    alerts.subscribe(stack.settings.rules_alert_channel)
    target = f"pay{uuid.uuid4().hex[:8]}"
    decoy = f"{target}:alerts:{stack.settings.rules_alert_channel}"
    assert web.request("POST", "/api/v1/messages", {"id": decoy, "channel": f"{channel}-other", "data": {}},
                       token=token)[0] == 202
    _delivered(web, token, decoy)
    assert web.request("POST", "/api/v1/messages", {"id": target, "channel": channel, "data": {"amount": 500}},
                       token=token)[0] == 202
    alert = alerts.expect(lambda f: f["op"] == "message" and f["data"]["message"]["id"] == target, timeout=20)
    assert alert["data"]["rule"] == f"big-{channel[5:]}" and alert["data"]["message"]["sender"] == "tester"
    alerts.close()


def test_a_blocked_messages_data_is_not_served(stack, web, token, channel, put_rules):
    put_rules(f"rule: {{id: stop-{channel[5:]}, condition: {{channel: '{channel}'}}, action: block}}")
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"secret": "s3"}},
                                    token=token)
    assert status == 202
    blocked = wait_until(lambda: (m := web.request("GET", f"/api/v1/messages/{answer['id']}", token=token)[2])
                         and m.get("status") == "rejected" and m, 20, what="rejected")
    assert blocked["data"] is None and blocked["rule"] == f"stop-{channel[5:]}", blocked


def test_the_idempotency_answer_replaces_only_its_own_claim(stack):
    store = stack.store()
    msg_id = scoped("alice", f"cas-{uuid.uuid4().hex[:8]}")
    envelope = Envelope(msg_id, "test:cas", "message", 1, "alice", now_ms())
    mine, theirs = json.dumps({"claim": "1"}), json.dumps({"claim": "2"})
    assert store.claim_idempotency(msg_id, mine) is None
    store.redis.delete(store.keys.idempotency(msg_id))  # the claim lapsed (a pool wait outlasted its TTL)
    assert store.claim_idempotency(msg_id, theirs) is None  # another request of the id claimed it
    store.record_accepted([(envelope, 0, 0)], {msg_id: (mine, json.dumps({"answer": "late"}))})
    assert store.redis.get(store.keys.idempotency(msg_id)) == theirs
    store.record_accepted([(envelope, 0, 0)], {msg_id: (theirs, json.dumps({"answer": "theirs"}))})
    assert json.loads(store.redis.get(store.keys.idempotency(msg_id))) == {"answer": "theirs"}


def test_an_ids_answer_outlives_its_status_and_dedupe_marker(stack, web, token, channel):
    # Were the marker left after the answer, a new message under the id would be dropped as a duplicate.
    msg_id = f"life-{uuid.uuid4().hex[:8]}"
    answer = web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": 1},
                         token=token)[2]
    _delivered(web, token, msg_id)
    store = stack.store()
    keys, global_id = store.keys, answer["global_id"]
    answer_at = store.redis.pexpiretime(keys.idempotency(global_id))
    assert 0 < store.redis.pexpiretime(keys.done(global_id, channel)) <= answer_at
    assert 0 < store.redis.pexpiretime(keys.message(global_id)) <= answer_at


def test_only_the_owner_of_a_claim_releases_it(stack):
    store = stack.store()
    msg_id = f"claimed-{uuid.uuid4().hex[:8]}"
    mine, theirs = json.dumps({"claim": "1"}), json.dumps({"claim": "2"})
    assert store.claim_idempotency(msg_id, mine) is None
    assert store.claim_idempotency(msg_id, theirs) == mine
    store.release_idempotency(msg_id, theirs)  # a second request for the same id that gave up
    assert store.redis.get(store.keys.idempotency(msg_id)) == mine
    # A pending claim lapses after a few produce timeouts: a publisher that died holds the id no longer.
    assert 0 < store.redis.ttl(store.keys.idempotency(msg_id)) <= max(10, 3 * stack.settings.produce_timeout)
    store.release_idempotency(msg_id, mine)
    assert store.redis.get(store.keys.idempotency(msg_id)) is None


def test_an_idle_channel_keys_expire(stack, web, token, channel):
    assert web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}, token=token)[0] == 202
    store = stack.store()
    keys = store.keys
    wait_until(lambda: store.redis.exists(keys.history(channel)), 20, what="delivery")
    idle = stack.settings.channel_idle_ttl
    for key in (keys.history(channel), keys.epoch(channel), keys.gate(channel)):
        assert 0 < store.redis.ttl(key) <= idle, key
