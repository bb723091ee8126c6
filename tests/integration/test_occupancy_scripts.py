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
    a.join_all([("s1", "room", "u1"), ("s2", "room", "u1"), ("s3", "room", "u2")])
    assert store.occupancy.counts("room") == (3, 2)
    assert stream(store) == [("channel.occupied", "room", None), ("presence.join", "room", "u1"),
                             ("presence.join", "room", "u2")]
    a.leave_all([("s1", "u1", ["room"], None), ("s3", "u2", ["room"], None)])
    assert store.occupancy.counts("room") == (1, 1)
    a.leave_all([("s2", "u1", ["room"], None)])
    assert store.occupancy.counts("room") == (0, 0)
    assert stream(store)[3:] == [("presence.leave", "room", "u2"), ("presence.leave", "room", "u1"),
                                 ("channel.vacated", "room", None)]
    # A leave this process never counted (reaped already, or lost by Redis) takes nothing off.
    a.leave_all([("s1", "u1", ["room"], None)])
    b = hub_side(store, "node-b", presence_grace=0.0)
    b.join_all([("s4", "room", "u1")])
    a.leave_all([("s2", "u1", ["room"], None)])
    assert store.occupancy.counts("room") == (1, 1)
    assert not store.redis.exists(store.keys.leaving)


def test_pending_leaves_are_cancelled_by_a_return_and_flushed_once(store):
    a, b = hub_side(store, "node-a"), hub_side(store, "node-b")
    a.join_all([("s1", "room", "u1"), ("s2", "hall", "u2")])
    a.leave_all([("s1", "u1", ["room"], None), ("s2", "u2", ["hall"], None)])
    assert store.occupancy.counts("room") == (0, 0)  # the counts drop at once; only the events wait
    pending = store.redis.zrange(store.keys.leaving, 0, -1)
    assert set(pending) == {member("room", "u1"), vacancy("room"), member("hall", "u2"), vacancy("hall")}
    b.join_all([("s3", "room", "u1")])  # back within the grace, elsewhere: cancels both
    assert set(store.redis.zrange(store.keys.leaving, 0, -1)) == {member("hall", "u2"), vacancy("hall")}
    assert a.flush() == 0  # nothing due yet
    later = time.time() + 6
    assert a.flush(later) == 2 and b.flush(later) == 0
    assert stream(store) == [("channel.occupied", "room", None), ("presence.join", "room", "u1"),
                             ("channel.occupied", "hall", None), ("presence.join", "hall", "u2"),
                             ("presence.leave", "hall", "u2"), ("channel.vacated", "hall", None)]


def test_two_flushers_of_the_same_due_entries_append_each_event_once(store):
    a = hub_side(store, "node-a")
    a.join_all([("s", f"c{n}", "u") for n in range(50)])
    a.leave_all([("s", "u", [f"c{n}" for n in range(50)], None)])
    later = time.time() + 6
    due = store.occupancy.due(later, 500)
    ended = [(entry, json.dumps({"n": n})) for n, entry in enumerate(due)]
    assert store.occupancy.flush(later, EVENT_FIELD, ended) == 100
    assert store.occupancy.flush(later, EVENT_FIELD, ended) == 0  # a second process, same page: nothing


def test_a_dead_nodes_subscriptions_are_reaped_in_bounded_runs(store):
    dead, alive = hub_side(store, "node-dead"), hub_side(store, "node-alive")
    dead.join_all([(f"s{n}", f"c{n}", f"u{n}") for n in range(25)] + [("sx", "shared", "x")])
    alive.join_all([("sy", "shared", "y")])
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
    dead.leave_all([("s0", "u0", ["c0"], None)])  # the dead one's own late leave: nothing twice
    assert len(stream(store)) == before + 51


