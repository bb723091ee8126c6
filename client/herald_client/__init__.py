"""herald_client: a small Python client for Herald's WebSocket protocol.

It installs alone (`pip install ./client`), with websocket-client only:
scripts and apps that subscribe need none of the server's dependencies.

    with HeraldClient("ws://localhost:8000/ws", token) as herald:
        herald.subscribe("chat:lobby")
        herald.publish("chat:lobby", {"text": "hi"})
        for frame in herald.frames():
            print(frame)

It reconnects with capped exponential backoff and resumes every channel
from the last offset it saw, so a dropped connection, or a close docs/protocol.md
says to retry (1001 on a deploy, 1013, 4008, ...), loses no message. Only
4001 (token refused), 4003 (forbidden) and 4010 (disconnected by the server
API) end it, with `ServerClosed`;
given `refresh_token`, a 4001 fetches a fresh token and goes on. The
channels a token lists (`channels`) resume too: the `connect` frame carries
the last offset seen on each. A subscription the server API made lasts as
long as the socket; one it ended is not resubscribed.

`herald_client.server.HeraldServer` calls the server API (docs/server-api.md).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable

import websocket

CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_DISCONNECTED = 4010  # the backend disconnected this user (docs/server-api.md): not undone by a reconnect


class HeraldError(Exception):
    """Base of every error this client raises."""


class RequestError(HeraldError):
    """The server answered a request with an `error` frame (its `code` kept), or not in time."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class ServerClosed(HeraldError):
    """The server closed the connection with `code` (docs/protocol.md: "WebSocket close codes and errors")."""

    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(f"closed by the server: {code} {reason}".rstrip())
        self.code, self.reason = code, reason


