"""The key schema and the id space: user input never names one of Herald's own keys, a rule effect's
marker or another sender's message (docs/design.md: "Redis keys", "Message ids")."""

from __future__ import annotations

from pipeline.core.ids import MAX_CLIENT_ID, candidates, client_id, scoped
from pipeline.core.messages import ID_RE, new_id
from pipeline.store.keys import Keys


def test_no_user_named_key_is_one_of_heralds_own():
    keys = Keys("herald")
    own = {keys.dead_letter_index, keys.in_flight_index, keys.in_flight_envelopes, keys.presence_nodes,
           keys.presence_reaper, keys.queued, keys.taken}
    names = ["index", "channels", "reaper", "dlq-index", "inflight-index", "inflight-envelopes",
             "queued", "taken", "presence-nodes", "presence-reaper", "_", "_:dlq-index"]
    named = set()
    for name in names:
        for build in (keys.history, keys.epoch, keys.gate, keys.waiting, keys.parked, keys.presence, keys.message,
                      keys.done, keys.idempotency, keys.dead_letter, keys.task_runs, keys.user_connections,
                      keys.address_connections, keys.node, keys.node_presence):
            named.add(build(name))
    assert not own & named


def test_a_nodes_presence_index_is_a_kind_of_its_own():
    # The reaper reads a dead node's index: no channel, user or node flag can be named like it.
    for keys in (Keys("herald"), Keys("herald", cluster=True)):
        index = keys.node_presence("web-1")
        assert index == "herald:nodepresence:web-1"
        others = {build(name) for name in ("web-1", "nodepresence:web-1", "nodepresence")
                  for build in (keys.node, keys.presence, keys.user_connections, keys.history, keys.message)}
        assert index not in others


def test_single_redis_names_are_unchanged():
    # A running deployment keeps its gates and history across the upgrade.
    keys = Keys("herald")
    assert [keys.history("a:b"), keys.gate("a:b"), keys.done("id-1", "a:b"), keys.message_channel("a:b")] == [
        "herald:hist:a:b", "herald:last:a:b", "herald:done:id-1", "herald:m:a:b"]


def test_on_a_cluster_a_channels_names_share_its_hash_tag():
    keys = Keys("herald", cluster=True)
    channel = "chat:room.1"
    names = [keys.history(channel), keys.epoch(channel), keys.gate(channel), keys.waiting(channel),
             keys.parked(channel), keys.presence(channel), keys.done("id-1", channel), keys.message_channel(channel),
             keys.status_channel(channel), keys.presence_channel(channel)]
    slots = {_slot(name) for name in names}
    assert slots == {_slot(channel)}
    assert keys.done("id-1", channel) == "herald:done:{chat:room.1}:id-1"
    assert keys.message_channel(channel) == "herald:m:{chat:room.1}"
    assert keys.node_channel("web-1") == "herald:n:web-1"


def test_an_origin_routes_to_its_node_channel_and_client():
    keys = Keys("herald", cluster=True)
    assert keys.origin_route("web-1/c7") == ("herald:n:web-1", "c7")
    assert keys.origin_route("web-1/c/7") == ("herald:n:web-1", "c/7")
    assert keys.origin_route(None) == keys.origin_route("no-slash") == ("", "")


def _slot(name: str) -> int:
    from redis.crc import key_slot

    return key_slot(name.encode())


def test_no_message_id_names_a_rule_effects_marker():
    # A message `pay1:alerts:alerts:rules` must not set message pay1's alert marker.
    for cluster in (False, True):
        keys = Keys("herald", cluster=cluster)
        alert = keys.effect("alerts", scoped("mallory", "pay1"), "alerts:rules")
        route = keys.effect("route", scoped("mallory", "pay1"), "audit:log")
        for sender in ("mallory", "alice"):
            for client in ("pay1:alerts:alerts:rules", "pay1:route:audit:log", "pay1"):
                for channel in ("alerts:rules", "audit:log", "pay:x"):
                    assert keys.done(scoped(sender, client), channel) not in (alert, route)
                    assert keys.message(scoped(sender, client)) not in (alert, route)


def test_effect_markers_of_different_messages_effects_or_targets_differ():
    keys = Keys("herald")
    # Without a separator no part can hold, (a, route, x:route:y) and (a:route:x, route, y) were one name.
    triples = [("route", "a", "x:route:y"), ("route", "a:route:x", "y"), ("alerts", "a", "route:y"),
               ("route", "a", "alerts:route:y"), ("alerts", "a:route", "y")]
    assert len({keys.effect(*triple) for triple in triples}) == len(triples)
    cluster = Keys("herald", cluster=True)
    assert _slot(cluster.effect("route", "m", "audit:log")) == _slot(cluster.history("audit:log"))


def test_a_clients_id_is_scoped_to_its_sender_and_shown_as_sent():
    assert scoped("alice", "invoice-1") != scoped("mallory", "invoice-1")
    assert client_id(scoped("alice", "invoice-1")) == "invoice-1"
    # No id mallory chooses is alice's global id, not even alice's global id itself.
    theirs = scoped("alice", "invoice-1")
    assert scoped("mallory", theirs) != theirs and client_id(scoped("mallory", theirs)) == theirs
    # A minted id is its own global id, and never a scoped one.
    minted = new_id()
    assert client_id(minted) == minted and minted not in candidates("alice", "x")
    longest = scoped("a" * 300, "x" * MAX_CLIENT_ID)
    assert ID_RE.fullmatch(longest) and len(longest) == 128
    # A reader's id names its own message first, then a global id.
    assert candidates("bob", "x") == [scoped("bob", "x"), "x"]
    assert candidates("bob", "x" * (MAX_CLIENT_ID + 1)) == ["x" * (MAX_CLIENT_ID + 1)]
    assert scoped("\ud800", "x") != scoped("\udc00", "x")  # a lone surrogate in a `sub` is still a sender


def test_no_clients_id_is_the_dead_letter_id_of_an_undecodable_record():
    # The bridge names those letters raw-<partition>-<offset>; letters of messages go by global id.
    assert scoped("mallory", "raw-3-100") != "raw-3-100"
    assert not new_id().startswith("raw-")


def test_rate_windows_of_different_rules_differ():
    keys = Keys("herald")
    assert keys.rate("r:sender:x", "channel", "y") != keys.rate("r", "sender", "x:channel:y")
