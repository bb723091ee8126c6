"""The hub's transport: each WebSocket's socket, read and written by gevent's event loop.

flask-sock and simple-websocket make the handshake; then the connection is
handed to a `WebSocket` and its handler greenlet ends. From there gevent's
loop calls `_readable` when bytes arrive and `_writable` when a full socket
takes more, so an idle connection holds no greenlet: a socket, a wsproto
parser and this object (docs/benchmarks.md: "The hub beside Flask-SocketIO"). A frame for many
clients is encoded once (`wire_frame`) and written with the raw socket's
non-blocking send; what a socket cannot take waits in its queue, bounded in
bytes and in writes (a push: a frame, or a run of frames sent together), and
goes out from the head (an offset into the first element, several elements
per `sendmsg`), so nothing queued is copied again (folding the queue into
one element would let it grow past its bound and copy it on every write).
Runs under gevent only (the
gunicorn worker class, gunicorn.conf.py), on plain TCP: TLS ends in front of
gunicorn (the platform's router, or a proxy).
"""

from __future__ import annotations

import _socket
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Protocol

import gevent
from gevent.event import Event
from gevent.socket import wait_read
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import ParseFailed
from wsproto.utilities import LocalProtocolError

log = logging.getLogger("herald.hub")

# A fixed kernel send buffer (no autotuning up to 4 MB): bounded memory per
# connection, and a stalled client shows in its queue soon.
SEND_BUFFER_BYTES = 64 * 1024
RECEIVE_BYTES = 16 * 1024
SEND_PIECES = 64  # queued elements handed to one sendmsg (well under IOV_MAX)
CLOSE_WAIT = 10.0  # seconds a closing socket waits for its close frame to go out and the client's answer
PING_FRAME = b"\x89\x00"
ABNORMAL_CLOSURE = 1006  # the close code of a connection that ended with no close frame
_READ, _WRITE = 1, 2


class LoopWatcher(Protocol):
    """What Herald uses of a gevent loop's io and timer watchers (gevent has no types)."""

    active: bool

    def start(self, callback: Callable[..., None], *args: object) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def wire_frame(text: str) -> bytes:
    """A whole unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it.

    A broadcast is encoded once for all its subscribers instead of once per
    connection by wsproto; without extensions the bytes are the same.
    """
    payload = text.encode()
    return _head(0x81, len(payload)) + payload


def text_payloads(data: bytes) -> list[bytes]:
    """The payloads of the text frames in `data`, whole unmasked frames as `wire_frame` writes
    them (control frames are skipped): what the router wrote, for a client that is not a
    WebSocket (an event stream, web/hub/sse.py)."""
    payloads = []
    at = 0
    while at < len(data):
        first, size = data[at], data[at + 1] & 0x7F
        at += 2
        if size == 126:
            (size,) = struct.unpack_from("!H", data, at)
            at += 2
        elif size == 127:
            (size,) = struct.unpack_from("!Q", data, at)
            at += 8
        if first == 0x81:
            payloads.append(data[at:at + size])
        at += size
    return payloads


