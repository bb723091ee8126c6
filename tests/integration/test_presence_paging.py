"""Presence on a real Redis (docs/guide.md: "Presence"): listings come in pages, the reaper reads a bounded share of the
dead nodes' own entries per run, never a whole channel, in a loop of its own, and the heartbeat never
waits for it."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import redis

from pipeline.core.settings import Settings
from pipeline.store import Store, connect
from tests.harness import SECRET, redis_cluster
from web.hub.presence import PAGE, Presence, parse_cursor

MEMBERS = 3000  # several pages, and a hash Redis keeps as a real hash table (HSCAN pages by COUNT)


@pytest.fixture
def store(spare_redis_url):
    settings = Settings.from_env({"REDIS_URL": spare_redis_url, "HERALD_SECRET_KEY": SECRET,
                                  "HERALD_REDIS_PREFIX": f"p{uuid.uuid4().hex[:8]}", "HERALD_PRESENCE_TTL": "3"})
    client = connect(settings)
    yield Store(client, settings)
    client.connection_pool.disconnect()


def fill(store, channel: str, count: int, node: str, name: str = "c{n:05d}-{node}") -> None:
    """`count` presence entries of `node` in `channel`, written by join_all as a subscribe writes them."""
    presence = Presence(store, store.settings, node)
    clients = [SimpleNamespace(id=name.format(n=n, node=node), identity=SimpleNamespace(user=f"u{n}"))
               for n in range(count)]
    for start in range(0, count, 5000):
        presence.join_all([(client, channel) for client in clients[start:start + 5000]])


def test_a_channel_larger_than_a_page_is_listed_page_by_page(store):
    presence = Presence(store, store.settings, "node-a")
    store.redis.set(store.keys.node("node-a"), "1", ex=60)
    fill(store, "big:room", MEMBERS, "node-a")
    fill(store, "big:room", 50, "node-dead")  # a node that died: never listed
    seen, pages, cursor = [], 0, 0
    while True:
        page = presence.page("big:room", cursor)
        pages += 1
        # COUNT is Redis's hint: a page is about PAGE entries, never the whole channel.
        assert len(page["clients"]) <= 3 * PAGE, len(page["clients"])
        sinces = [c["since"] for c in page["clients"]]
        assert sinces == sorted(sinces)  # oldest first within a page
        seen += [c["client"] for c in page["clients"]]
        if page["next"] is None:
            break
        cursor = page["next"]
        assert isinstance(cursor, str) and parse_cursor(cursor) > 0
    print(f"\nPRESENCE-PAGES {{\"members\": {MEMBERS}, \"pages\": {pages}}}")
    assert pages >= MEMBERS // (3 * PAGE)
    assert sorted(seen) == sorted(f"c{n:05d}-node-a" for n in range(MEMBERS))  # each once, the dead left out
    # The listing the HTTP endpoint calls answers one page, not the whole channel.
    assert 0 < len(presence.page("big:room")["clients"]) <= 3 * PAGE
    for bad in ("-1", "abc", "1" * 21, "18446744073709551616", "\u0663"):
        with pytest.raises(ValueError):
            presence.page("big:room", bad)


def test_the_reaper_takes_a_share_of_the_dead_entries_per_run_and_keeps_the_living(store):
    presence = Presence(store, store.settings, "node-a")
    store.redis.set(store.keys.node("node-a"), "1", ex=60)
    channels = [f"room:{n}" for n in range(2500)]
    for n, channel in enumerate(channels):
        fill(store, channel, 1, "node-dead", name=f"dead{n}")
        if n % 2:
            fill(store, channel, 1, "node-a", name=f"live{n}")
    pubsub = store.redis.pubsub()
    pubsub.psubscribe(store.keys.presence_channel("room:*"))
    runs, reaped = 0, []
    while runs < 20:
        got = presence.reap(limit=500)
        runs += 1
        assert len(got) <= 500
        reaped += got
        if not got:
            break
    assert runs == 2500 // 500 + 1
    assert sorted(entry["client"] for _, entry in reaped) == sorted(f"dead{n}" for n in range(2500))
    assert all(channels[int(entry["client"][4:])] == channel for channel, entry in reaped)
    # The living stay; the dead node's index is gone and it left the set of nodes to reap.
    assert all(store.redis.hexists(store.keys.presence(c), f"live{n}") for n, c in enumerate(channels) if n % 2)
    assert not any(store.redis.exists(store.keys.presence(c)) for n, c in enumerate(channels) if not n % 2)
    assert not store.redis.exists(store.keys.node_presence("node-dead"))
    assert store.redis.smembers(store.keys.presence_nodes) == {"node-a"}
    assert store.redis.scard(store.keys.node_presence("node-a")) == 1250
    # A leave takes the entry out of its node's index too.
    presence.leave(SimpleNamespace(id="live1", identity=SimpleNamespace(user="u0")), "room:1")
    assert not store.redis.exists(store.keys.presence("room:1"))
    assert store.redis.scard(store.keys.node_presence("node-a")) == 1249
    # Each reaped entry's leave frame went out, once.
    leaves = []
    deadline = time.monotonic() + 10
    while len(leaves) < 2500 and time.monotonic() < deadline:
        item = pubsub.get_message(timeout=1)
        if item and item["type"] == "pmessage":
            leaves.append(json.loads(item["data"])["client"])
    pubsub.close()
    assert sorted(leaves) == sorted(f"dead{n}" for n in range(2500))


LIVE = 50_000  # one channel with this many living members
DEAD = 100  # and a dead node's entries in it


def test_a_huge_channel_costs_the_reaper_only_the_dead_nodes_entries(store, monkeypatch):
    fill(store, "huge:room", LIVE, "node-a")
    fill(store, "huge:room", DEAD, "node-dead")
    store.redis.set(store.keys.node("node-a"), "1", ex=60)
    presence = Presence(store, store.settings, "node-a")
    replies = []  # the size (elements, however nested) of every reply Redis sends the reaper
    parse = redis.Redis.parse_response

    def counted(self, connection, command_name, **options):
        reply = parse(self, connection, command_name, **options)
        replies.append(size(reply))
        return reply

    monkeypatch.setattr(redis.Redis, "parse_response", counted)
    runs, reaped = [], []
    while len(runs) < 10:
        replies.clear()
        got = presence.reap(limit=40)
        runs.append({"reaped": len(got), "replies": len(replies), "elements": sum(replies),
                     "largest": max(replies, default=0)})
        reaped += got
        if not got:
            break
    monkeypatch.undo()
    print(f"\nPRESENCE-REAP {json.dumps({'live': LIVE, 'dead': DEAD, 'runs': runs})}")
    # Each run reads about its share of dead entries (40, each reply element a few times over),
    # never the channel's 50,100 entries; the dead go within a few runs.
    for run in runs:
        assert run["largest"] <= 4 * 40 and run["elements"] <= 10 * 40 + 20, run
    assert sorted(entry["client"] for _, entry in reaped) == sorted(f"c{n:05d}-node-dead" for n in range(DEAD))
    assert len(runs) <= DEAD // 40 + 2
    assert store.redis.hlen(store.keys.presence("huge:room")) == LIVE  # no living entry went


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")), reason="needs redis-server")
def test_the_reaper_works_on_a_redis_cluster(tmp_path, spare_redis_url):
    servers, url = redis_cluster(tmp_path)
    try:
        settings = Settings.from_env({"REDIS_URL": url, "REDIS_CLUSTER": "1", "CELERY_BROKER_URL": spare_redis_url,
                                      "HERALD_SECRET_KEY": SECRET, "HERALD_PRESENCE_TTL": "3"})
        client = connect(settings)
        store = Store(client, settings)
        channels = [f"cl:{n}" for n in range(60)]  # over every node's slots
        assert len({client.get_node_from_key(store.keys.presence(c)).name for c in channels}) == 3
        for channel in channels:
            fill(store, channel, 3, "node-a")
            fill(store, channel, 2, "node-dead")
        store.redis.set(store.keys.node("node-a"), "1", ex=60)
        presence = Presence(store, settings, "node-a")
        reaped, runs = [], 0
        while runs < 10:
            got = presence.reap(limit=50)
            runs += 1
            reaped += got
            if not got:
                break
        assert sorted((channel, entry["client"]) for channel, entry in reaped) == sorted(
            (channel, f"c{n:05d}-node-dead") for channel in channels for n in range(2))
        assert all(store.redis.hlen(store.keys.presence(channel)) == 3 for channel in channels)
        assert store.redis.smembers(store.keys.presence_nodes) == {"node-a"}
        client.disconnect_connection_pools()
    finally:
        for server in servers:
            server.stop()


def size(reply) -> int:
    """How many elements a Redis reply holds, however nested (1 for a scalar)."""
    if isinstance(reply, dict):
        return sum(size(k) + size(v) for k, v in reply.items())
    if isinstance(reply, (list, tuple, set)):
        return sum(size(item) for item in reply) or 1
    return 1


def test_the_heartbeat_never_waits_for_the_reaper(store):
    presence = Presence(store, store.settings, "node-b")
    reaping, release = threading.Event(), threading.Event()

    def slow_reap(limit=0):
        reaping.set()
        release.wait(30)  # a reaping slower than the presence TTL
        return []

    presence.reap = slow_reap
    try:
        beats = threading.Thread(target=lambda: [presence.beat([]) or time.sleep(0.2) for _ in range(10)],
                                 daemon=True)
        beats.start()
        assert reaping.wait(10)
        beats.join(10)
        assert not beats.is_alive()  # ten beats went on while a reaping was stuck
        assert store.redis.ttl(store.keys.node("node-b")) > 0
    finally:
        release.set()


def test_the_http_listing_follows_next_through_every_page(stack, web, token, channel):
    store = stack.store()
    store.redis.set(store.keys.node("node-http"), "1", ex=60)
    fill(store, channel, 700, "node-http")
    seen, pages, query = [], 0, ""
    while True:
        status, _, page = web.request("GET", f"/api/v1/channels/{channel}/presence{query}", token=token)
        assert status == 200, page
        pages += 1
        seen += [c["client"] for c in page["clients"]]
        if page["next"] is None:
            break
        query = f"?cursor={page['next']}"
    assert pages > 1 and sorted(seen) == sorted(f"c{n:05d}-node-http" for n in range(700))
    for bad in ("abc", "18446744073709551616"):
        status, _, body = web.request("GET", f"/api/v1/channels/{channel}/presence?cursor={bad}", token=token)
        assert status == 400, body