def test_a_process_started_under_a_dead_ones_name_takes_its_leftovers_off_first(store):
    hub_side(store, "web.1", presence_grace=0.0).join_all([("s", f"c{n}", "u") for n in range(1500)]
                                                          + [("sw", "c0", "w")])
    before = len(stream(store))
    # Restarted under the same HERALD_NODE_ID: its liveness key hides the dead one's counts from the reaper.
    again = hub_side(store, "web.1", presence_grace=0.0)
    again.start()
    assert store.occupancy.counts("c0") == (0, 0) and store.occupancy.page("c", None, 10) == ([], None)
    assert len(stream(store)) == before + 1501 * 2 - 1  # every leave and vacate (c0: two leaves, one vacate)
    assert store.occupancy.nodes() == set()
    again.join_all([("s", "c0", "u")])
    assert store.occupancy.counts("c0") == (1, 1)


def test_the_listing_is_bounded_and_paged_by_name(store):
    a = hub_side(store, "node-a")
    a.join_all([("s", f"p:{n:03d}", "u") for n in range(30)] + [("s", "p", "u"), ("s", "q:0", "u"), ("s", "o:9", "u")])
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
    quiet.join_all([("c", "room", "u")])
    quiet.leave_all([("c", "u", ["room"], quiet.closed_event("c", "u", 1000, ""))])
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
        live.join_all([("c", f"cl:{n}", "u") for n in range(20)])
        dead.join_all([("d", "cl:0", "v")])
        live.leave_all([("c", "u", ["cl:1"], live.closed_event("c", "u", 1000, ""))])
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


def test_a_leave_takes_off_only_its_own_sockets_count(store):
    a = hub_side(store, "node-a", presence_grace=0.0)
    # A socket whose count failed (never counted) leaves: another socket's count of the same
    # user and channel stays.
    a.join_all([("s2", "room", "u")])
    a.leave_all([("s1", "u", ["room"], None)])
    assert store.occupancy.counts("room") == (1, 1)
    # A process stalled past the TTL is reaped while alive; a new socket of the same user counts
    # again; the old socket's late leave takes nothing off.
    a.reap(lambda nodes: set())
    assert store.occupancy.counts("room") == (0, 0)
    a.join_all([("s3", "room", "u")])
    a.leave_all([("s2", "u", ["room"], None)])
    assert store.occupancy.counts("room") == (1, 1)
    a.join_all([("s3", "room", "u")])  # the same subscription given twice counts once
    assert store.occupancy.counts("room") == (1, 1)
    a.leave_all([("s3", "u", ["room"], None)])
    assert store.occupancy.counts("room") == (0, 0)
    assert [kind for kind, _c, _u in stream(store)] == [
        "channel.occupied", "presence.join", "presence.leave", "channel.vacated",
        "channel.occupied", "presence.join", "presence.leave", "channel.vacated"]


def test_a_leave_redis_refused_is_retried_once_and_the_close_event_goes_out(store):
    a = hub_side(store, "node-a", presence_grace=0.0)
    a.join_all([("s1", "room", "u"), ("s1", "hall", "u")])
    node = store.keys.node_subscriptions("node-a")
    store.redis.rename(node, node + ":aside")
    store.redis.set(node, "not a hash")  # every leave script of node-a now fails (WRONGTYPE) before writing
    try:
        a.leave_all([("s1", "u", ["room", "hall"], a.closed_event("s1", "u", 1000, ""))])
    finally:
        store.redis.delete(node)
        store.redis.rename(node + ":aside", node)
    assert store.occupancy.counts("room") == (1, 1)  # not taken off yet
    assert stream(store)[-1] == ("connection.closed", None, "u")  # not held back by the failed leave
    assert a.retry() == 0  # its backoff is not over
    assert a.retry(force=True) == 2
    assert store.occupancy.counts("room") == (0, 0) and store.occupancy.counts("hall") == (0, 0)
    assert a.retry(force=True) == 0
    a.leave_all([("s1", "u", ["room", "hall"], None)])  # again: nothing twice
    assert stream(store)[4:] == [("connection.closed", None, "u"), ("presence.leave", "room", "u"),
                                 ("channel.vacated", "room", None), ("presence.leave", "hall", "u"),
                                 ("channel.vacated", "hall", None)]