class HeraldClient:
    """A blocking client: one connection, replies matched by `ref`.

    `refresh_token`, a function returning a token, is called when there is
    none yet and when the server refuses the one in use (4001, e.g. expired).
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0, max_backoff: float = 10.0,
                 refresh_token: Callable[[], str] | None = None):
        self.url, self.token, self.timeout, self.max_backoff = url, token, timeout, max_backoff
        self.refresh_token = refresh_token
        self.channels: dict[str, dict] = {}  # channel -> subscribe options, with the last offset seen
        self.token_channels: dict[str, str] = {}  # the token's channels -> the last offset seen
        self.client_id: str | None = None
        self._refs = itertools.count(1)
        self._pending: list[dict] = []
        self._sock = None

    def __enter__(self) -> HeraldClient:
        self.connect()
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def connect(self) -> None:
        """Open the socket, authenticate, and (re)subscribe with resume; `ServerClosed` if refused."""
        if self.token is None and self.refresh_token is not None:
            self.token = self.refresh_token()
        self.close()
        self._sock = websocket.create_connection(self.url, timeout=self.timeout)
        connect: dict = {"op": "connect", "token": self.token or ""}
        if self.token_channels:
            connect["since"] = self.token_channels
        self._sock.send(json.dumps(connect))
        connected = self._receive(self.timeout)
        if connected.get("op") != "connected":
            raise RequestError(f"not connected: {connected}")
        self.client_id = connected["client"]
        for channel, options in self.channels.items():
            self._subscribe(channel, options)

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            self._sock.close(timeout=1)
            # close() returns at once, leaving the socket open, when the
            # library already counts the connection as closed.
            self._sock.shutdown()
            self._sock = None

    def subscribe(self, channel: str, *, status: bool = False, presence: bool = False,
                  since: str | None = None) -> dict:
        """Subscribe (resuming after `since` when given); returns the `subscribed` frame."""
        options = {"status": status, "presence": presence}
        if since:
            options["since"] = since
        reply = self._subscribe(channel, options)
        # A channel that has sent nothing yet resumes from where the server
        # says it stands (its newest message; none yet: from the start), or a
        # reconnect would skip what was published while we were away.
        options.setdefault("since", reply.get("offset") or "0-0")
        # Only once the server took it: a refused channel is not resubscribed on every reconnect.
        self.channels[channel] = options
        return reply

    def _subscribe(self, channel: str, options: dict) -> dict:
        # `unavailable` means the server could not read the channel's history
        # just now (Redis busy or reconnecting): ask again, after a pause.
        for attempt in itertools.count():
            try:
                return self._request({"op": "subscribe", "channel": channel, **options})
            except RequestError as exc:
                if exc.code != "unavailable" or attempt >= 5:
                    raise
            time.sleep(min(self.max_backoff, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2))

    def unsubscribe(self, channel: str) -> dict:
        """Stop receiving a channel."""
        self.channels.pop(channel, None)
        return self._request({"op": "unsubscribe", "channel": channel})

    def publish(self, channel: str, data, *, type: str | None = None, id: str | None = None) -> dict:
        """Publish through Kafka; returns the `ack` once Kafka has the message (`status: "sent"` on an
        ephemeral channel, once it went to the subscribers: docs/protocol.md, "Ephemeral messages")."""
        frame = {"op": "publish", "channel": channel, "data": data}
        if type:
            frame["type"] = type
        if id:
            frame["id"] = id
        return self._request(frame)

    def frames(self, timeout: float | None = None):
        """Yield incoming frames forever (or until `timeout` passes without one), reconnecting as needed.

        Raises `ServerClosed` on a close that reconnecting cannot fix (4001
        without `refresh_token`, or with a fresh token refused too; 4003).
        """
        while True:
            if self._pending:
                yield self._pending.pop(0)
                continue
            try:
                frame = self._receive(timeout)
            except websocket.WebSocketTimeoutException:
                return
            except ServerClosed as closed:
                self._reconnect(closed)
                continue
            except (OSError, websocket.WebSocketException):
                self._reconnect()
                continue
            yield frame

    def _receive(self, timeout: float | None) -> dict:
        self._sock.settimeout(timeout)
        # recv() would answer a close frame with "" and lose its code.
        opcode, data = self._sock.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            raise ServerClosed(code, data[2:].decode("utf-8", "replace"))
        frame = json.loads(data)
        op, channel = frame.get("op"), frame.get("channel")
        if op == "message" and "offset" in frame:  # an ephemeral message has none: it moves no resume point
            if channel in self.channels:
                self.channels[channel]["since"] = frame["offset"]
            elif channel in self.token_channels:
                self.token_channels[channel] = frame["offset"]
        elif op == "subscribed" and frame.get("by") == "token":
            # Resumed from where we were, or (first time, no message yet) from where the server stands.
            self.token_channels.setdefault(channel, frame.get("offset") or "0-0")
        elif op == "unsubscribed" and frame.get("by") == "server":
            self.channels.pop(channel, None)
        return frame

    def _request(self, frame: dict) -> dict:
        ref = str(next(self._refs))
        self._sock.send(json.dumps({**frame, "ref": ref}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = self._receive(self.timeout)
            if reply.get("ref") == ref:
                if reply["op"] == "error":
                    raise RequestError(f"{reply['code']}: {reply['message']}", reply["code"])
                return reply
            self._pending.append(reply)
        raise RequestError(f"no reply to {frame['op']} within {self.timeout:g}s")

    def _reconnect(self, closed: ServerClosed | None = None) -> None:
        refreshed = False
        for attempt in itertools.count():
            if closed is not None and closed.code in (CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN, CLOSE_DISCONNECTED):
                # A fresh token refused at once will be refused again: stop there.
                if closed.code != CLOSE_UNAUTHORIZED or self.refresh_token is None or refreshed:
                    self.close()
                    raise closed
                self.token, refreshed = self.refresh_token(), True
            elif attempt:
                time.sleep(min(self.max_backoff, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
            try:
                self.connect()
                return
            except ServerClosed as exc:
                closed = exc
            except (OSError, websocket.WebSocketException):
                closed = None
