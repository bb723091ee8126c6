"""Presence on a real Redis (review M8): listings come in pages, the reaper looks at a share of the
channels per run in a loop of its own, and the heartbeat never waits for it."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from pipeline.settings import Settings
from pipeline.store import Store, connect
from tests.harness import SECRET
from web.hub.presence import PAGE, Presence, parse_cursor

MEMBERS = 3000  # several pages, and a hash Redis keeps as a real hash table (HSCAN pages by COUNT)


@pytest.fixture
def store(spare_redis_url):
    settings = Settings.from_env({"REDIS_URL": spare_redis_url, "HERALD_SECRET_KEY": SECRET,
                                  "HERALD_REDIS_PREFIX": f"p{uuid.uuid4().hex[:8]}", "HERALD_PRESENCE_TTL": "3"})
    client = connect(settings)
    yield Store(client, settings)
    client.connection_pool.disconnect()


def fill(store, channel: str, count: int, node: str) -> None:
    """`count` presence entries of `node` in `channel`, written as join_all writes them."""
    pipe = store.redis.pipeline(transaction=False)
    for n in range(count):
        client = f"c{n:05d}-{node}"
        pipe.hset(store.keys.presence(channel), client,
                  json.dumps({"client": client, "user": f"u{n}", "since": n, "node": node}))
    pipe.sadd(store.keys.presence_channels, channel)
    pipe.execute()


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


def test_the_reaper_takes_a_share_of_the_channels_per_run_and_keeps_the_living(store):
    presence = Presence(store, store.settings, "node-a")
    store.redis.set(store.keys.node("node-a"), "1", ex=60)
    channels = [f"room:{n}" for n in range(2500)]
    pipe = store.redis.pipeline(transaction=False)
    for n, channel in enumerate(channels):
        for client, node in ((f"dead{n}", "node-dead"), (f"live{n}", "node-a") if n % 2 else (None, None)):
            if client:
                pipe.hset(store.keys.presence(channel), client,
                          json.dumps({"client": client, "user": "u", "since": n, "node": node}))
        pipe.sadd(store.keys.presence_channels, channel)
    pipe.execute()
    pubsub = store.redis.pubsub()
    pubsub.psubscribe(store.keys.presence_channel("room:*"))
    runs, reaped = 0, []
    while True:
        got = presence.reap(limit=500)
        runs += 1
        assert len({channel for channel, _ in got}) <= 3 * 500  # SSCAN's COUNT is a hint too
        reaped += got
        if presence._reap_cursor == 0:
            break
    assert runs >= 2500 // (3 * 500)
    assert sorted(entry["client"] for _, entry in reaped) == sorted(f"dead{n}" for n in range(2500))
    # The living stay; a channel left empty leaves the index, one with a living member does not.
    assert all(store.redis.hexists(store.keys.presence(c), f"live{n}") for n, c in enumerate(channels) if n % 2)
    assert store.redis.smembers(store.keys.presence_channels) == {c for n, c in enumerate(channels) if n % 2}
    # Each reaped entry's leave frame went out, once.
    leaves = []
    deadline = time.monotonic() + 10
    while len(leaves) < 2500 and time.monotonic() < deadline:
        item = pubsub.get_message(timeout=1)
        if item and item["type"] == "pmessage":
            leaves.append(json.loads(item["data"])["client"])
    pubsub.close()
    assert sorted(leaves) == sorted(f"dead{n}" for n in range(2500))


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
