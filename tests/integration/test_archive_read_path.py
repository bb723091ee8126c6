"""The archive behind the whole system (docs/guide.md: "The archive and its cache"): a message answers GET after its
Redis status expired, and a subscriber resumes from an offset older than its
channel's stream retains, over HTTP and WebSocket, with nothing lost and no
duplicate at the seam."""

from __future__ import annotations

import re
import uuid

import pytest

from pipeline.archive import Archive, ArchiveReader
from pipeline.store.keys import Keys
from tests.harness import wait_until


def _publish(web, token, channel, count, pad: int = 0) -> list[str]:
    ids = []
    for n in range(count):
        data = {"n": n, "pad": "x" * pad} if pad else {"n": n}
        status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": data}, token=token)
        assert status == 202, body
        ids.append(body["id"])
    return ids


def _archived(stack, channel, count) -> list[dict]:
    """The channel's archived messages once `count` of them carry their history offset."""
    reader = ArchiveReader(Archive(stack.settings.database_url))
    try:
        return wait_until(lambda: (rows := reader.after(channel, "0-0", 1000)) and len(rows) == count and rows,
                          30, 0.1, f"{count} messages archived with their offsets")
    finally:
        reader.engine.dispose()


def _metric(web, name, **labels) -> float:
    text = web.request("GET", "/metrics")[2]
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{label_text}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    assert found, f"{name} {labels} not on /metrics"
    return float(found.group(1))


def _expire_status(stack, msg_id):
    # What HERALD_STATUS_TTL does to every status (its floor is 60 s): the hash lapses.
    stack.store().redis.pexpire(Keys(stack.settings.redis_prefix).message(msg_id), 1)
    wait_until(lambda: not stack.store().redis.exists(Keys(stack.settings.redis_prefix).message(msg_id)), 5)


def test_a_message_answers_get_from_the_archive_after_its_status_expired(stack, web, token, channel):
    msg_id, = _publish(web, token, channel, 1)
    archived, = _archived(stack, channel, 1)
    _expire_status(stack, msg_id)
    queries = _metric(web, "herald_archive_queries_total")
    status, _, message = web.request("GET", f"/api/v1/messages/{msg_id}", token=token)
    assert status == 200, message
    assert message["id"] == msg_id and message["status"] == "delivered" and message["data"] == {"n": 0}
    assert message["channel"] == channel and message["stream_id"] == archived["offset"]
    assert _metric(web, "herald_archive_queries_total") == queries + 1
    hits = _metric(web, "herald_cache_requests_total", result="hit")
    assert web.request("GET", f"/api/v1/messages/{msg_id}", token=token)[2] == message
    assert _metric(web, "herald_cache_requests_total", result="hit") == hits + 1
    assert _metric(web, "herald_archive_queries_total") == queries + 1
    # A token that may not read the channel is told nothing, archived or not.
    outsider = stack.token("outsider", subscribe=["elsewhere:*"])
    assert web.request("GET", f"/api/v1/messages/{msg_id}", token=outsider)[0] == 404


def test_every_web_process_exposes_the_cache_metrics(stack):
    for web in stack.webs:
        for result in ("hit", "miss", "negative", "bloom_reject"):
            _metric(web, "herald_cache_requests_total", result=result)
        _metric(web, "herald_archive_queries_total")
        _metric(web, "herald_singleflight_waits_total")


@pytest.mark.parametrize("bad", ["bad%20id", "x" * 129, "a%2Fb", "%C3%A9t%C3%A9"])
def test_a_malformed_message_id_is_a_400_before_any_lookup(web, token, bad):
    queries = _metric(web, "herald_archive_queries_total")
    misses = _metric(web, "herald_cache_requests_total", result="miss")
    status, _, body = web.request("GET", f"/api/v1/messages/{bad}", token=token)
    assert status in (400, 404) if "%2F" in bad else status == 400, body  # an encoded slash may not reach the route
    assert _metric(web, "herald_archive_queries_total") == queries
    assert _metric(web, "herald_cache_requests_total", result="miss") == misses


def test_an_id_never_archived_is_a_404_from_the_bloom_filter(web, token):
    rejects = _metric(web, "herald_cache_requests_total", result="bloom_reject")
    queries = _metric(web, "herald_archive_queries_total")
    status, _, body = web.request("GET", f"/api/v1/messages/never-{uuid.uuid4().hex}", token=token)
    assert status == 404, body
    # Two ids looked up: the caller's own of that id, then the id as a global id (docs/protocol.md: "Message ids").
    assert _metric(web, "herald_cache_requests_total", result="bloom_reject") == rejects + 2
    assert _metric(web, "herald_archive_queries_total") == queries