def test_a_failed_leave_is_not_retried_over_a_new_subscription_of_the_same_socket(store, monkeypatch):
    a = hub_side(store, "node-a", presence_grace=0.0)
    a.join_all([("s1", "room", "u")])
    node = store.keys.node_subscriptions("node-a")
    store.redis.rename(node, node + ":aside")
    store.redis.set(node, "not a hash")
    monkeypatch.setattr("web.hub.occupancy.MAX_FAILED", 1)
    try:
        a.leave_all([("s1", "u", ["room"], None), ("s2", "u", ["hall"], None)])  # one kept, one past the bound
    finally:
        store.redis.delete(node)
        store.redis.rename(node + ":aside", node)
    assert len(a._failed) == 1
    a.join_all([("s1", "room", "u")])  # subscribed again: the standing count is this one's
    assert a.retry(force=True) == 0
    assert store.occupancy.counts("room") == (1, 1)


def test_a_reaped_channels_vacate_waits_for_a_living_users_pending_leave(store):
    alive, dead = hub_side(store, "node-alive"), hub_side(store, "node-dead")
    alive.join_all([("s1", "room", "u1")])
    dead.join_all([("d1", "room", "v")])
    alive.leave_all([("s1", "u1", ["room"], None)])  # u1's leave waits out the grace (5 s)
    alive.reap(lambda nodes: {"node-alive"} & set(nodes))
    assert store.occupancy.counts("room") == (0, 0)
    assert stream(store)[-1] == ("presence.leave", "room", "v")  # the dead one's leave at once; no vacate yet
    assert alive.flush(time.time() + 6) == 2
    assert stream(store)[-3:] == [("presence.leave", "room", "v"), ("presence.leave", "room", "u1"),
                                  ("channel.vacated", "room", None)]


def test_a_script_call_handles_a_bounded_number_of_subscriptions(store, monkeypatch):
    from pipeline.store.occupancy import MAX_ENTRIES
    a = hub_side(store, "node-a", presence_grace=0.0)
    sizes: list[int] = []
    runner = store.occupancy.runner
    run, one = runner.run, runner.one
    monkeypatch.setattr(runner, "run", lambda calls: sizes.append(len(calls)) or run(calls))
    monkeypatch.setattr(runner, "one", lambda call: sizes.append(len(call.args) // 6) or one(call))
    channels = [f"c{n}" for n in range(5000)]
    a.join_all([("s", channel, "u") for channel in channels])
    a.leave_all([("s", "u", channels[:2500], None)])
    assert a.reap(lambda nodes: set(), limit=5000) == 2500
    assert store.occupancy.page("c", None, 10) == ([], None)
    assert sizes and max(sizes) <= MAX_ENTRIES
    assert len(sizes) >= 3 + 2 + 2  # 5,000 joins, 2,500 leaves, 2,500 reaped


def test_with_more_pending_leaves_than_a_reap_reads_a_vacate_waits_until_the_horizon(store, monkeypatch):
    monkeypatch.setattr("pipeline.store.occupancy.PENDING_READ", 2)
    alive, dead = hub_side(store, "node-alive"), hub_side(store, "node-dead")
    alive.join_all([("s1", "room", "u1"), ("s2", "hall", "u2")])
    dead.join_all([("d1", "room", "v")])
    alive.leave_all([("s1", "u1", ["room"], None), ("s2", "u2", ["hall"], None)])  # 3 pending: more than read
    alive.reap(lambda nodes: {"node-alive"} & set(nodes))
    leaving = store.keys.leaving
    assert store.redis.zscore(leaving, vacancy("room")) >= store.redis.zscore(leaving, member("room", "u1"))
    assert alive.flush(time.time() + 6) == 4
    room = [e for e in stream(store) if e[1] == "room"]
    assert room[-3:] == [("presence.leave", "room", "v"), ("presence.leave", "room", "u1"),
                         ("channel.vacated", "room", None)]
