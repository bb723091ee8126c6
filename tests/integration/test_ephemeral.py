"""Ephemeral messages on real processes (docs/protocol.md: "Ephemeral messages"): published over
HTTP and over the WebSocket straight to subscribers, by namespace or by the `ephemeral` flag, with
no Kafka record and no history; still
refused where the token may not publish, still rate-limited; and a flood of them leaves the
durable messages of other channels delivered, once each and in order."""

from __future__ import annotations

import contextlib
import threading
import uuid

import pytest

from tests.harness import close_code, topic_size

NAMESPACES = "typing,cursors"


@pytest.fixture(scope="module")
def eph(stack):
    """A web process of the shared stack whose `typing` and `cursors` namespaces are ephemeral; its
    WebSocket rate lets a client send a flood of a thousand frames in a second or two."""
    web = stack.web("web-ephemeral", HERALD_EPHEMERAL_NAMESPACES=NAMESPACES, HERALD_WS_RATE=1000)
    yield web
    web.proc.stop(10)


@pytest.fixture(scope="module")
def limited(stack):
    """One with small publish limits: 3 a minute per token over HTTP, 5 frames a second over the WebSocket."""
    web = stack.web("web-ephemeral-limited", HERALD_EPHEMERAL_NAMESPACES=NAMESPACES, HERALD_WS_RATE=5,
                    HERALD_RATE_LIMITS="publish.token=3/minute")
    yield web
    web.proc.stop(10)


def user() -> str:
    return f"eph-{uuid.uuid4().hex[:8]}"


def room() -> str:
    return f"typing:{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def socket_of(web, token):
    client = web.ws(token)
    try:
        assert client.recv()["op"] == "connected"
        yield client
    finally:
        client.close()


def is_message(channel):
    return lambda frame: frame.get("op") == "message" and frame.get("channel") == channel


def test_a_subscriber_gets_them_from_http_and_the_websocket_and_nothing_is_stored(stack, eph):
    channel, token = room(), stack.token(user())
    records = topic_size(stack)
    with socket_of(eph, token) as subscriber, socket_of(eph, token) as publisher:
        # `since` on an ephemeral channel: nothing to replay, and no gap to report.
        assert subscriber.subscribe(channel, since="0-0") == {
            "op": "subscribed", "channel": channel, "offset": None, "recovered": True, "replayed": 0}
        status, _, body = eph.request("POST", "/api/v1/messages", {"channel": channel, "data": {"on": 1}, "id": "h1"},
                                      token=token)
        assert (status, body) == (202, {"id": "h1", "channel": channel, "status": "sent"})
        frame = subscriber.expect(is_message(channel))
        assert frame["id"] == "h1" and frame["data"] == {"on": 1} and frame["ephemeral"] is True
        assert "offset" not in frame
        publisher.send({"op": "publish", "channel": channel, "data": {"on": 2}, "ref": 7})
        ack = publisher.expect(lambda f: f.get("op") == "ack")
        assert ack["status"] == "sent" and ack["ref"] == 7
        frame = subscriber.expect(is_message(channel))
        assert frame["data"] == {"on": 2} and frame["id"] == ack["id"] and "offset" not in frame
        # A batch sends an ephemeral item in its place; the durable one is accepted as ever.
        durable = f"test:{uuid.uuid4().hex[:12]}"
        status, _, body = eph.request("POST", "/api/v1/messages/batch", {"messages": [
            {"channel": channel, "data": 3}, {"channel": durable, "data": 4}]}, token=token)
        assert status == 202 and [r["status"] for r in body["results"]] == ["sent", "accepted"]
        assert subscriber.expect(is_message(channel))["data"] == 3
    # One record: the batch's durable message. None of the three ephemeral ones.
    assert topic_size(stack) == records + 1
    status, _, page = eph.request("GET", f"/api/v1/channels/{channel}/history", token=token)
    assert status == 200 and page["messages"] == []
    for msg_id in ("h1", ack["id"]):
        assert eph.request("GET", f"/api/v1/messages/{msg_id}", token=token)[0] == 404


