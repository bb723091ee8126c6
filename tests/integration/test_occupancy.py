"""Occupancy on real web processes (docs/occupancy.md): every subscription counted across
processes, the events of its transitions in the webhook stream in order, the grace that
hides a reconnect, `connection.closed` with its code, and the admin reads of the counts.

Events are appended only when a receiver wants them: the two web processes here name one
(nothing listens on it; the stream is read straight from Redis)."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from pipeline.store.occupancy import subscription
from pipeline.webhooks import EVENT_FIELD
from tests.harness import close_code, wait_until

GRACE = 1.5  # HERALD_PRESENCE_GRACE of the processes here
HOOKED = {"HERALD_WEBHOOK_URL": "http://127.0.0.1:9/hook", "HERALD_WEBHOOK_SECRET": "s" * 40,
          "HERALD_PRESENCE_GRACE": GRACE, "HERALD_WS_RATE": 20}


@pytest.fixture(scope="module")
def hooked(stack):
    """Two web processes on the shared stack that append occupancy events."""
    webs = [stack.web(f"web-hooked{n}", **HOOKED) for n in range(2)]
    yield webs
    for web in webs:
        web.proc.stop(10)


@pytest.fixture(scope="module")
def admin(stack):
    return stack.token("ops", admin=True)


def events(stack, *, channel: str | None = None, client: str | None = None) -> list[dict]:
    """The webhook stream's events about `channel` (or `client`), oldest first."""
    entries = stack.store().redis.xrange(stack.store().keys.events)
    found = [json.loads(fields[EVENT_FIELD]) for _id, fields in entries]
    return [e for e in found if (channel is None or e.get("channel") == channel)
            and (client is None or e.get("client") == client)]


def kinds(stack, channel: str) -> list[tuple]:
    """(type, user) of each event about `channel`, in stream order."""
    return [(e["type"], e.get("user")) for e in events(stack, channel=channel)]


def connect(web, stack, user: str):
    client = web.ws(stack.token(user))
    connected = client.expect(lambda f: f.get("op") == "connected")
    return client, connected["client"]


def occupancy(web, admin, channel: str) -> dict:
    status, _, body = web.request("GET", f"/api/v1/channels/{channel}/occupancy", token=admin)
    assert status == 200, body
    return body


def test_events_follow_the_transitions_in_order_across_two_processes(stack, hooked, admin, channel):
    web_a, web_b = hooked
    alice, _ = connect(web_a, stack, "alice")
    alice.subscribe(channel)
    bob, _ = connect(web_b, stack, "bob")
    bob.subscribe(channel)
    alice_again, _ = connect(web_b, stack, "alice")  # a second socket of a user already in: no join
    alice_again.subscribe(channel)
    alice_again.subscribe(channel)  # a subscribe that replaces one counts once
    assert kinds(stack, channel) == [("channel.occupied", None), ("presence.join", "alice"),
                                     ("presence.join", "bob")]
    assert occupancy(web_a, admin, channel) == {"channel": channel, "subscribers": 3, "users": 2}

    alice.close()
    alice_again.send({"op": "unsubscribe", "channel": channel})
    alice_again.expect(lambda f: f.get("op") == "unsubscribed")
    assert occupancy(web_b, admin, channel) == {"channel": channel, "subscribers": 1, "users": 1}
    wait_until(lambda: len(kinds(stack, channel)) == 4, GRACE + 5, what="alice's leave")
    bob.close()
    wait_until(lambda: len(kinds(stack, channel)) == 6, GRACE + 5, what="bob's leave and the vacate")
    time.sleep(1)
    assert kinds(stack, channel) == [("channel.occupied", None), ("presence.join", "alice"),
                                     ("presence.join", "bob"), ("presence.leave", "alice"),
                                     ("presence.leave", "bob"), ("channel.vacated", None)]
    assert occupancy(web_a, admin, channel) == {"channel": channel, "subscribers": 0, "users": 0}
    found = events(stack, channel=channel)
    assert len({e["id"] for e in found}) == 6
    assert all(isinstance(e["time"], int) for e in found)
    alice_again.close()


def test_a_reconnect_within_the_grace_sends_no_pair_and_one_after_it_does(stack, hooked, channel):
    web_a, web_b = hooked
    first, _ = connect(web_a, stack, "carol")
    first.subscribe(channel)
    first.close()
    # Back within the grace, on the other process: nothing sent.
    second, _ = connect(web_b, stack, "carol")
    second.subscribe(channel)
    time.sleep(GRACE + 1.5)  # past the grace: the pending leave was cancelled, not flushed
    assert kinds(stack, channel) == [("channel.occupied", None), ("presence.join", "carol")]
    second.close()
    wait_until(lambda: len(kinds(stack, channel)) == 4, GRACE + 5, what="the leave after the grace")
    third, _ = connect(web_a, stack, "carol")
    third.subscribe(channel)
    wait_until(lambda: len(kinds(stack, channel)) == 6, 5, what="the join after it")
    assert kinds(stack, channel) == [("channel.occupied", None), ("presence.join", "carol"),
                                     ("presence.leave", "carol"), ("channel.vacated", None),
                                     ("channel.occupied", None), ("presence.join", "carol")]
    third.close()