def close_frame(code: int, reason: str) -> bytes:
    """A close frame with `code` and `reason` (cut to the 123 bytes a control frame allows)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return _head(0x88, len(payload)) + payload


class Socket(Protocol):
    """What the hub's protocol uses of a client's connection: a `WebSocket`, or an event stream."""

    closing: bool
    close_code: int | None
    close_reason: str
    on_overflow: Callable[[], None] | None

    def push(self, data: bytes) -> None: ...

    def ping(self) -> bool: ...

    def wait_drained(self, timeout: float) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...


def _head(first: int, size: int) -> bytes:
    if size < 126:
        return struct.pack("!BB", first, size)
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


class NoThread:
    """simple-websocket's reader-thread class, made inert: `WebSocket` reads instead.

    flask-sock passes it through `SOCK_SERVER_OPTIONS["thread_class"]`.
    """

    name = "(no thread)"

    def __init__(self, target=None):
        pass

    def start(self) -> None:
        """Nothing to start."""


class WebSocket:
    """One client's socket after the handshake: its parser, send queue and loop watchers.

    `push` writes bytes now if the socket takes them, else queues them (at
    most `queue_bytes` bytes, in at most `queue_limit` pushes not yet sent
    whole; past either the client is too slow: `on_overflow` is called and it
    is closed with 4008). A push counts as one however many frames it holds:
    a run the socket has mostly taken must not count as many frames waiting,
    or a client that keeps up would be closed by a burst (the bytes bound the
    memory).
    Messages go to `on_message` one by one, in order; `on_closed` is called
    once, when the socket is gone. Nothing is answered before `start`: a
    Ping read while the handshake's checks run gets no Pong.
    """

    __slots__ = ("_raw", "_proto", "_queue", "_offset", "_limit", "_queue_bytes", "_max_bytes",
                 "_reader", "_writer", "_timer", "_drained", "_message", "_size", "_early", "_on_message",
                 "_on_closed", "on_overflow", "on_too_large", "closing", "closed", "awaiting_pong", "queued",
                 "_ping_ahead", "close_code", "close_reason")

    def __init__(self, ws, queue_limit: int, max_message_bytes: int, queue_bytes: int):
        # The plain socket under gevent's wrapper (no watchers of its own):
        # detached, so gunicorn's close once the handler returns is a no-op.
        self._raw = _socket.socket(fileno=ws.sock.detach())
        self._raw.setblocking(False)
        try:
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:
            pass
        ws.connected = False  # flask-sock's close() after the handler is then a no-op
        # A fresh frame parser rather than the handshake's WSConnection, which
        # keeps h11's request state for ever; no extension is ever negotiated
        # (init_app strips permessage-deflate), so nothing else carries over.
        self._proto = Connection(ConnectionType.SERVER)
        # Pushes not yet sent whole, in order; a list, not a deque: a tenth of the memory, and rarely used.
        self._queue: list[bytes] = []
        self._offset = 0  # bytes of the first element already sent: the rest of a frame written in part
        self.queued = 0  # bytes queued (not yet sent)
        self._limit = queue_limit
        self._queue_bytes = queue_bytes
        self._max_bytes = max_message_bytes
        self._reader: LoopWatcher | None = None
        self._writer: LoopWatcher | None = None
        self._timer: LoopWatcher | None = None
        self._drained: Event | None = None
        self._message: list = []
        self._size = 0
        self._early: list | None = []  # messages read before start()
        self._on_message: Callable[[str | bytes | bytearray], None] | None = None
        self._on_closed: Callable[[], None] | None = None
        self.on_overflow: Callable[[], None] | None = None
        self.on_too_large: Callable[[], None] | None = None
        self.closing = self.closed = False
        self.awaiting_pong = False
        self._ping_ahead = 0  # queued bytes up to the end of the last ping: it is not out before they are
        # How the connection ended: the code (and reason) of the first close frame sent or
        # received, or 1006 when the TCP connection ended without one (RFC 6455 7.1.5).
        self.close_code: int | None = None
        self.close_reason = ""

    # -- reading -------------------------------------------------------------
    def read_message(self, deadline: float):
        """Block this greenlet until a whole message arrives (before `start`); None if the
        socket closed or `deadline` (time.monotonic()) passed first, whatever came meanwhile
        (pings, parts of a message)."""
        while not self._early and not self.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                wait_read(self._raw.fileno(), timeout=remaining)
            except TimeoutError:
                return None
            self._readable()
        return self._early.pop(0) if self._early else None

    def start(self, on_message, on_closed) -> None:
        """Hand the socket to the event loop; messages read so far go to `on_message` first."""
        self._on_message, self._on_closed = on_message, on_closed
        early, self._early = self._early or [], None
        for message in early:
            on_message(message)
        if self.closed:
            on_closed()
        elif self._reader is None:
            self._watch_reads()

    def _watch_reads(self) -> None:
        self._reader = gevent.get_hub().loop.io(self._raw.fileno(), _READ)
        self._reader.start(self._readable)

    def _readable(self) -> None:
        try:
            data = self._raw.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish()
            return
        try:
            self._proto.receive_data(data)
            for event in self._proto.events():
                if self.closed:
                    return
                self._event(event)
        except ParseFailed as exc:
            self.close(exc.code, "protocol error")
        except LocalProtocolError:
            self._finish()
        except Exception:  # a bug here must cost this connection only, never the loop
            log.exception("ws read failed")
            self._finish()

    def _event(self, event) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            if self.closing:
                return
            part = event.data
            self._size += len(part.encode()) if isinstance(part, str) else len(part)  # bytes, not characters
            if self._size > self._max_bytes:
                self._message, self._size = [], 0
                if self.on_too_large is not None:
                    self.on_too_large()
                else:
                    self.close(1009, "message too big")
                return
            self._message.append(part)
            if event.message_finished:
                whole = part if len(self._message) == 1 else (
                    "".join(self._message) if isinstance(part, str) else b"".join(self._message))
                self._message, self._size = [], 0
                if self._early is not None:
                    self._early.append(whole)
                else:
                    assert self._on_message is not None  # start() set it as it emptied _early
                    self._on_message(whole)
        elif isinstance(event, Ping):
            if self._early is None:  # before authentication nothing is answered
                self.push(self._proto.send(event.response()))
        elif isinstance(event, Pong):
            # Only once our ping is out: an unsolicited Pong does not keep a reader that
            # takes nothing alive.
            if not self._ping_ahead:
                self.awaiting_pong = False
        elif isinstance(event, CloseConnection):
            if self.closing:
                self._finish()  # the answer to our close
            else:
                # The client closes: answer, and end the connection once the answer is out.
                self.close_code, self.close_reason = int(event.code), event.reason or ""
                self._send_last(self._proto.send(event.response()))
                if not self._queue:
                    self._finish()

    # -- writing -------------------------------------------------------------
    def push(self, data: bytes) -> None:
        """Send `data` (whole frames) now, or queue it behind what waits."""
        if self.closing:
            return
        if self._queue:
            self._enqueue(data)
            return
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._finish()
            return
        if sent < len(data):
            self._enqueue(data, sent)
            if self._queue:
                self._watch_writes()

    def _enqueue(self, data: bytes, sent: int = 0) -> None:
        if len(self._queue) >= self._limit or self.queued + len(data) - sent > self._queue_bytes:
            if not self._queue and sent:
                self._queue.append(data)  # the frame begun must be finished before the close
                self._offset, self.queued = sent, len(data) - sent
            self._overflowed()
            return
        if not self._queue:
            self._offset = sent
        self._queue.append(data)
        self.queued += len(data) - sent

    def ping(self) -> bool:
        """Ping the client; False (and a close with 1008) if it left the last ping unanswered."""
        if self.closing:
            return True
        if self.awaiting_pong:
            self.close(1008, "Ping/Pong timeout")
            return False
        self.awaiting_pong = True
        self.push(PING_FRAME)
        self._ping_ahead = self.queued
        return True

    def _watch_writes(self) -> None:
        if self._writer is None:
            self._writer = gevent.get_hub().loop.io(self._raw.fileno(), _WRITE)
        if not self._writer.active:
            self._writer.start(self._writable)

    def _writable(self) -> None:
        assert self._writer is not None  # the writer's callback
        queue = self._queue
        if not queue:  # emptied meanwhile (an overflow dropped it, and the close frame went out at once)
            self._writer.stop()
            return
        head = memoryview(queue[0])[self._offset:]
        pieces: list[bytes | memoryview] = [head, *queue[1:SEND_PIECES]]
        try:
            sent = self._raw.sendmsg(pieces) if len(pieces) > 1 else self._raw.send(pieces[0])
        except BlockingIOError:
            return
        except OSError:
            self._finish()
            return
        finally:
            head.release()
        self.queued -= sent
        self._ping_ahead = max(0, self._ping_ahead - sent)
        # Drop the elements sent whole; the next starts `offset` bytes in.
        sent += self._offset
        done = 0
        while done < len(queue) and sent >= len(queue[done]):
            sent -= len(queue[done])
            done += 1
        del queue[:done]
        self._offset = sent
        if queue:
            return
        self._writer.stop()
        if self._drained is not None:
            self._drained.set()

    def _overflowed(self) -> None:
        # What is queued will never be read in time: the close goes first.
        self._discard_queued()
        if self.on_overflow is not None:
            self.on_overflow()
        self.close(4008, "too slow")

    def _discard_queued(self) -> None:
        # A frame's end dropped would garble all that follows: a partly written head stays.
        queue = self._queue
        if self._offset and queue:
            del queue[1:]
            self.queued = len(queue[0]) - self._offset
        else:
            queue.clear()
            self.queued = self._offset = 0

    def wait_drained(self, timeout: float) -> bool:
        """Block this greenlet until everything queued is sent; False on timeout or when closing."""
        with gevent.Timeout(timeout, False):
            while self._queue and not self.closing:
                if self._drained is None:
                    self._drained = Event()
                self._drained.clear()
                self._drained.wait()
        return not self._queue and not self.closing

    # -- closing -------------------------------------------------------------
    def close(self, code: int, reason: str) -> None:
        """Close after what is queued so far (the close frame travels behind it)."""
        if self.closing:
            return
        self.close_code, self.close_reason = code, reason
        try:
            frame = self._proto.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:
            frame = close_frame(code, reason)
        if len(self._queue) >= self._limit or self.queued >= self._queue_bytes:
            self._discard_queued()  # the close must not wait behind what overflowed
        self._send_last(frame)

    def _send_last(self, frame: bytes) -> None:
        # The last frame: then wait for the client's answer (or EOF), bounded by CLOSE_WAIT.
        if self._queue:
            # Past the bounds if need be: it replaces what they dropped.
            self._queue.append(frame)
            self.queued += len(frame)
        else:
            self.push(frame)
        self.closing = True
        if self._drained is not None:
            self._drained.set()  # a waiting replay gives up
        if self._reader is None and not self.closed:
            self._watch_reads()
        if self._timer is None and not self.closed:
            self._timer = gevent.get_hub().loop.timer(CLOSE_WAIT)
            self._timer.start(self._finish)

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = self.closing = True
        if self.close_code is None:
            self.close_code = ABNORMAL_CLOSURE
        for watcher in (self._reader, self._writer, self._timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._reader = self._writer = self._timer = None
        self._queue.clear()
        self.queued = self._offset = 0
        try:
            self._raw.close()
        except OSError:
            pass
        if self._drained is not None:
            self._drained.set()
        if self._on_closed is not None:
            self._on_closed()
