"""Server-Sent Events: `GET /sse?channel=...`, the hub's frames as a `text/event-stream`
(docs/protocol.md: "Server-Sent Events").

An event stream is one of the hub's clients: its channels are subscribed
through the protocol's own `subscribe` (the same checks, replay and live
seam as a WebSocket's), and the router writes to it what it writes to every
client. `EventStream` stands in for the WebSocket: it turns each frame into
an event and queues it within the WebSocket's send-queue bounds; the
request's greenlet writes the queue out (unlike a WebSocket, a stream holds
a greenlet). Each `message` event's id lists the offset of every channel of
the stream, so a browser's reconnect (`Last-Event-ID`) resumes each channel
exactly after it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator

import gevent
import redis
from flask import Response, request
from gevent.event import Event

from pipeline.core.errors import Forbidden, InvalidRequest, Refused
from pipeline.core.messages import CHANNEL_RE, loads, new_id, valid_channel
from pipeline.core.streamids import valid as valid_stream_id
from web.auth import bearer, verify
from web.authorize import SUBSCRIBE, AuthorizeUnavailable
from web.hub.protocol import CLOSE_POLICY, CLOSE_TOO_SLOW, CLOSE_UNAUTHORIZED, Client
from web.hub.transport import CLOSE_WAIT, SEND_BUFFER_BYTES, text_payloads
from web.problems import error_problem, problem
from web.ratelimit import address_group
from web.revocations import REVOKED_REASON

log = logging.getLogger("herald.hub")

RETRY_MS = 3000  # the reconnect delay a browser is told (`retry:`)
HEARTBEAT = b": ping\n\n"
# An id is `channel~offset!channel~offset...`: neither `~` nor `!` is in a channel name or an
# offset, and both are URL-safe. Bounded under gunicorn's limit on one header (8190 bytes),
# so that the browser's Last-Event-ID is always read.
PAIR, ENTRY = "~", "!"
MAX_EVENT_ID = 8000
NO_OFFSET = "0-0"  # the position in a channel that had no message yet: before every offset
_LONGEST_OFFSET = len("18446744073709551615-18446744073709551615")
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back


def encode_id(positions: dict[str, str]) -> str:
    """The event id of each channel's offset."""
    return ENTRY.join(f"{channel}{PAIR}{offset}" for channel, offset in positions.items())


def decode_id(value: str, max_channels: int) -> dict[str, str]:
    """The offsets an event id holds, by channel; InvalidRequest when it is not one."""
    if len(value) > MAX_EVENT_ID:
        raise InvalidRequest(f"Last-Event-ID is longer than {MAX_EVENT_ID} characters")
    positions: dict[str, str] = {}
    for entry in value.split(ENTRY) if value else ():
        channel, _, offset = entry.partition(PAIR)
        if not valid_channel(channel) or not valid_stream_id(offset) or channel in positions:
            raise InvalidRequest("Last-Event-ID must be the id of an event of this stream")
        positions[channel] = offset
    if len(positions) > max_channels:
        raise InvalidRequest(f"Last-Event-ID names more than {max_channels} channels")
    return positions


def requested_channels(values: list[str], max_channels: int) -> tuple[str, ...]:
    """The query's `channel`s, each once; InvalidRequest past the bounds (the id of them all
    must fit in MAX_EVENT_ID)."""
    channels = tuple(dict.fromkeys(values))
    if not channels:
        raise InvalidRequest("name at least one channel: ?channel=...")
    if len(channels) > max_channels:
        raise InvalidRequest(f"at most {max_channels} channels per stream (HERALD_WS_MAX_SUBSCRIPTIONS)")
    for channel in channels:
        if not valid_channel(channel):
            raise InvalidRequest(f"channel must match {CHANNEL_RE.pattern}")
    if sum(len(channel) + len(PAIR) + _LONGEST_OFFSET + len(ENTRY) for channel in channels) > MAX_EVENT_ID:
        raise InvalidRequest(f"these channels' offsets would not fit in an event id of {MAX_EVENT_ID} characters")
    return channels


