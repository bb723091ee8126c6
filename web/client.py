"""A small Python client for Herald's WebSocket protocol, for scripts and tests.

    with HeraldClient("ws://localhost:8000/ws", token) as herald:
        herald.subscribe("chat:lobby")
        herald.publish("chat:lobby", {"text": "hi"})
        for frame in herald.frames():
            print(frame)

It reconnects with capped exponential backoff and resumes every channel
from the last offset it saw, so a dropped connection loses no message.
"""

from __future__ import annotations

import itertools
import json
import random
import time

import websocket


class HeraldError(Exception):
    """The server answered a request with an `error` frame (its `code` kept)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class HeraldClient:
    """A blocking client: one connection, replies matched by `ref`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0, max_backoff: float = 10.0):
        self.url, self.token, self.timeout, self.max_backoff = url, token, timeout, max_backoff
        self.channels: dict[str, dict] = {}  # channel -> subscribe options, with the last offset seen
        self.client_id: str | None = None
        self._refs = itertools.count(1)
        self._pending: list[dict] = []
        self._sock = None

    def __enter__(self) -> "HeraldClient":
        self.connect()
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def connect(self) -> None:
        """Open the socket, authenticate, and (re)subscribe with resume."""
        self._sock = websocket.create_connection(self.url, timeout=self.timeout)
        self._sock.send(json.dumps({"op": "connect", "token": self.token or ""}))
        connected = json.loads(self._sock.recv())
        if connected.get("op") != "connected":
            raise HeraldError(f"not connected: {connected}")
        self.client_id = connected["client"]
        for channel, options in self.channels.items():
            self._subscribe(channel, options)

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def subscribe(self, channel: str, *, status: bool = False, presence: bool = False,
                  since: str | None = None) -> dict:
        """Subscribe (resuming after `since` when given); returns the `subscribed` frame."""
        options = {"status": status, "presence": presence}
        if since:
            options["since"] = since
        reply = self._subscribe(channel, options)
        # Only once the server took it: a refused channel is not resubscribed on every reconnect.
        self.channels[channel] = options
        return reply

    def _subscribe(self, channel: str, options: dict) -> dict:
        # `unavailable` means the server could not read the channel's history
        # just now (Redis busy or reconnecting): ask again, after a pause.
        for attempt in itertools.count():
            try:
                return self._request({"op": "subscribe", "channel": channel, **options})
            except HeraldError as exc:
                if exc.code != "unavailable" or attempt >= 5:
                    raise
            time.sleep(min(self.max_backoff, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2))

    def unsubscribe(self, channel: str) -> dict:
        """Stop receiving a channel."""
        self.channels.pop(channel, None)
        return self._request({"op": "unsubscribe", "channel": channel})

    def publish(self, channel: str, data, *, type: str | None = None, id: str | None = None) -> dict:
        """Publish through Kafka; returns the `ack` once Kafka has the message."""
        frame = {"op": "publish", "channel": channel, "data": data}
        if type:
            frame["type"] = type
        if id:
            frame["id"] = id
        return self._request(frame)

    def frames(self, timeout: float | None = None):
        """Yield incoming frames forever (or until `timeout` passes without one), reconnecting as needed."""
        while True:
            if self._pending:
                yield self._pending.pop(0)
                continue
            try:
                frame = self._receive(timeout)
            except websocket.WebSocketTimeoutException:
                return
            except (OSError, websocket.WebSocketException):
                self._reconnect()
                continue
            yield frame

    def _receive(self, timeout: float | None) -> dict:
        self._sock.settimeout(timeout)
        frame = json.loads(self._sock.recv())
        if frame.get("op") == "message" and frame.get("channel") in self.channels:
            self.channels[frame["channel"]]["since"] = frame["offset"]
        return frame

    def _request(self, frame: dict) -> dict:
        ref = str(next(self._refs))
        self._sock.send(json.dumps({**frame, "ref": ref}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = self._receive(self.timeout)
            if reply.get("ref") == ref:
                if reply["op"] == "error":
                    raise HeraldError(f"{reply['code']}: {reply['message']}", reply["code"])
                return reply
            self._pending.append(reply)
        raise HeraldError(f"no reply to {frame['op']} within {self.timeout:g}s")

    def _reconnect(self) -> None:
        self.close()
        for attempt in itertools.count():
            try:
                self.connect()
                return
            except (OSError, websocket.WebSocketException):
                time.sleep(min(self.max_backoff, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2))
