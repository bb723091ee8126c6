"""The Python client (herald_client, client/) against real web processes: closes, reconnects, resume, tokens."""

from __future__ import annotations

import threading
import time

import pytest
from herald_client import HeraldClient, HeraldError, RequestError, ServerClosed

from tests.harness import wait_until
from web.auth import LEEWAY_SECONDS


def _url(web) -> str:
    return f"ws://127.0.0.1:{web.port}/ws"


def _publish(web, token, channel, n) -> str:
    status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": n}}, token=token)
    assert status == 202, body
    return body["id"]


class Reader:
    """Iterates a client's frames() in a thread, keeping message ids and what ended it."""

    def __init__(self, client: HeraldClient, until: int):
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(client, until), daemon=True)
        self.thread.start()

    def _run(self, client, until):
        try:
            for frame in client.frames(timeout=60):
                if frame["op"] == "message":
                    self.ids.append(frame["id"])
                    if len(self.ids) == until:
                        return
        except BaseException as exc:  # handed to the test, which asserts on it
            self.error = exc


def test_client_resumes_across_a_web_restart_with_every_message_once_in_order(stack, token, channel):
    # A web process of its own, to restart: SIGTERM closes its WebSockets with 1001.
    own, publisher = stack.web("client-web"), stack.webs[0]
    try:
        with HeraldClient(_url(own), token, max_backoff=0.5) as herald:
            herald.subscribe(channel)
            first_connection = herald.client_id
            reader = Reader(herald, until=15)
            sent = [_publish(publisher, token, channel, n) for n in range(5)]
            wait_until(lambda: len(reader.ids) == 5 or reader.error, 30, what="the first five messages")
            own.proc.stop()
            sent += [_publish(publisher, token, channel, n) for n in range(5, 10)]  # while it is down
            own.restart()
            sent += [_publish(publisher, token, channel, n) for n in range(10, 15)]
            reader.thread.join(60)
            assert reader.error is None, repr(reader.error)
            assert reader.ids == sent
            assert herald.client_id != first_connection
    finally:
        own.proc.stop()


def test_an_expired_token_is_refreshed_through_the_callback_and_without_one_raises(stack, channel):
    publisher = stack.webs[0]
    token = stack.token()
    fresh: list[str] = []

    def refresh() -> str:
        fresh.append(stack.token("refreshed"))
        return fresh[-1]

    with HeraldClient(_url(publisher), stack.token("short", ttl=1), refresh_token=refresh, max_backoff=0.5) as kept, \
            HeraldClient(_url(publisher), stack.token("short", ttl=1), max_backoff=0.5) as dropped:
        kept.subscribe(channel)
        dropped.subscribe(channel)
        before = _publish(publisher, token, channel, 1)
        # The hub closes each with 4001 once the token is past its expiry and the leeway.
        time.sleep(1 + LEEWAY_SECONDS + 1)
        after = _publish(publisher, token, channel, 2)

        frames = dropped.frames(timeout=20)
        assert next(f for f in frames if f["op"] == "message")["id"] == before
        with pytest.raises(ServerClosed) as closed:
            next(frames)
        assert closed.value.code == 4001 and isinstance(closed.value, HeraldError)

        reader = Reader(kept, until=2)
        reader.thread.join(30)
        assert reader.error is None, repr(reader.error)
        assert reader.ids == [before, after]
        assert len(fresh) == 1 and kept.token == fresh[0]


def test_a_refused_token_raises_server_closed_4001(web):
    client = HeraldClient(_url(web), "not-a-token")
    try:
        with pytest.raises(ServerClosed) as closed:
            client.connect()
        assert closed.value.code == 4001
    finally:
        client.close()


def test_a_close_4003_ends_frames_with_server_closed(stack, web):
    with HeraldClient(_url(web), stack.token(subscribe=["chat:*"]), max_backoff=0.5) as herald:
        for _ in range(5):  # the hub's MAX_BAD_FRAMES forbidden frames in a row
            with pytest.raises(RequestError, match="forbidden"):
                herald.subscribe("news:x")
        with pytest.raises(ServerClosed) as closed:
            next(herald.frames(timeout=10))
        assert closed.value.code == 4003


def test_a_channel_that_sent_nothing_yet_resumes_from_its_subscribe(stack, web, token, channel):
    with HeraldClient(_url(web), token, max_backoff=0.5) as herald:
        herald.subscribe(channel)
        herald._sock.sock.close()  # the network drops before any message arrived
        sent = _publish(web, token, channel, 1)
        wait_until(lambda: stack.store().last_ids([channel])[0], 20, what="the message to be in history")
        assert next(f for f in herald.frames(timeout=10) if f["op"] == "message")["id"] == sent
