"""Webhook signing, batching and backoff: pure logic (docs/webhooks.md)."""

from __future__ import annotations

import json

from pipeline.core.messages import dumps
from pipeline.webhooks import EVENT_FIELD
from pipeline.webhooks.delivery import BODY_BYTES, batch, body, position
from pipeline.webhooks.signing import signature, verify
from tasks.processor import backoff_delay
from tasks.webhooks import BACKOFF_BASE

SECRET = "a-webhook-secret-of-at-least-32-bytes!"


def _entries(types: list[str], pad: int = 0) -> list[tuple[str, dict]]:
    return [(f"1000-{i}", {EVENT_FIELD: dumps({"id": f"e{i}", "type": t, "pad": "x" * pad})})
            for i, t in enumerate(types)]


def test_a_signed_body_verifies_and_a_tampered_one_does_not():
    raw = b'{"events":[{"id":"1"}]}'
    header = signature(SECRET, raw, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, header, raw, now=1_700_000_010)
    assert not verify(SECRET, header, raw.replace(b"1", b"2"), now=1_700_000_010)
    assert not verify("another-secret-of-at-least-32-bytes!!", header, raw, now=1_700_000_010)
    # The timestamp is signed: a changed one fails even with the same mac.
    assert not verify(SECRET, header.replace("t=1700000000", "t=1700000001"), raw, now=1_700_000_010)


def test_an_old_or_future_signature_is_refused():
    raw = b"{}"
    header = signature(SECRET, raw, 1_700_000_000)
    assert not verify(SECRET, header, raw, now=1_700_000_000 + 301)
    assert not verify(SECRET, header, raw, now=1_700_000_000 - 301)
    assert verify(SECRET, header, raw, tolerance=600, now=1_700_000_000 + 301)


def test_a_malformed_signature_header_is_refused_not_raised():
    for header in (None, "", "t=abc,v1=00", "v1=00", "t=1", "garbage", "t=1,v1"):
        assert not verify(SECRET, header, b"{}")


def test_a_batch_holds_at_most_the_batch_size_and_stops_at_its_last_event():
    step = batch(_entries(["message.delivered"] * 10), lambda _t: True, max_events=4)
    assert len(step.events) == 4 and step.last == "1000-3"
    sent = json.loads(body(step.events))
    assert [e["id"] for e in sent["events"]] == ["e0", "e1", "e2", "e3"]


def test_a_batch_stops_before_its_byte_bound_but_holds_one_event_at_least():
    entries = _entries(["message.delivered"] * 10, pad=300_000)
    step = batch(entries, lambda _t: True, max_events=500)
    assert len(step.events) == 3 and len(body(step.events)) <= BODY_BYTES
    alone = batch(_entries(["message.delivered"], pad=2 * BODY_BYTES), lambda _t: True, max_events=500)
    assert len(alone.events) == 1


def test_events_a_receiver_does_not_want_are_passed_over_by_its_cursor():
    types = ["presence.join", "message.delivered", "presence.leave", "presence.join"]
    step = batch(_entries(types), lambda t: t.startswith("message."), max_events=500)
    assert [json.loads(e)["id"] for e in step.events] == ["e1"] and step.last == "1000-3"
    none = batch(_entries(["presence.join"] * 3), lambda t: t.startswith("message."), max_events=500)
    assert none.events == [] and none.last == "1000-2"


def test_stream_positions_sort_as_the_stream_does():
    assert position("999-10") < position("1000-2") < position("1000-10") and position("0-0") == (0, 0)


def test_backoff_starts_near_half_a_second_doubles_and_is_capped_with_full_jitter():
    ceilings = [backoff_delay(attempt, BACKOFF_BASE, 30.0, rand=lambda: 1.0) for attempt in range(10)]
    assert ceilings[:4] == [0.5, 1.0, 2.0, 4.0] and ceilings[-1] == 30.0
    assert backoff_delay(5, BACKOFF_BASE, 30.0, rand=lambda: 0.0) == 0.0


def test_without_a_receiver_the_bridge_never_looks_and_the_worker_has_no_webhook_queue():
    from pipeline.bridge.webhooks import WebhookStarter
    from pipeline.core.settings import Settings
    from pipeline.taskqueue import WEBHOOK_TASK_NAME, make_celery, webhook_queue
    base = {"HERALD_SECRET_KEY": "a-secret-key-that-is-long-enough-for-hs256",
            "REDIS_URL": "redis://127.0.0.1:9/0", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    quiet = Settings.from_env(base)
    assert WebhookStarter(quiet, store=None, celery_app=None).next_check == float("inf")
    assert not make_celery(quiet).conf.task_routes
    hooked = Settings.from_env({**base, "HERALD_WEBHOOK_URL": "http://127.0.0.1:9/hooks",
                                "HERALD_WEBHOOK_SECRET": SECRET})
    app = make_celery(hooked)
    assert app.conf.task_routes[WEBHOOK_TASK_NAME]["queue"] == webhook_queue(hooked)
    assert {q.name for q in app.conf.task_queues} == {hooked.task_queue, webhook_queue(hooked)}


def test_a_batch_puts_each_channels_message_events_in_kafka_order():
    # Two workers append consecutive records' events crosswise; presence events keep their places.
    from pipeline.core.messages import dumps
    from pipeline.webhooks import EVENT_FIELD
    from pipeline.webhooks.delivery import batch

    stored = [{"type": "message.delivered", "channel": "a", "offset": 7},
              {"type": "presence.join", "channel": "a", "user": "u"},
              {"type": "message.delivered", "channel": "b", "offset": 3},
              {"type": "message.delivered", "channel": "a", "offset": 5},
              {"type": "message.dead_lettered", "channel": "b", "offset": 2}]
    entries = [(f"{n}-0", {EVENT_FIELD: dumps(e)}) for n, e in enumerate(stored)]
    sent = [json.loads(raw) for raw in batch(entries, lambda _type: True, 100).events]
    assert [(e["type"], e["channel"], e.get("offset")) for e in sent] == [
        ("message.delivered", "a", 5), ("presence.join", "a", None), ("message.dead_lettered", "b", 2),
        ("message.delivered", "a", 7), ("message.delivered", "b", 3)]
