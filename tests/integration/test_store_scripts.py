"""The store's pipelines send scripts by hash alone, and survive a Redis that lost them."""

from __future__ import annotations

import time
import uuid

from pipeline.core.messages import Envelope, now_ms
from pipeline.store import RATE_WINDOW_CAP, Store
from pipeline.store.rates import RATE_WINDOW


def _script_exists_calls(store: Store) -> int:
    stats = store.redis.info("commandstats")
    return stats.get("cmdstat_script|exists", {}).get("calls", 0)


def test_a_batch_is_one_round_trip_without_script_exists_and_survives_a_script_flush(spare_store):
    store = spare_store()
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


def test_every_script_is_loaded_again_after_a_flush(spare_store):
    store = spare_store()
    store.redis.script_flush()
    assert store.claim_connections([("node/a", "u1", "10.0.0.1")]) == [None]


def test_a_batch_is_accepted_in_one_script_call_that_keeps_a_later_status(spare_store):
    store = spare_store()
    channel = f"c{uuid.uuid4().hex[:8]}"
    ts = now_ms()
    batch = [Envelope(f"a{n}-{uuid.uuid4().hex[:6]}", channel, "message", {"n": n, "text": "é"}, f"s{n}", ts + n)
             for n in range(5)]
    store.mark_processing(batch[1:2])  # a worker got there first: its status stays
    assert store.claim_idempotency(batch[0].id, "claim-0") is None
    calls = store.redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    store.record_accepted([(envelope, 3, 40 + n) for n, envelope in enumerate(batch)],
                          {batch[0].id: ("claim-0", '{"answer":{}}')})
    # One call for the statuses, one for the answer, in one round trip.
    assert store.redis.info("commandstats")["cmdstat_evalsha"]["calls"] == calls + 2
    first = store.redis.hgetall(store.keys.message(batch[0].id))
    # No data before the rules ran (a `redact` would not have applied yet).
    assert first == {"channel": channel, "type": "message", "sender": "s0", "ts": str(ts),
                     "partition": "3", "offset": "40", "status": "accepted"}
    assert store.get_message(batch[0].id)["data"] is None
    assert 0 < store.redis.ttl(store.keys.message(batch[0].id)) <= store.settings.status_ttl
    assert store.get_message(batch[1].id)["status"] == "processing"
    assert store.get_message(batch[1].id)["data"] == {"n": 1, "text": "é"}
    assert [store.get_message(e.id)["status"] for e in batch[2:]] == ["accepted"] * 3
    assert store.redis.get(store.keys.idempotency(batch[0].id)) == '{"answer":{}}'
    # The status, dedupe marker and answer of an id expire together, HERALD_STATUS_TTL after it was published.
    at = store.redis.expiretime(store.keys.message(batch[0].id))
    assert at == store.redis.expiretime(store.keys.idempotency(batch[0].id)) == ts // 1000 + store.settings.status_ttl


def _evalsha_calls(store: Store) -> int:
    return store.redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def test_a_batchs_calls_of_one_script_are_one_call_with_each_calls_own_reply(spare_store):
    store = spare_store()
    channels = [f"c{uuid.uuid4().hex[:8]}" for _ in range(2)]
    # Offsets 0..5 alternate between two channels; the last one's predecessor (offset 7) never came.
    batch = [Envelope(f"b{n}-{uuid.uuid4().hex[:6]}", channels[n % 2], "message", n, "s", 0, partition=0,
                      offset=n, prev=n - 2 if n > 1 else None) for n in range(6)]
    batch.append(Envelope(f"late-{uuid.uuid4().hex[:6]}", channels[0], "message", 9, "s", 0, partition=0,
                          offset=9, prev=7))
    store.mark_processing(batch[:1])
    before = _evalsha_calls(store)
    assert store.mark_processing(batch) == ["processing"] + ["processing"] * 6
    assert _evalsha_calls(store) == before + 1
    assert store.redis.hget(store.keys.message(batch[0].id), "attempts") == "2"  # the one marked twice
    store.redis.script_flush()  # a restarted Redis: the batched form is loaded again too
    results = store.deliver(batch)
    assert _evalsha_calls(store) == before + 2 + 1  # the NOSCRIPT attempt, then the call again
    assert [r[0] for r in results] == ["delivered"] * 6 + ["parked"]
    assert [r[0] for r in store.deliver(batch[:2])] == ["duplicate", "duplicate"]
    history = {c: [f["f"] for _sid, f in store.redis.xrange(store.keys.history(c))] for c in channels}
    assert [len(history[c]) for c in channels] == [3, 3]
    assert all(batch[n].id in history[channels[n % 2]][n // 2] for n in range(6))


def test_a_rate_window_holds_at_most_its_cap_of_ids(spare_store):
    # A flood within a day-long window must not store every id it sent.
    store = spare_store()
    key = store.keys.rate("flood", "sender", "mallory")
    pipe = store.redis.pipeline(transaction=False)
    for n in range(RATE_WINDOW_CAP):
        pipe.evalsha(RATE_WINDOW.sha, 1, key, time.time(), 86400, f"m{n}", "1", RATE_WINDOW_CAP)
    store.redis.script_load(RATE_WINDOW.source.text)
    counts = pipe.execute()
    assert counts[0] == 1 and counts[-1] == RATE_WINDOW_CAP
    assert store.count_in_window(key, 86400, "one-more") == RATE_WINDOW_CAP + 1
    assert store.count_in_window(key, 86400, "m5") == 6  # one counted before still counts where it was
    assert store.redis.zcard(key) == RATE_WINDOW_CAP
