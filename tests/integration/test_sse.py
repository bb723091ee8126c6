"""Server-Sent Events (`GET /sse`) against real web processes: order, exact resume across a
cut connection, the request's bounds, and a slow reader costing only itself."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid

import pytest


class Sse:
    """A Server-Sent Events reader, as a browser's EventSource reads (one connection)."""

    def __init__(self, web, channels, *, token=None, query_token=None, last_id=None, query_last_id=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=15)
        self.conn.connect()
        self.sock = self.conn.sock  # kept: the connection hands it to the response
        query = "&".join(f"channel={channel}" for channel in channels)
        if query_token:
            query += f"&token={query_token}"
        if query_last_id:
            query += f"&last_event_id={query_last_id}"
        headers = {"Accept": "text/event-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        self.conn.request("GET", "/sse?" + query, headers=headers)
        self.response = self.conn.getresponse()
        self.last_id: str | None = None
        self.retry: str | None = None
        self.comments: list[str] = []

    def _line(self) -> str:
        raw = self.response.readline()
        if not raw:
            raise EOFError("the stream ended")
        return raw.decode().rstrip("\r\n")

    def next(self, timeout: float = 15.0) -> dict:
        """The next event: its fields, `data` parsed (EOFError once the stream ends; after a
        timeout the reader is spent: close it)."""
        self.sock.settimeout(timeout)
        fields: dict = {}
        while True:
            line = self._line()
            if not line:
                if "data" in fields:
                    if "id" in fields:
                        self.last_id = fields["id"]
                    return fields
                fields = {}
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "retry":
                self.retry = value
            else:
                fields[name] = json.loads(value) if name == "data" else value

    def comment(self, timeout: float = 15.0) -> str:
        """Read lines until a comment line; returns it."""
        self.sock.settimeout(timeout)
        while not (line := self._line()).startswith(":"):
            pass
        return line

    def expect(self, event: str, timeout: float = 15.0) -> dict:
        """Read events until one named `event`; returns its data."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.next(max(0.1, deadline - time.monotonic()))
            if fields.get("event") == event:
                return fields["data"]

    def close(self) -> None:
        """Cut the connection."""
        self.response.close()
        self.conn.close()


def _channels(count: int) -> list[str]:
    base = uuid.uuid4().hex[:8]
    return [f"sse:{base}:{n}" for n in range(count)]


def _publish(web, token, channel: str, n: int) -> str:
    status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}}, token=token)
    assert status == 202, body
    return body["id"]


def test_three_channels_in_order_then_an_exact_resume_after_a_cut(stack, token):
    first_web, second_web = stack.webs
    channels = _channels(3)
    reader = Sse(first_web, channels, token=token)
    assert reader.response.status == 200
    assert reader.response.getheader("Content-Type").startswith("text/event-stream")
    assert reader.response.getheader("Cache-Control") == "no-cache"
    assert reader.response.getheader("X-Accel-Buffering") == "no"
    assert reader.expect("connected")["user"] == "tester"
    for _ in channels:
        assert reader.expect("subscribed")["recovered"] is True
    assert reader.retry is not None

    sent: dict[str, list[str]] = {channel: [] for channel in channels}
    seen: list[tuple[str, str]] = []  # (channel, message id), in arrival order

    def publish(start: int, count: int) -> None:
        for n in range(start, start + count):
            channel = channels[n % 3]
            sent[channel].append(_publish(first_web, token, channel, n))

    subscribed: list[dict] = []

    def read(client, count: int) -> None:
        # A resume's replay of a channel comes right after its `subscribed`, before the next one's.
        while count:
            fields = client.next()
            if fields["event"] == "message":
                seen.append((fields["data"]["channel"], fields["data"]["id"]))
                count -= 1
            elif fields["event"] == "subscribed":
                subscribed.append(fields["data"])

    try:
        publish(0, 30)
        read(reader, 15)  # then cut: what it was sent and did not read is resent
        last_id = reader.last_id
    finally:
        reader.close()
    assert last_id is not None
    publish(30, 30)
    # The reconnect goes to the other web process, with the token on the URL (as an EventSource must).
    resumed = Sse(second_web, channels, query_token=token, last_id=last_id)
    try:
        assert resumed.response.status == 200
        publish(60, 30)
        read(resumed, 75)
        assert sorted(frame["channel"] for frame in subscribed) == channels
        assert all(frame["recovered"] for frame in subscribed)
        extra = []
        try:
            while True:  # nothing more may come: a duplicate would show here
                extra.append(resumed.expect("message", timeout=2))
        except TimeoutError:
            pass
        seen.extend((frame["channel"], frame["id"]) for frame in extra)
    finally:
        resumed.close()

    expected = {message_id for ids in sent.values() for message_id in ids}
    ids = [message_id for _, message_id in seen]
    lost = len(expected - set(ids))
    duplicated = len(ids) - len(set(ids))
    reordered = 0
    for channel in channels:
        order = {message_id: n for n, message_id in enumerate(sent[channel])}
        got = [order[message_id] for ch, message_id in seen if ch == channel]
        reordered += sum(1 for a, b in zip(got, got[1:]) if b < a)
    print(f"\nFAULT-FIGURES lost={lost} duplicated={duplicated} reordered={reordered}")
    assert (lost, duplicated, reordered) == (0, 0, 0)


def test_a_new_stream_resumes_from_an_id_on_its_url(stack, token):
    web = stack.webs[1]
    channels = _channels(2)
    first = Sse(web, channels, token=token)
    try:
        ids = [_publish(web, token, channels[n % 2], n) for n in range(4)]
        assert [first.expect("message")["id"] for _ in ids] == ids
        last_id = first.last_id
    finally:
        first.close()
    missed = [_publish(web, token, channels[n % 2], n) for n in range(4, 8)]
    # A fresh token, as after a refresh; the id travels on the URL.
    second = Sse(web, channels, token=stack.token(), query_last_id=last_id)
    try:
        assert sorted(second.expect("message")["id"] for _ in missed) == sorted(missed)
    finally:
        second.close()


def test_bounds_are_problems_and_cost_only_their_own_request(stack, token):
    web = stack.webs[0]
    channels = _channels(1)
    good = Sse(web, channels, token=token)
    try:
        good.expect("subscribed")

        def answer(query: str, **kwargs):
            status, headers, body = web.request("GET", "/sse?" + query, **kwargs)
            assert headers["Content-Type"] == "application/problem+json", body
            return status, body

        # Channels: the WebSocket's cap (HERALD_WS_MAX_SUBSCRIPTIONS, 100 here), a name's form, none.
        many = "&".join(f"channel=c{n}" for n in range(101))
        assert answer(many, token=token)[0] == 400
        assert answer("channel=a%20b", token=token)[0] == 400
        assert answer("", token=token)[0] == 400
        # Last-Event-ID: its form, its size (under gunicorn's own limit on a header, so Herald answers).
        for bad in ["garbage", "a~1-0!a~2-0", f"{channels[0]}~x", "a~1-0!" * 1340]:
            status, body = answer(f"channel={channels[0]}", token=token, headers={"Last-Event-ID": bad})
            assert status == 400 and "Last-Event-ID" in body["detail"], (bad[:40], body)
        # The token: missing, bad, on the URL or in the header.
        assert answer(f"channel={channels[0]}")[0] == 401
        assert answer(f"channel={channels[0]}&token=garbage")[0] == 401
        assert answer(f"channel={channels[0]}", token="garbage")[0] == 401
        # A channel the token may not read.
        narrow = stack.token(subscribe=["room:*"])
        status, body = answer(f"channel=room:1&channel={channels[0]}", token=narrow)
        assert status == 403 and channels[0] in body["detail"]

        # The stream that asked nothing wrong still gets its messages, once, in order.
        ids = [_publish(web, token, channels[0], n) for n in range(5)]
        assert [good.expect("message")["id"] for _ in ids] == ids
    finally:
        good.close()


@pytest.fixture(scope="module")
def small_queues(stack):
    """A web process on the shared stack whose send queues are short and heartbeats frequent."""
    web = stack.web("web-sse", HERALD_SEND_QUEUE=64, HERALD_PING_INTERVAL=2)
    yield web
    web.proc.stop(10)


def test_heartbeats_keep_an_idle_stream_open(small_queues, token):
    reader = Sse(small_queues, _channels(1), token=token)
    try:
        reader.expect("subscribed")
        # HERALD_PING_INTERVAL=2 here: a generous bound for two.
        assert [reader.comment(timeout=30), reader.comment(timeout=30)] == [": ping", ": ping"]
    finally:
        reader.close()


def test_a_reader_that_takes_nothing_is_cut_and_a_websocket_on_its_channel_is_not_held_up(small_queues, token):
    web = small_queues
    channel = _channels(1)[0]
    # A tiny receive buffer, and then it reads nothing.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    slow.connect(("127.0.0.1", web.port))
    ws = web.ws(token)
    try:
        slow.sendall(f"GET /sse?channel={channel}&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        ws.recv()
        ws.subscribe(channel)
        big = "y" * 4000
        received: list[int] = []

        def drain():
            for _ in range(200):
                received.append(ws.expect(lambda f: f["op"] == "message", timeout=60)["data"]["n"])

        reader = threading.Thread(target=drain)
        reader.start()
        for n in range(200):
            status, _, _ = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n, "pad": big}},
                                       token=token)
            assert status == 202
        reader.join(90)
        assert received == list(range(200))
        # The slow stream was cut: reading it now ends (what the kernel held, then EOF or a reset).
        slow.settimeout(30)
        try:
            while slow.recv(65536):
                pass
        except ConnectionResetError:
            pass
        log = web.proc.log()
        assert "send queue overflow" in log or "sse heartbeat not taken" in log
    finally:
        ws.close()
        slow.close()