class EventStream:
    """An event stream as the hub's protocol sees a socket.

    `push` takes WebSocket frames (what the router writes for every client)
    and queues their events, at most HERALD_SEND_QUEUE writes and
    HERALD_SEND_QUEUE_BYTES bytes not yet written; past either the reader is
    too slow: `on_overflow` is called and the stream is cut (what is queued is
    dropped; the reconnect resumes). `events` is the response body: the
    request's greenlet writes the queue out until the stream is closed.
    """

    def __init__(self, settings, channels: tuple[str, ...], positions: dict[str, str], sock):
        self.channels = frozenset(channels)  # those the id tracks: the stream's own
        self.positions = positions           # the offset of each as far as sent
        self._sock = sock                    # the connection, cut when the stream must end now
        if sock is not None:
            try:  # as a WebSocket's: bounded memory, and a stalled reader shows in its queue soon
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            except OSError:
                pass
        self._limit, self._max_bytes = settings.send_queue_size, settings.send_queue_bytes
        self._queue: list[bytes] = []
        self.queued = 0
        self._wake = Event()
        self._drained = Event()
        self._drained.set()
        self._pinged = False  # a heartbeat is queued and not yet written
        self.closing = self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.on_overflow: Callable[[], None] | None = None
        self.on_closed: Callable[[], None] | None = None

    # -- what the hub writes ----------------------------------------------------
    def push(self, data: bytes) -> None:
        """Queue the events of `data`'s frames."""
        if self.closing:
            return
        try:
            chunk = b"".join(self._event(payload) for payload in text_payloads(data))
        except Exception:  # a frame it cannot read costs this stream only: it resumes after a reconnect
            log.exception("sse skipped a frame it could not read")
            self.close(CLOSE_POLICY, "unreadable frame")
            self._cut()
            return
        self._queue_chunk(chunk)

    def _event(self, payload: bytes) -> bytes:
        frame = loads(payload)
        name = frame.get("op", "message")
        channel = frame.get("channel")
        head = f"event: {name}\n"
        # An ephemeral message has no offset to resume from: its event leaves the id as it was.
        if channel in self.channels and name in ("message", "subscribed") and not frame.get("ephemeral"):
            if name == "message":
                self.positions[channel] = frame["offset"]
            elif not frame.get("replayed"):
                # Nothing replayed: live from `offset` (with a `since`, the position stays
                # there until the replayed messages pass it).
                self.positions[channel] = frame.get("offset") or NO_OFFSET
            head += f"id: {encode_id(self.positions)}\n"
        # A frame is compact JSON: one line.
        return head.encode() + b"data: " + payload + b"\n\n"

    def ping(self) -> bool:
        """Queue a heartbeat; False (and the stream cut) when the last is still not written."""
        if self.closing:
            return True
        if self._pinged:
            log.info("sse heartbeat not taken")
            self.close(CLOSE_POLICY, "heartbeat not taken")
            self._cut()
            return False
        self._pinged = True
        self._queue_chunk(HEARTBEAT)
        return True

    def _queue_chunk(self, chunk: bytes) -> None:
        if not chunk:
            return
        if len(self._queue) >= self._limit or self.queued + len(chunk) > self._max_bytes:
            self._queue.clear()
            self.queued = 0
            if self.on_overflow is not None:
                self.on_overflow()
            self.close(CLOSE_TOO_SLOW, "too slow")
            self._cut()
            return
        self._queue.append(chunk)
        self.queued += len(chunk)
        self._drained.clear()
        self._wake.set()

    def wait_drained(self, timeout: float) -> bool:
        """Block this greenlet until everything queued is written; False on timeout or when closing."""
        return bool(self._drained.wait(timeout)) and not self.closing

    def close(self, code: int, reason: str) -> None:
        """End the stream once what is queued is written (within CLOSE_WAIT, else it is cut)."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        self._drained.set()  # a waiting replay gives up
        self._wake.set()
        gevent.spawn_later(CLOSE_WAIT, self._cut)

    def _cut(self) -> None:
        # The writer may be blocked on a reader that takes nothing: its write fails now.
        if self.closed or self._sock is None:
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the response -----------------------------------------------------------
    def events(self) -> Iterator[bytes]:
        """The response body: the reconnect delay, then what is queued, as it comes."""
        yield f"retry: {RETRY_MS}\n\n".encode()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._queue:
                chunk = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                self._queue.clear()
                self.queued = 0
                heartbeat = self._pinged  # queued, so in this chunk
                yield chunk
                if heartbeat:
                    self._pinged = False
                if not self._queue:
                    self._drained.set()
            if self.closing and not self._queue:
                return

    def finish(self) -> None:
        """Called once the response is closed (written whole, or its connection lost)."""
        if self.closed:
            return
        self.closed = self.closing = True
        self._queue.clear()
        self.queued = 0
        self._drained.set()
        self._wake.set()
        if self.on_closed is not None:
            self.on_closed()


def open_stream(hub) -> Response:
    """`GET /sse`: check the token, the channels and the Last-Event-ID, then stream."""
    settings = hub.settings
    if not hub.running:
        return problem(503, "The server is stopping; reconnect", headers={"Retry-After": "1"})
    remote = address_group(request.remote_addr or "")
    try:
        identity = verify(bearer(request.headers.get("Authorization")) or request.args.get("token"), settings)
        hub.revocations.check(identity)
        channels = requested_channels(request.args.getlist("channel"), settings.ws_max_subscriptions)
        # `last_event_id` on the URL: for a new EventSource (a fresh token), which cannot set the header.
        last_id = request.headers.get("Last-Event-ID", request.args.get("last_event_id", ""))
        resume = decode_id(last_id, settings.ws_max_subscriptions)
        for channel in channels:
            if not hub.services.permissions.allows(identity, SUBSCRIBE, channel):
                raise Forbidden(f"this token may not subscribe to {channel}")
        client_id = new_id()
        over = hub.protocol.claim(client_id, identity.user, remote)
    except (Refused, AuthorizeUnavailable, redis.RedisError) as exc:
        if not isinstance(exc, Refused):
            log.warning("sse refused: unavailable", extra={"error": str(exc)})
        return error_problem(exc)
    if over:
        return problem(429, f"Too many open connections ({over})", headers={"Retry-After": "5"})
    since = {channel: resume[channel] for channel in channels if channel in resume}
    stream = EventStream(settings, channels, dict(since), request.environ.get("gunicorn.socket"))
    client = Client(client_id, stream, identity, remote, settings.ws_rate)
    stream.on_closed = lambda: gevent.spawn(hub.protocol.drop, client)
    hub.protocol.admit(client)
    log.info("sse stream", extra={"client": client_id, "channels": len(channels), "resumed": len(since)})
    if hub.revocations.revoked(identity):
        # Revoked while this request was under way: the command found no stream to close.
        stream.close(CLOSE_UNAUTHORIZED, REVOKED_REASON)
    else:
        hub.protocol.subscribe_all(client, channels, since)
    response = Response(stream.events(), mimetype="text/event-stream", headers=HEADERS)
    response.call_on_close(stream.finish)
    return response


def init_app(app, hub) -> None:
    """Mount `/sse` on the app, served by `hub`."""
    app.add_url_rule("/sse", "sse", lambda: open_stream(hub), methods=["GET"])
