"""A webhook receiver that fails for a minute, then recovers (issue 22's target): it gets every
event, none twice once deduped by id, each channel's in order (docs/webhooks.md)."""

from __future__ import annotations

import collections
import time

from tests.harness import wait_until
from tests.receivers import Answer, Receiver

OUTAGE = 60.0  # seconds the receiver answers 500
MESSAGES = 300


def test_a_receiver_down_for_a_minute_gets_every_event_once_in_order(make_stack, channels):
    receiver = Receiver(Answer(500)).start()
    try:
        stack = make_stack(env={"HERALD_WEBHOOK_URL": f"{receiver.url} message.delivered",
                                "HERALD_WEBHOOK_SECRET": "webhook-secret-for-the-fault-test-0123456",
                                "HERALD_WEBHOOK_MAX_DELAY": 2, "HERALD_WEBHOOK_BATCH": 50})
        stack.worker()
        stack.bridge()
        web = stack.web()
        outage_ends = time.monotonic() + OUTAGE
        token = stack.token()
        published: dict[str, list[str]] = collections.defaultdict(list)
        # Spread over half the outage: many small batches waiting behind the first failing one.
        for n in range(MESSAGES):
            channel = channels[n % 6]
            status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}},
                                          token=token)
            assert status == 202, body
            published[channel].append(body["id"])
            time.sleep(OUTAGE / 2 / MESSAGES)
        time.sleep(max(0.0, outage_ends - time.monotonic()))
        failed_posts = len(receiver.posts)
        receiver.answer = Answer(200)
        wanted = {msg_id for ids in published.values() for msg_id in ids}

        def seen() -> set[str]:
            return {e["message_id"] for e in receiver.events() if e["type"] == "message.delivered"}
        wait_until(lambda: wanted <= seen(), 90, interval=0.5, what="every event after the outage")
        time.sleep(2)  # anything sent twice would come by now
        events = receiver.events()
        sent_per_id = collections.Counter(e["id"] for e in events)
        first: dict[str, dict] = {}
        for event in events:  # deduped by id, as a receiver does: the first of each
            first.setdefault(event["id"], event)
        ids_per_message = collections.Counter(e["message_id"] for e in first.values())
        lost = len(wanted - seen())
        duplicated = sum(count - 1 for count in ids_per_message.values())
        reordered = 0
        for channel, ids in published.items():
            got = [e["message_id"] for e in first.values() if e["channel"] == channel]
            rank = {msg_id: i for i, msg_id in enumerate(ids)}
            reordered += sum(1 for a, b in zip(got, got[1:]) if rank[a] > rank[b])
        print(f"\nFAULT-FIGURES lost={lost} duplicated={duplicated} reordered={reordered} "
              f"(events={len(first)} posts_failed={failed_posts} resent_ids={sum(sent_per_id.values()) - len(first)})")
        assert (lost, duplicated, reordered) == (0, 0, 0)
        assert failed_posts > 5  # it did fail, and was retried with backoff, not hammered
    finally:
        receiver.stop()


def test_a_worker_killed_mid_post_leaves_the_batch_to_be_sent_again(make_stack, channels):
    # The receiver answers after 3 s: the worker is killed while its POST waits (the
    # receiver, finishing it, counts it as not accepted). The lease lapses
    # (HERALD_WEBHOOK_TIMEOUT + 13 s), the bridge starts delivery again on the new worker,
    # and the batch comes again with the same event ids.
    receiver = Receiver(Answer(500, delay=3)).start()
    try:
        stack = make_stack(env={"HERALD_WEBHOOK_URL": f"{receiver.url} message.delivered",
                                "HERALD_WEBHOOK_SECRET": "webhook-secret-for-the-fault-test-0123456",
                                "HERALD_WEBHOOK_TIMEOUT": 5, "HERALD_WEBHOOK_MAX_DELAY": 2})
        worker = stack.worker()
        stack.bridge()
        web = stack.web()
        token = stack.token()
        published = []
        for n in range(20):
            status, _, body = web.request("POST", "/api/v1/messages", {"channel": channels[0], "data": {"n": n}},
                                          token=token)
            assert status == 202, body
            published.append(body["id"])
        wait_until(lambda: "webhook delivery started" in stack.procs[1].log(), 30, what="delivery started")
        time.sleep(1.5)  # the POST is in flight, its answer 1.5 s away
        receiver.answer = Answer(200)
        worker.kill()
        killed_at = time.monotonic()
        stack.worker("worker2")
        wait_until(lambda: set(published) <= {e["message_id"] for e in receiver.events()}, 60, interval=0.5,
                   what="every event after the kill")
        seconds = time.monotonic() - killed_at
        in_flight = {e["id"] for e in receiver.posts[0].events}
        assert receiver.posts[0].status == 500 and in_flight <= {e["id"] for e in receiver.events()}
        first: dict[str, dict] = {}
        for event in receiver.events():
            first.setdefault(event["id"], event)
        got = [e["message_id"] for e in first.values()]
        lost = len(set(published) - set(got))
        duplicated = len(got) - len(set(got))
        reordered = sum(1 for a, b in zip(got, got[1:]) if published.index(a) > published.index(b))
        print(f"\nFAULT-FIGURES lost={lost} duplicated={duplicated} reordered={reordered} "
              f"(in_flight_events={len(in_flight)} seconds_after_kill={seconds:.1f})")
        assert (lost, duplicated, reordered) == (0, 0, 0)
    finally:
        receiver.stop()