def test_the_flag_makes_one_message_of_a_stored_channel_ephemeral(stack, eph):
    channel, token = f"test:{uuid.uuid4().hex[:12]}", stack.token(user())
    records = topic_size(stack)
    with socket_of(eph, token) as subscriber, socket_of(eph, token) as publisher:
        subscriber.subscribe(channel)
        for n, flagged in enumerate((False, True, False)):
            publisher.send({"op": "publish", "channel": channel, "data": n, "ephemeral": flagged, "ref": n})
            ack = publisher.expect(lambda f: f.get("op") == "ack")
            assert ack["status"] == ("sent" if flagged else "accepted")
            frame = subscriber.expect(is_message(channel))  # each before the next is sent: in this order
            assert frame["data"] == n and ("offset" in frame) is not flagged
    assert topic_size(stack) == records + 2
    status, _, page = eph.request("GET", f"/api/v1/channels/{channel}/history", token=token)
    assert [m["data"] for m in page["messages"]] == [0, 2]


def test_the_tokens_publish_globs_still_decide(stack, eph):
    channel, token = room(), stack.token(user(), publish=["chat:*"])
    status, _, body = eph.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}, token=token)
    assert status == 403, body
    with socket_of(eph, token) as client:
        client.send({"op": "publish", "channel": channel, "data": 1, "ref": "p"})
        assert client.expect(lambda f: f.get("ref") == "p")["code"] == "forbidden"
    # The bounds of a published message hold too.
    status, _, body = eph.request("POST", "/api/v1/messages", {"channel": channel, "data": "x" * 70_000},
                                  token=stack.token(user()))
    assert status == 413, body


def test_the_rate_limits_apply(stack, limited):
    channel, token = room(), stack.token(user())
    statuses = [limited.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token)[0]
                for n in range(5)]
    assert statuses == [202, 202, 202, 429, 429]
    client = limited.ws(stack.token(user()))
    try:
        for n in range(25):  # past the burst of twice HERALD_WS_RATE
            client.send({"op": "publish", "channel": channel, "data": n})
        assert close_code(client) == 4029
    finally:
        client.close()


def test_a_flood_leaves_other_channels_durable_messages_delivered_once_in_order(stack, eph):
    flood, token = room(), stack.token(user())
    channels = [f"test:{uuid.uuid4().hex[:12]}" for _ in range(2)]
    count, durable = 1000, 40
    with socket_of(eph, token) as flooder, socket_of(eph, token) as watcher, socket_of(eph, token) as reader:
        watcher.subscribe(flood)
        for channel in channels:
            reader.subscribe(channel)
        errors: list[BaseException] = []
        got: list[int] = []

        def publish_durable():
            try:
                for n in range(durable):
                    status, _, body = eph.request("POST", "/api/v1/messages",
                                                  {"channel": channels[n % 2], "data": n}, token=token)
                    assert status == 202, body
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        def watch():
            # The flood's subscriber keeps up, as one must (its send queue is bounded).
            try:
                while len(got) < count:
                    got.append(watcher.expect(is_message(flood), timeout=30)["data"])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish_durable), threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        try:
            # One client's flood, in runs of 40 whose acks it reads: its frames waiting for their
            # op (at most 64) and its send queue are bounded too.
            for start in range(0, count, 40):
                for n in range(start, start + 40):
                    flooder.send({"op": "publish", "channel": flood, "data": n})
                for _ in range(40):
                    assert flooder.expect(lambda f: f.get("op") in ("ack", "error"))["op"] == "ack"
        finally:
            for thread in threads:
                thread.join(60)
        assert not errors, errors
        seen: dict[str, list[int]] = {channel: [] for channel in channels}
        while sum(map(len, seen.values())) < durable:
            frame = reader.expect(lambda f: f.get("op") == "message")
            seen[frame["channel"]].append(frame["data"])
        assert reader.drain(0.5) == []  # none twice
    assert seen == {channel: list(range(i, durable, 2)) for i, channel in enumerate(channels)}
    # A subscriber that keeps up gets each ephemeral message once, in the order sent.
    assert got == list(range(count))
