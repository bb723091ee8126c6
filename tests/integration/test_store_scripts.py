"""The store's pipelines send scripts by hash alone, and survive a Redis that lost them."""

from __future__ import annotations

import uuid

from pipeline.messages import Envelope
from pipeline.settings import Settings
from pipeline.store import Store, connect


def _store(url: str) -> Store:
    settings = Settings.from_env({"HERALD_SECRET_KEY": "k" * 32, "REDIS_URL": url,
                                  "HERALD_REDIS_PREFIX": f"s{uuid.uuid4().hex[:8]}"})
    return Store(connect(settings, 2), settings)


def _script_exists_calls(store: Store) -> int:
    stats = store.redis.info("commandstats")
    return stats.get("cmdstat_script|exists", {}).get("calls", 0)


def test_a_batch_is_one_round_trip_without_script_exists_and_survives_a_script_flush(spare_redis_url):
    store = _store(spare_redis_url)
    channel = f"c{uuid.uuid4().hex[:8]}"
    batch = [Envelope(f"m{n}-{uuid.uuid4().hex[:6]}", channel, "message", n, "s", 0, partition=0, offset=n,
                      prev=n - 1 if n else None) for n in range(3)]
    before = _script_exists_calls(store)
    assert store.mark_processing(batch) == ["processing"] * 3
    assert [r[0] for r in store.deliver(batch[:2])] == ["delivered", "delivered"]
    store.redis.script_flush()  # what a restarted Redis has forgotten
    assert [r[0] for r in store.deliver(batch[2:])] == ["delivered"]
    store.record_accepted([(batch[0], 0, 0)], {})
    assert _script_exists_calls(store) == before
    assert store.get_message(batch[0].id)["status"] == "delivered"


def test_every_script_is_loaded_again_after_a_flush(spare_redis_url):
    store = _store(spare_redis_url)
    store.redis.script_flush()
    assert store.claim_connections([("node/a", "u1", "10.0.0.1")]) == [None]
