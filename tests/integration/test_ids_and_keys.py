"""Message ids are global and claimed by their sender; user input never names Herald's own keys
(README: "Message ids", "Redis keys")."""

from __future__ import annotations

import json
import uuid

from tests.harness import topic_size, wait_until


def test_an_id_another_sender_published_is_409_and_sends_nothing(stack, web, channel):
    alice, mallory = stack.token("alice"), stack.token("mallory")
    msg_id = f"invoice-{uuid.uuid4().hex[:8]}"
    first = web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": "alice's"},
                        token=alice)
    assert first[0] == 202
    before = topic_size(stack)
    status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "mallory's"},
                                  token=mallory, headers={"Idempotency-Key": msg_id})
    assert status == 409 and body["errors"] == [{"field": "id", "problem": "taken by another sender"}], body
    batch = web.request("POST", "/api/v1/messages/batch",
                        {"messages": [{"id": msg_id, "channel": channel, "data": "again"}]}, token=mallory)
    assert batch[2]["results"][0]["status"] == 409, batch
    # The first sender's retry still gets its own answer.
    assert web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": "alice's"},
                       token=alice)[2] == first[2]
    assert topic_size(stack) == before


def test_an_id_another_sender_published_over_websocket_is_an_error_frame(stack, web, channel):
    msg_id = f"ws-{uuid.uuid4().hex[:8]}"
    assert web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": 1},
                       token=stack.token("alice"))[0] == 202
    client = web.ws(stack.token("mallory"))
    client.recv()
    client.send({"op": "publish", "channel": channel, "id": msg_id, "data": 2, "ref": "r1"})
    frame = client.expect(lambda f: f.get("ref") == "r1")
    assert frame["op"] == "error" and frame["code"] == "id_taken", frame
    client.close()


def test_only_the_owner_of_a_claim_releases_it(stack):
    store = stack.store()
    msg_id = f"claimed-{uuid.uuid4().hex[:8]}"
    mine, theirs = json.dumps({"sender": "a", "claim": "1"}), json.dumps({"sender": "a", "claim": "2"})
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


def test_claims_written_before_ids_were_scoped_to_senders_still_answer(stack, web, token, channel):
    # Values of the earlier format, left in Redis by a deploy: a pending claim and a stored answer.
    store = stack.store()
    pending, answered = f"old-pending-{uuid.uuid4().hex[:6]}", f"old-answer-{uuid.uuid4().hex[:6]}"
    store.redis.set(store.keys.idempotency(pending), "pending:old-node", ex=1)
    answer = {"id": answered, "channel": channel, "status": "accepted", "partition": 0, "offset": 7}
    store.redis.set(store.keys.idempotency(answered), json.dumps(answer), ex=60)
    # The pending one lapses, and the retry then publishes it.
    status, _, body = web.request("POST", "/api/v1/messages", {"id": pending, "channel": channel, "data": 1},
                                  token=token)
    assert status == 202 and body["id"] == pending, body
    status, _, body = web.request("POST", "/api/v1/messages", {"id": answered, "channel": channel, "data": 1},
                                  token=token)
    assert status == 202 and body == answer, body