def test_a_database_that_is_down_is_a_503_for_archive_reads_while_cached_reads_answer(stack, web, token, channel):
    cached, cold = _publish(web, token, channel, 2)
    _archived(stack, channel, 2)
    for msg_id in (cached, cold):
        _expire_status(stack, msg_id)
    assert web.request("GET", f"/api/v1/messages/{cached}", token=token)[0] == 200  # now in the cache
    nodb = stack.web("web-nodb", DATABASE_URL=f"sqlite:///{stack.workdir}/no-such-dir/archive.db")
    try:
        assert nodb.request("GET", f"/api/v1/messages/{cached}", token=token)[0] == 200
        status, headers, body = nodb.request("GET", f"/api/v1/messages/{cold}", token=token)
        assert status == 503 and headers["Retry-After"], body
        assert "sqlite" not in str(body)  # the database's error is logged, not shown
    finally:
        nodb.proc.stop(10)


def _history(web, token, channel, since, limit) -> tuple[list[dict], bool]:
    """Every page of the channel's history after `since`, following `next`."""
    got, recovered = [], None
    while True:
        status, _, page = web.request("GET", f"/api/v1/channels/{channel}/history?since={since}&limit={limit}",
                                      token=token)
        assert status == 200, page
        recovered = page["recovered"] if recovered is None else recovered and page["recovered"]
        got += page["messages"]
        if page["next"] is None:
            return got, recovered
        since = page["next"]


def test_history_continues_from_the_archive_past_the_streams_retention(stack, web, token):
    channel = f"short:{uuid.uuid4().hex[:12]}"  # the stack keeps 5 entries of `short:` channels
    ids = _publish(web, token, channel, 15)
    archived = _archived(stack, channel, 15)
    assert [row["id"] for row in archived] == ids
    retained = web.request("GET", f"/api/v1/channels/{channel}/history?limit=100", token=token)[2]["messages"]
    assert len(retained) == 5
    since = archived[1]["offset"]
    for limit in (3, 4, 100):  # pages that end before, across and after the seam
        got, recovered = _history(web, token, channel, since, limit)
        assert [m["id"] for m in got] == ids[2:] and recovered
        assert [m["offset"] for m in got] == [row["offset"] for row in archived[2:]]
        assert got[-5:] == retained
    # Before anything the archive holds: nothing proves that nothing is missing.
    assert _history(web, token, channel, "1-0", 100) == (
        [{k: v for k, v in row.items() if k != "op"} for row in archived], False)


def test_history_pages_from_the_archive_are_bounded_in_bytes_and_hold_every_message_once(stack, web, token):
    # 30 messages of ~60 KB, 25 of them only in the archive: 1.8 MB, more than
    # a page's budget (HERALD_HISTORY_PAGE_BYTES, 1 MiB) however large `limit`.
    channel = f"short:{uuid.uuid4().hex[:12]}"
    ids = _publish(web, token, channel, 30, pad=60_000)
    archived = _archived(stack, channel, 30)
    sizes, since, got = [], archived[0]["offset"], []
    while since is not None:
        status, _, page = web.request("GET", f"/api/v1/channels/{channel}/history?since={since}&limit=1000",
                                      token=token)
        assert status == 200 and page["recovered"] is True, page
        sizes.append(len(page["messages"]))
        got += [m["id"] for m in page["messages"]]
        since = page["next"]
    assert got == ids[1:], sizes  # every message once, in order, across the seam
    assert len(sizes) >= 2 and max(sizes) <= 18, sizes  # 1 MiB holds 17 of them


def test_a_websocket_subscriber_resumes_from_an_offset_older_than_the_stream_retains(stack, web, token):
    channel = f"short:{uuid.uuid4().hex[:12]}"
    ids = _publish(web, token, channel, 12)
    archived = _archived(stack, channel, 12)
    client = web.ws(token)
    client.recv()
    subscribed = client.subscribe(channel, since=archived[0]["offset"])
    assert subscribed["recovered"] is True, subscribed
    frames = [f for f in client.drain(2.0) if f["op"] == "message"]
    assert [f["id"] for f in frames] == ids[1:]
    assert [f["offset"] for f in frames] == [row["offset"] for row in archived[1:]]
    assert frames == archived[1:]
    more = _publish(web, token, channel, 2)  # live after the replay, no gap
    live = [client.expect(lambda f: f["op"] == "message") for _ in more]
    assert [f["id"] for f in live] == more
    client.close()