def test_the_listing_pages_active_channels_by_prefix(stack, admin):
    web = stack.webs[0]  # processes without receivers count too: the server API reads the counts
    tag = f"list{uuid.uuid4().hex[:8]}"
    names = [f"{tag}:room{n}" for n in range(5)]
    clients = []
    for n, name in enumerate(names):
        client = web.ws(stack.token(f"u{n}"))
        client.subscribe(name)
        if n == 0:
            client.subscribe(f"{tag}:room1")  # room1: two users
        clients.append(client)
    outsider = web.ws(stack.token("x"))
    outsider.subscribe(f"{tag}x:room")  # sorts right after the prefix: never listed
    listed, cursor, pages = [], None, 0
    while True:
        query = f"?prefix={tag}:&limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = web.request("GET", "/api/v1/channels" + query, token=admin)
        assert status == 200, page
        pages += 1
        assert len(page["channels"]) <= 2
        listed += page["channels"]
        cursor = page["next"]
        if cursor is None:
            break
        assert ":" not in cursor  # opaque: not the channel's name
    assert pages == 3
    assert [c["channel"] for c in listed] == names
    by_name = {c["channel"]: c for c in listed}
    assert by_name[f"{tag}:room1"] == {"channel": f"{tag}:room1", "subscribers": 2, "users": 2}
    assert by_name[f"{tag}:room0"]["subscribers"] == 1
    for client in clients[:3]:
        client.close()
    wait_until(lambda: len(web.request("GET", f"/api/v1/channels?prefix={tag}:", token=admin)[2]["channels"]) == 2,
               10, what="closed channels to leave the listing")
    for client in [*clients[3:], outsider]:
        client.close()


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "cursor=%21%21", "cursor=abc",
                                   "cursor=" + "00" * 201, "prefix=a%20b", "prefix=" + "a" * 201, "other=1"])
def test_the_listing_refuses_a_bad_query(stack, admin, query):
    status, _, body = stack.webs[0].request("GET", f"/api/v1/channels?{query}", token=admin)
    assert status == 400, (query, body)


def test_the_reads_are_for_admin_tokens(stack, channel):
    web = stack.webs[0]
    assert web.request("GET", "/api/v1/channels", token=stack.token())[0] == 403
    assert web.request("GET", f"/api/v1/channels/{channel}/occupancy", token=stack.token())[0] == 403
    assert web.request("GET", "/api/v1/channels")[0] == 401
    admin = stack.token("ops", admin=True)
    assert web.request("GET", "/api/v1/channels/bad%20name/occupancy", token=admin)[0] == 400
    paths = web.request("GET", "/api/v1/openapi.json")[2]["paths"]
    assert "/api/v1/channels" in paths and "/api/v1/channels/{channel}/occupancy" in paths


def closed_event(stack, client_id: str) -> dict:
    found = wait_until(lambda: events(stack, client=client_id), 10, what="connection.closed")
    assert len(found) == 1
    return found[0]


def test_connection_closed_carries_the_close_code(stack, hooked):
    web = hooked[0]
    # The client closes: its code.
    client, client_id = connect(web, stack, "dave")
    client.close()
    closed = closed_event(stack, client_id)
    assert closed["type"] == "connection.closed" and "channel" not in closed
    assert (closed["user"], closed["code"]) == ("dave", 1000)

    # The TCP connection just ends: 1006.
    client, client_id = connect(web, stack, "dave")
    client.sock.sock.shutdown(socket.SHUT_RDWR)
    client.sock.sock.close()
    assert closed_event(stack, client_id)["code"] == 1006

    # The server closes (a flood past HERALD_WS_RATE): its code and reason.
    client, client_id = connect(web, stack, "dave")
    for _ in range(200):
        client.send({"op": "ping"})
    assert close_code(client) == 4029
    client.close()  # the server's close is answered: its socket goes now, not after CLOSE_WAIT
    closed = closed_event(stack, client_id)
    assert closed["code"] == 4029 and closed["reason"].startswith("too many frames")


def test_a_leave_redis_refused_is_retried_and_its_close_event_goes_out_at_once(stack, hooked, admin, channel):
    web = hooked[0]
    client, client_id = connect(web, stack, "frank")
    client.subscribe(channel)
    store = stack.store()
    entry = subscription(channel, "frank", client_id)  # the web process's entry of this subscription
    node = next(key for key in map(store.keys.node_subscriptions, store.occupancy.nodes())
                if store.redis.hexists(key, entry))
    store.redis.rename(node, node + ":aside")
    store.redis.set(node, "not a hash")  # the process's leave script now fails (WRONGTYPE) before writing
    try:
        client.close()
        closed_event(stack, client_id)  # not held back by the failed leave
        assert occupancy(web, admin, channel)["subscribers"] == 1
    finally:
        store.redis.delete(node)
        store.redis.rename(node + ":aside", node)
    # The process tries the leave again (after 1 s): the channel is left and vacated, once.
    wait_until(lambda: occupancy(web, admin, channel)["subscribers"] == 0, 10, what="the retried leave")
    wait_until(lambda: len(kinds(stack, channel)) == 4, GRACE + 5, what="the leave and vacate")
    assert kinds(stack, channel) == [("channel.occupied", None), ("presence.join", "frank"),
                                     ("presence.leave", "frank"), ("channel.vacated", None)]
