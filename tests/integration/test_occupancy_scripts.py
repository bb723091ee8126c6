"""The occupancy scripts on a real Redis (pipeline/store/occupancy.py): counts, the
transitions' events in order, the grace's pending entries ended once however many
processes flush, a dead process's subscriptions reaped in bounded runs, and the listing."""

from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace

import pytest

from pipeline.core.settings import Settings
from pipeline.store import Store, connect
from pipeline.store.occupancy import member, vacancy
from pipeline.webhooks import EVENT_FIELD, Outbox
from tests.harness import SECRET, redis_cluster
from web.hub.occupancy import Occupancy


@pytest.fixture
def store(spare_redis_url):
    settings = Settings.from_env({"REDIS_URL": spare_redis_url, "HERALD_SECRET_KEY": SECRET,
                                  "HERALD_REDIS_PREFIX": f"o{uuid.uuid4().hex[:8]}",
                                  "HERALD_WEBHOOK_URL": "http://127.0.0.1:9/hook", "HERALD_WEBHOOK_SECRET": "s" * 40,
                                  "HERALD_PRESENCE_GRACE": "5"})
    client = connect(settings)
    yield Store(client, settings)
    client.connection_pool.disconnect()


def hub_side(store, node: str, **settings) -> Occupancy:
    merged = SimpleNamespace(**{**store.settings.__dict__, **settings})
    return Occupancy(store, Outbox(store, merged), merged, node)


def stream(store) -> list[tuple]:
    return [(e["type"], e.get("channel"), e.get("user"))
            for e in (json.loads(f[EVENT_FIELD]) for _id, f in store.redis.xrange(store.keys.events))]


def test_counts_and_events_of_joins_and_leaves_without_grace(store):
    a = hub_side(store, "node-a", presence_grace=0.0)
    a.join_all([("room", "u1"), ("room", "u1"), ("room", "u2")])
    assert store.occupancy.counts("room") == (3, 2)
    assert stream(store) == [("channel.occupied", "room", None), ("presence.join", "room", "u1"),
                             ("presence.join", "room", "u2")]
    a.leave_all([("u1", ["room"], None), ("u2", ["room"], None)])
    assert store.occupancy.counts("room") == (1, 1)
    a.leave_all([("u1", ["room"], None)])
    assert store.occupancy.counts("room") == (0, 0)
    assert stream(store)[3:] == [("presence.leave", "room", "u2"), ("presence.leave", "room", "u1"),
                                 ("channel.vacated", "room", None)]
    # A leave this process never counted (reaped already, or lost by Redis) takes nothing off.
    a.leave_all([("u1", ["room"], None)])
    b = hub_side(store, "node-b", presence_grace=0.0)
    b.join_all([("room", "u1")])
    a.leave_all([("u1", ["room"], None)])
    assert store.occupancy.counts("room") == (1, 1)
    assert not store.redis.exists(store.keys.leaving)


def test_pending_leaves_are_cancelled_by_a_return_and_flushed_once(store):
    a, b = hub_side(store, "node-a"), hub_side(store, "node-b")
    a.join_all([("room", "u1"), ("hall", "u2")])
    a.leave_all([("u1", ["room"], None), ("u2", ["hall"], None)])
    assert store.occupancy.counts("room") == (0, 0)  # the counts drop at once; only the events wait
    pending = store.redis.zrange(store.keys.leaving, 0, -1)
    assert set(pending) == {member("room", "u1"), vacancy("room"), member("hall", "u2"), vacancy("hall")}
    b.join_all([("room", "u1")])  # back within the grace, elsewhere: cancels both
    assert set(store.redis.zrange(store.keys.leaving, 0, -1)) == {member("hall", "u2"), vacancy("hall")}
    assert a.flush() == 0  # nothing due yet
    later = time.time() + 6
    assert a.flush(later) == 2 and b.flush(later) == 0
    assert stream(store) == [("channel.occupied", "room", None), ("presence.join", "room", "u1"),
                             ("channel.occupied", "hall", None), ("presence.join", "hall", "u2"),
                             ("presence.leave", "hall", "u2"), ("channel.vacated", "hall", None)]


def test_two_flushers_of_the_same_due_entries_append_each_event_once(store):
    a = hub_side(store, "node-a")
    a.join_all([(f"c{n}", "u") for n in range(50)])
    a.leave_all([("u", [f"c{n}" for n in range(50)], None)])
    later = time.time() + 6
    due = store.occupancy.due(later, 500)
    ended = [(entry, json.dumps({"n": n})) for n, entry in enumerate(due)]
    assert store.occupancy.flush(later, EVENT_FIELD, ended) == 100
    assert store.occupancy.flush(later, EVENT_FIELD, ended) == 0  # a second process, same page: nothing


