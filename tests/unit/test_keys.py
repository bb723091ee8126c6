"""The key schema: user input never names one of Herald's own keys (README: "Redis keys")."""

from __future__ import annotations

from pipeline.keys import Keys


def test_no_user_named_key_is_one_of_heralds_own():
    keys = Keys("herald")
    own = {keys.dead_letter_index, keys.in_flight_index, keys.in_flight_envelopes, keys.presence_channels,
           keys.presence_reaper}
    names = ["index", "channels", "reaper", "dlq-index", "inflight-index", "inflight-envelopes",
             "presence-channels", "presence-reaper", "_", "_:dlq-index"]
    named = set()
    for name in names:
        for build in (keys.history, keys.epoch, keys.gate, keys.waiting, keys.presence, keys.message, keys.done,
                      keys.idempotency, keys.dead_letter, keys.task_runs, keys.user_connections,
                      keys.address_connections, keys.node):
            named.add(build(name))
    assert not own & named


def test_single_redis_names_are_unchanged():
    # A running deployment keeps its gates and history across the upgrade.
    keys = Keys("herald")
    assert [keys.history("a:b"), keys.gate("a:b"), keys.done("id-1", "a:b"), keys.message_channel("a:b")] == [
        "herald:hist:a:b", "herald:last:a:b", "herald:done:id-1", "herald:m:a:b"]
    assert keys.parse_pubsub("herald:m:a:b") == ("m", "a:b")


def test_on_a_cluster_a_channels_names_share_its_hash_tag():
    keys = Keys("herald", cluster=True)
    channel = "chat:room.1"
    names = [keys.history(channel), keys.epoch(channel), keys.gate(channel), keys.waiting(channel),
             keys.presence(channel), keys.done("id-1", channel), keys.message_channel(channel),
             keys.status_channel(channel), keys.presence_channel(channel)]
    slots = {_slot(name) for name in names}
    assert slots == {_slot(channel)}
    assert keys.done("id-1", channel) == "herald:done:{chat:room.1}:id-1"
    assert keys.parse_pubsub(keys.message_channel(channel)) == ("m", channel)
    assert keys.parse_pubsub(keys.node_channel("web-1")) == ("n", "web-1")


def _slot(name: str) -> int:
    from redis.crc import key_slot

    return key_slot(name.encode())
