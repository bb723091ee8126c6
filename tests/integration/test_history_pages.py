"""History and replay pages are bounded in bytes (docs/protocol.md: "WebSocket limits"):
large messages give smaller pages, continued with `next`, and paging through
gives every message once, in order."""

from __future__ import annotations

import json

from pipeline.core.messages import parse_publish

BIG = 60_000  # bytes of padding: 1 MiB (HERALD_HISTORY_PAGE_BYTES) holds 17 such messages


def _deliver(stack, channel: str, count: int, pad: int) -> list[str]:
    # Straight through the store, as a worker delivers: history, then pub/sub.
    batch = [parse_publish({"channel": channel, "data": {"n": n, "pad": "x" * pad}}, sender="t")
             for n in range(count)]
    assert [outcome for outcome, *_ in stack.store().deliver(batch)] == ["delivered"] * count
    return [envelope.id for envelope in batch]


def _pages(web, token, channel, limit):
    pages, since = [], None
    while True:
        query = f"?limit={limit}" + (f"&since={since}" if since else "")
        status, _, page = web.request("GET", f"/api/v1/channels/{channel}/history{query}", token=token)
        assert status == 200, page
        pages.append(page)
        since = page["next"]
        if since is None:
            return pages


def test_history_pages_of_large_messages_are_bounded_in_bytes_and_continue_with_next(stack, web, token, channel):
    ids = _deliver(stack, channel, 40, BIG)
    pages = _pages(web, token, channel, 1000)
    sizes = [len(page["messages"]) for page in pages]
    assert [m["id"] for page in pages for m in page["messages"]] == ids, sizes
    assert len(pages) >= 3 and max(sizes) <= 17, sizes
    # Each page within the budget, give or take one message.
    assert all(len(json.dumps(page)) < 1024 * 1024 + BIG + 1000 for page in pages)


def test_a_message_larger_than_the_budget_still_makes_a_page_of_one(stack, channel):
    web = stack.web("small-pages", HERALD_HISTORY_PAGE_BYTES=16384)
    try:
        token = stack.token()
        ids = _deliver(stack, channel, 5, 20_000)
        pages = _pages(web, token, channel, 100)
        assert [[m["id"] for m in page["messages"]] for page in pages] == [[i] for i in ids]
    finally:
        web.proc.stop(10)


def test_small_messages_fill_a_page_up_to_its_limit(stack, web, token, channel):
    ids = _deliver(stack, channel, 150, 10)
    pages = _pages(web, token, channel, 100)
    assert [len(page["messages"]) for page in pages] == [100, 50]
    assert [m["id"] for page in pages for m in page["messages"]] == ids


def test_a_replay_page_is_bounded_in_bytes_and_the_pages_hold_every_message_once(stack, web, token, channel):
    ids = _deliver(stack, channel, 40, BIG)
    client = web.ws(token)
    client.recv()
    reply = client.subscribe(channel, since="0-0")
    assert reply["recovered"] is True and reply["more"] is True
    assert 1 <= reply["replayed"] <= 17, reply
    got = [client.expect(lambda f: f["op"] == "message", timeout=15)["id"] for _ in ids]
    assert got == ids
    client.close()