def test_a_dead_nodes_subscriptions_are_reaped_in_bounded_runs(store):
    dead, alive = hub_side(store, "node-dead"), hub_side(store, "node-alive")
    dead.join_all([(f"c{n}", f"u{n}") for n in range(25)] + [("shared", "x")])
    alive.join_all([("shared", "y")])
    before = len(stream(store))
    runs = 0
    while alive.reap(lambda nodes: {"node-alive"} & set(nodes), limit=10):
        runs += 1
    assert runs == 3
    assert store.occupancy.nodes() == {"node-alive"}
    events = stream(store)[before:]
    assert len(events) == 25 * 2 + 1  # a leave and a vacate a channel, x's leave (no grace)
    assert ("channel.vacated", "shared", None) not in events
    assert store.occupancy.counts("shared") == (1, 1)
    assert all(store.occupancy.counts(f"c{n}") == (0, 0) for n in range(25))
    dead.leave_all([("u0", ["c0"], None)])  # the dead one's own late leave: nothing twice
    assert len(stream(store)) == before + 51


def test_a_process_started_under_a_dead_ones_name_takes_its_leftovers_off_first(store):
    hub_side(store, "web.1", presence_grace=0.0).join_all([(f"c{n}", "u") for n in range(1500)] + [("c0", "w")])
    before = len(stream(store))
    # Restarted under the same HERALD_NODE_ID: its liveness key hides the dead one's counts from the reaper.
    again = hub_side(store, "web.1", presence_grace=0.0)
    again.start()
    assert store.occupancy.counts("c0") == (0, 0) and store.occupancy.page("c", None, 10) == ([], None)
    assert len(stream(store)) == before + 1501 * 2 - 1  # every leave and vacate (c0: two leaves, one vacate)
    assert store.occupancy.nodes() == set()
    again.join_all([("c0", "u")])
    assert store.occupancy.counts("c0") == (1, 1)


def test_the_listing_is_bounded_and_paged_by_name(store):
    a = hub_side(store, "node-a")
    a.join_all([(f"p:{n:03d}", "u") for n in range(30)] + [("p", "u"), ("q:0", "u"), ("o:9", "u")])
    channels, last = store.occupancy.page("p:", None, 12)
    assert [c["channel"] for c in channels] == [f"p:{n:03d}" for n in range(12)] and last == "p:011"
    channels, last = store.occupancy.page("p:", last.encode(), 100)
    assert len(channels) == 18 and last is None
    # A cursor below the prefix starts at the prefix; any bytes are a place in the order.
    assert store.occupancy.page("p:", b"a", 1)[0][0]["channel"] == "p:000"
    assert store.occupancy.page("p:", b"p:010\x00", 1)[0][0]["channel"] == "p:011"
    assert len(store.occupancy.page("", None, 5000)[0]) == 33  # a limit past MAX_PAGE is MAX_PAGE


def test_nothing_is_appended_when_no_receiver_wants_it(store):
    quiet = hub_side(store, "node-q", webhooks=())
    quiet.join_all([("room", "u")])
    quiet.leave_all([("u", ["room"], quiet.closed_event("c", "u", 1000, ""))])
    assert store.occupancy.counts("room") == (0, 0)
    assert stream(store) == [] and not store.redis.exists(store.keys.leaving)


def test_the_scripts_run_on_a_redis_cluster(tmp_path, spare_redis_url):
    servers, url = redis_cluster(tmp_path)
    try:
        settings = Settings.from_env({"REDIS_URL": url, "REDIS_CLUSTER": "1", "CELERY_BROKER_URL": spare_redis_url,
                                      "HERALD_SECRET_KEY": SECRET, "HERALD_WEBHOOK_URL": "http://127.0.0.1:9/hook",
                                      "HERALD_WEBHOOK_SECRET": "s" * 40, "HERALD_PRESENCE_GRACE": "5"})
        client = connect(settings)
        store = Store(client, settings)
        live, dead = hub_side(store, "node-a"), hub_side(store, "node-dead")
        live.join_all([(f"cl:{n}", "u") for n in range(20)])
        dead.join_all([("cl:0", "v")])
        live.leave_all([("u", ["cl:1"], live.closed_event("c", "u", 1000, ""))])
        assert live.flush(time.time() + 6) == 2
        assert live.reap(lambda nodes: {"node-a"} & set(nodes)) == 1
        assert store.occupancy.counts("cl:0") == (1, 1) and store.occupancy.counts("cl:1") == (0, 0)
        assert len(store.occupancy.page("cl:", None, 100)[0]) == 19
        assert stream(store)[-3:] == [("presence.leave", "cl:1", "u"), ("channel.vacated", "cl:1", None),
                                      ("presence.leave", "cl:0", "v")]
        client.disconnect_connection_pools()
    finally:
        for server in servers:
            server.stop()
