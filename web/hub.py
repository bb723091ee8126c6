"""The WebSocket hub: `/ws` connections in this process, fed by one Redis pub/sub listener.

Workers PUBLISH each frame once, already encoded; the listener turns it into
WebSocket bytes once and writes them to every local subscriber whose socket
takes them at once. What a socket cannot take waits in that connection's
bounded send queue for its own writer, so a slow client never holds up the
others (it is closed with 4008 when its queue overflows). Under gevent every
thread here is a greenlet.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import redis
from flask import request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from pipeline.errors import HeraldError, TransientError, ValidationError
from pipeline.green import gevent_active
from pipeline.messages import dumps, loads, new_id, parse_publish, valid_channel
from pipeline.keys import Keys
from pipeline.store import stream_id_key, valid_stream_id
from web.auth import LEEWAY_SECONDS, AuthError, verify
from web.problems import problem
from web.router import Router

log = logging.getLogger("herald.hub")

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_TOO_SLOW = 4008
CLOSE_TOO_LARGE = 4009
CLOSE_RATE_LIMITED = 4029
CONNECT_TIMEOUT = 10.0
MAX_BAD_FRAMES = 5
SEND_BUFFER_BYTES = 64 * 1024
CLOSE_WAIT = 10.0  # seconds a close frame may wait for room in a stalled socket
_STOP = object()


class Unavailable(TransientError):
    """Redis or Kafka failed an op: answered `unavailable` (worth retrying), never counted as a bad frame."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def wire_frame(text: str) -> bytes:
    """A whole unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it.

    A broadcast is encoded once for all its subscribers instead of once per
    connection by wsproto; without extensions the bytes are the same.
    """
    payload = text.encode()
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


class WholeFrames:
    """A socket whose send() never sends part of its data.

    simple-websocket writes frames with socket.send(), which under back
    pressure may write only part of one and corrupt the stream.
    """

    def __init__(self, sock):
        self._sock = sock
        # The writer and simple-websocket's ping/pong thread both send: a frame
        # blocked half-written must not let the other's bytes in between.
        self._lock = threading.Lock()

    def send(self, data) -> int:
        """Send all of `data` (blocking this greenlet until it is out)."""
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    def send_now(self, data: bytes) -> int | None:
        """Under gevent: send what the kernel takes at once, without waiting (0 when
        its buffer is full); None when another send is under way."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._sock.send(data, 0, timeout=0.0)  # gevent's send: raise, never wait
        except BlockingIOError:
            return 0
        finally:
            self._lock.release()

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Rest(bytes):
    """The unsent end of a frame written in part: it goes out before anything else."""


class Subscription:
    """One connection's interest in one channel, with the resume seam state."""

    def __init__(self, status: bool, presence: bool = False, hold: int = 200):
        self.status = status
        self.presence = presence
        self.last = (-1, -1)      # newest stream id sent, to skip duplicates at the seam
        self.backlog: list | None = []  # live frames held while history is replayed
        self.hold = hold          # at most this many of them
        self.overflowed = False   # more came: they were dropped, and are read from history

    def offer(self, conn: "Connection", key: tuple[int, int], frame) -> None:
        """Queue a message frame (`key`: its parsed offset) unless the replay already sent it."""
        if self.backlog is not None:
            # A frame is in history before it is published (one Lua script,
            # README: delivery guarantees), so a replay that falls behind the
            # live flow drops what it holds and reads it from history instead.
            if self.overflowed:
                return
            if len(self.backlog) >= self.hold:
                self.backlog.clear()
                self.overflowed = True
                return
            self.backlog.append((key, frame))
            return
        if key > self.last:
            self.last = key
            conn.push(frame)


class Connection:
    """A client's socket, its send queue and its writer."""

    def __init__(self, hub: "Hub", ws, identity, remote: str, client_id: str):
        self.hub = hub
        self.ws = ws
        self.identity = identity
        self.remote = remote
        self.id = client_id
        self.subscriptions: dict[str, Subscription] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue(maxsize=hub.settings.send_queue_size)
        self.closing = False
        # Token bucket: `ws_rate` frames a second, bursts of twice that.
        self.tokens = hub.settings.ws_rate * 2
        self.refilled = time.monotonic()
        # Writing straight from the caller saves two greenlet switches per
        # frame; with threads, two callers could split each other's frames.
        self.direct = gevent_active()
        # Started at the first frame that has to wait: most connections never need one.
        self.writer: threading.Thread | None = None
        self.written = threading.Event()  # set when the writer has ended
        self.drained = threading.Event()  # set when the writer has emptied the queue

    def push(self, frame: str | bytes) -> None:
        """Send a frame now if the socket takes it, else queue it for the writer;
        a full queue means the client is too slow: close it with 4008."""
        if self.closing:
            return
        data = frame if isinstance(frame, bytes) else wire_frame(frame)
        if self.direct and self.queue.empty() and self.ws.connected:
            try:
                sent = self.ws.sock.send_now(data)
            except OSError:
                sent = None  # the writer meets the error too, and ends the connection
            if sent == len(data):
                return
            if sent:
                data = _Rest(data[sent:])
        try:
            self._queue(data)
        except queue.Full:
            log.warning("send queue overflow", extra={"client": self.id, "user": self.identity.user})
            # What is queued will never be read in time: the close goes first.
            self._discard_queued()
            self.close(CLOSE_TOO_SLOW, "too slow")

    def _queue(self, item) -> None:
        self.queue.put_nowait(item)
        if self.writer is None:
            self.writer = threading.Thread(target=self._write, name=f"ws-writer-{self.id}", daemon=True)
            self.writer.start()

    def _discard_queued(self) -> None:
        # Through get_nowait(): under gevent this is gevent's Queue, with no
        # lock or deque of the standard one to reach into.
        rest = None
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Rest):
                rest = item  # a frame's end dropped would garble all that follows
        if rest is not None:
            self.queue.put_nowait(rest)

    def send(self, frame: dict) -> None:
        """Send (or queue) a frame given as a dict."""
        self.push(dumps(frame))

    def take_token(self) -> bool:
        """Spend one frame of the client's allowance; False when it is flooding."""
        now = time.monotonic()
        rate = self.hub.settings.ws_rate
        self.tokens = min(rate * 2, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def close(self, code: int, reason: str) -> None:
        """Close after what is queued so far (the close frame travels behind it)."""
        if self.closing:
            return
        self.closing = True
        self._force(("close", code, reason))

    def _force(self, item) -> None:
        try:
            self._queue(item)
        except queue.Full:
            self._discard_queued()  # the client is being closed anyway
            self._queue(item)

    def stop_writer(self) -> None:
        """End the writer (after the reader has finished); nothing is sent after this."""
        self.closing = True
        if self.writer is not None:
            self._force(_STOP)

    def wait_drained(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until everything queued is sent; False if it
        was not, or the connection is closing."""
        deadline = time.monotonic() + timeout
        while True:
            self.drained.clear()  # before the check: a writer emptying the queue now sets it again
            if self.closing or self.queue.empty():
                return not self.closing
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.drained.wait(remaining):
                return False

    def wait_writer(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the writer, if there is one, to end.

        Not Thread.join(): under gevent, Thread.start() switches greenlets before
        the new one runs, so the reader can find a writer that the listener is
        still starting, and join() raises on it (issue 8: "cannot join thread
        before it is started" when clients closed during a broadcast).
        """
        if self.writer is not None:
            self.written.wait(timeout)

    def _write(self) -> None:
        try:
            self._write_queued()
        finally:
            self.written.set()
            self.drained.set()

    def _write_queued(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, tuple):
                    self.ws.close(reason=item[1], message=item[2])
                    self._wake_reader()
                    return
                if not self.ws.connected:
                    raise ConnectionClosed(self.ws.close_reason, self.ws.close_message)
                self.ws.sock.send(item)  # whole frames (wire_frame), or the rest of one
                if self.queue.empty():
                    self.drained.set()
            except (ConnectionClosed, OSError):
                self.closing = True
                self._wake_reader()
                return

    def _wake_reader(self) -> None:
        # The reader blocks in receive() without a timeout; simple-websocket
        # wakes it through this event, which a close from our side never sets.
        self.ws.event.set()


class Hub:
    """This process's connections, subscriptions and pub/sub listener."""

    def __init__(self, services):
        self.services = services
        self.settings = services.settings
        self.node = self.settings.node_id
        self.connections: dict[str, Connection] = {}
        self.channels: dict[str, dict[str, Subscription]] = {}
        # The subscribers that asked for status ("s") or presence ("p") frames,
        # so a join among 10,000 subscribers is not a walk over all of them.
        self.watchers: dict[str, dict[str, dict[str, Subscription]]] = {"s": {}, "p": {}}
        self.running = False
        self.keys = Keys(self.settings.redis_prefix, self.settings.redis_cluster)
        self.router = Router(self.settings, self.keys.node_channel(self.node), self._dispatch, self._catch_up)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Start the listener (once per process)."""
        if self.running:
            return
        self.running = self.router.running = True
        threading.Thread(target=self.router.run, name="hub-listener", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="hub-heartbeat", daemon=True).start()

    def shutdown(self) -> None:
        """Close every connection with 1001 so clients reconnect to another process."""
        self.running = self.router.running = False
        for conn in list(self.connections.values()):
            conn.close(CLOSE_GOING_AWAY, "server going away")

    # -- fan-out -----------------------------------------------------------
    def _catch_up(self) -> None:
        store = self.services.store
        for channel, subs in list(self.channels.items()):
            since = min(sub.last for sub in subs.values())
            if since < (0, 0):
                since = (0, 0)
            page = store.history(channel, f"{since[0]}-{since[1]}", self.settings.retention(channel)[0])
            for message in page["messages"]:
                key, frame = stream_id_key(message["offset"]), wire_frame(dumps(message))
                for client, sub in list(subs.items()):
                    conn = self.connections.get(client)
                    if conn is not None:
                        sub.offer(conn, key, frame)
        log.info("hub caught up after reconnect", extra={"channels": len(self.channels)})

    def _dispatch(self, item: dict) -> None:
        data = item["data"]
        kind, name = self.keys.parse_pubsub(item["channel"])
        if kind == "n":  # our node channel: "client\nframe"
            client, _, frame = data.partition("\n")
            conn = self.connections.get(client)
            if conn is not None:
                channel = json.loads(frame).get("channel")
                sub = conn.subscriptions.get(channel)
                if sub is None or not sub.status:  # else it gets the channel's copy
                    conn.push(frame)
            return
        if kind == "m":
            subs = self.channels.get(name)
            if subs:
                sid, _, frame = data.partition("\n")
                key, wire = stream_id_key(sid), wire_frame(frame)
                for client, sub in list(subs.items()):
                    conn = self.connections.get(client)
                    if conn is not None:
                        sub.offer(conn, key, wire)
        elif self.watchers.get(kind, {}).get(name):
            wire = wire_frame(data)
            for client, sub in list(self.watchers[kind][name].items()):
                if sub.backlog is None:
                    conn = self.connections.get(client)
                    if conn is not None:
                        conn.push(wire)

    # -- one connection ------------------------------------------------------
    def serve(self, ws) -> None:
        """Run one WebSocket connection from handshake to close."""
        remote = request.remote_addr or ""  # the trusted proxies' view (HERALD_TRUSTED_PROXIES, ProxyFix)
        if not self.running:
            # Shutting down: send the client to another process now.
            ws.close(reason=CLOSE_GOING_AWAY, message="server going away")
            return
        identity = self._authenticate(ws, request.args.get("token"))
        if identity is None:
            return
        client_id = new_id()
        try:
            over = self.services.store.claim_connection(self._member(client_id), identity.user, remote)
        except redis.RedisError as exc:
            ws.close(reason=CLOSE_TRY_AGAIN, message="try again later")
            log.warning("ws refused: Redis unavailable", extra={"user": identity.user, "error": str(exc)})
            return
        if over:
            ws.close(reason=CLOSE_RATE_LIMITED, message="too many connections")
            log.info("ws refused: connection cap", extra={"user": identity.user, "remote": remote, "cap": over})
            return
        try:
            # A fixed kernel send buffer (no autotuning up to 4 MB): bounded
            # memory per connection, and a stalled client shows in its queue soon.
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except (AttributeError, OSError):
            pass
        ws.sock = WholeFrames(ws.sock)
        conn = Connection(self, ws, identity, remote, client_id)
        self.connections[conn.id] = conn
        log.info("ws connected", extra={"client": conn.id, "user": identity.user, "remote": remote})
        conn.send({"op": "connected", "client": conn.id, "user": identity.user,
                   "ping_interval": self.settings.ping_interval})
        try:
            self._read(conn)
        finally:
            self._drop(conn)

    def _authenticate(self, ws, token):
        ref = None
        if token is None and self.settings.auth:
            raw = ws.receive(timeout=CONNECT_TIMEOUT)
            frame = _parse(raw)
            if not isinstance(frame, dict) or frame.get("op") != "connect":
                ws.close(reason=CLOSE_UNAUTHORIZED, message="first frame must be connect")
                return None
            token, ref = frame.get("token"), frame.get("ref")
        try:
            return verify(token, self.settings)
        except AuthError as exc:
            ws.close(reason=CLOSE_UNAUTHORIZED, message=str(exc)[:120])
            log.info("ws unauthorized", extra={"error": str(exc), "ref": ref})
            return None

    def _read(self, conn: Connection) -> None:
        bad = 0
        expires = conn.identity.expires
        while not conn.closing:
            # No polling: sleep until a frame, the close, or the token's expiry.
            # Waking every connection each second costs a core at 10,000 of them.
            wait = None if expires is None else max(0.0, expires + LEEWAY_SECONDS - time.time()) + 0.05
            raw = conn.ws.receive(timeout=wait)
            if expires is not None and time.time() > expires + LEEWAY_SECONDS:
                conn.close(CLOSE_UNAUTHORIZED, "token expired")
                return
            if raw is None:
                if not conn.ws.connected:
                    return
                continue
            size = len(raw.encode()) if isinstance(raw, str) else len(raw)  # bytes, not characters
            if size > self.settings.max_message_bytes:
                conn.close(CLOSE_TOO_LARGE, "frame too large")
                return
            if not conn.take_token():
                conn.close(CLOSE_RATE_LIMITED, "too many frames")
                return
            frame = _parse(raw)
            ref = frame.get("ref") if isinstance(frame, dict) else None
            try:
                self._handle(conn, frame)
                bad = 0
            except Unavailable as exc:
                # An outage says nothing about the client's frames (README: close codes).
                conn.send(_with_ref({"op": "error", "code": "unavailable", "message": exc.detail}, ref))
            except ValidationError as exc:
                bad += 1
                reply = {"op": "error", "code": exc.title.lower().replace(" ", "_"), "message": exc.detail}
                if ref is not None:
                    reply["ref"] = ref
                conn.send(reply)
                if bad >= MAX_BAD_FRAMES:
                    conn.close(CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_POLICY, "too many bad frames")

    def _handle(self, conn: Connection, frame) -> None:
        if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
            raise ValidationError("a frame is a JSON object with an op", title="bad_frame")
        op, ref = frame["op"], frame.get("ref")
        if op == "ping":
            conn.send(_with_ref({"op": "pong"}, ref))
        elif op == "subscribe":
            self._subscribe(conn, frame, ref)
        elif op == "unsubscribe":
            channel = _channel(frame)
            self._unsubscribe(conn, channel)
            conn.send(_with_ref({"op": "unsubscribed", "channel": channel}, ref))
        elif op == "publish":
            self._publish(conn, frame, ref)
        elif op == "connect":
            raise ValidationError("already connected", title="bad_frame")
        else:
            raise ValidationError(f"unknown op {op!r}", title="bad_frame")

    def _subscribe(self, conn: Connection, frame: dict, ref) -> None:
        channel = _channel(frame)
        if not conn.identity.may_subscribe(channel):
            raise ValidationError(f"this token may not subscribe to {channel}", status=403, title="forbidden")
        limit = self.settings.ws_max_subscriptions
        if channel not in conn.subscriptions and len(conn.subscriptions) >= limit:
            raise ValidationError(f"at most {limit} subscriptions per connection (HERALD_WS_MAX_SUBSCRIPTIONS)",
                                  title="too_many_subscriptions")
        since = frame.get("since")
        if since is not None and not valid_stream_id(since):
            raise ValidationError("since is an offset from a message frame", title="bad_frame")
        size = self._replay_page()
        sub = Subscription(status=frame.get("status") is True, presence=frame.get("presence") is True, hold=size)
        names = self._pubsub_channels(channel, sub)
        # The resume seam. Registered first, the subscription holds live
        # frames; then Redis confirms the SUBSCRIBE of the channel's pub/sub
        # channel (join() returns once the listener read the confirmation, or
        # at once when this process was subscribed already); only then is
        # history read. A message is added to history and published in one
        # Lua script (README: delivery guarantees), so one published before
        # the SUBSCRIBE took effect is in the history read, one published
        # after reaches the listener, and `last` drops what is in both. Read
        # before the confirmation, history would miss a message published
        # in between, and the live flow would not have it either.
        previous = self._attach(conn, channel, sub)
        store = self.services.store
        try:
            self.router.join(names)
            try:
                if since:
                    page = store.history(channel, since, size)
                    replay, recovered, more = page["messages"], page["recovered"], page["next"] is not None
                    sub.last = stream_id_key(replay[-1]["offset"]) if replay else stream_id_key(since)
                else:
                    replay, recovered, more = [], True, False
                    newest = store.last_id(channel)
                    sub.last = stream_id_key(newest) if newest else (-1, -1)
            except redis.RedisError:
                self.router.leave(names)
                raise
            offset = _format_sid(sub.last)
        except redis.RedisError as exc:
            log.warning("subscribe failed: history unavailable",
                        extra={"client": conn.id, "channel": channel, "error": str(exc)})
            if previous is not None:
                self._attach(conn, channel, previous)
            else:
                self._detach(conn, channel)
            raise Unavailable("history is unavailable, retry") from None
        if previous is not None:
            self.router.leave(self._pubsub_channels(channel, previous))
        reply = {"op": "subscribed", "channel": channel, "offset": offset, "recovered": recovered,
                 "replayed": len(replay)}
        if more:
            reply["more"] = True  # `replayed` and `offset` count the first page; more pages follow
        conn.send(_with_ref(reply, ref))
        self._replay(conn, channel, sub, replay, more)
        if previous is None:
            self._presence_join(conn, channel)

    def _replay_page(self) -> int:
        # The replay waits for an empty send queue before each page: a page
        # larger than the queue would overflow it (4008) by itself.
        return min(self.settings.ws_replay_page, self.settings.send_queue_size)

    def _replay(self, conn: Connection, channel: str, sub: Subscription, page: list, more: bool) -> None:
        """Send history page by page, each once the client has taken the last
        (README: HERALD_WS_REPLAY_PAGE), then the live frames held meanwhile."""
        store = self.services.store
        while True:
            for message in page:
                conn.send(message)
            if not more and self._go_live(conn, sub):
                return
            if not conn.wait_drained(2 * self.settings.ping_interval):
                conn.close(CLOSE_TOO_SLOW, "too slow")  # no-op when it is closing already
                return
            try:
                rest = store.history(channel, _format_sid(sub.last), self._replay_page())
            except redis.RedisError as exc:
                log.warning("replay failed: history unavailable",
                            extra={"client": conn.id, "channel": channel, "error": str(exc)})
                conn.close(CLOSE_TRY_AGAIN, "try again later")  # the client resumes from its last offset
                return
            if not rest["recovered"]:
                # Trimmed past what we sent while the client read: a gap. Resuming
                # tells the client so (`recovered: false`).
                conn.close(CLOSE_TOO_SLOW, "too slow")
                return
            page, more = rest["messages"], rest["next"] is not None
            if page:
                sub.last = stream_id_key(page[-1]["offset"])
            log.debug("replay page", extra={"client": conn.id, "channel": channel, "messages": len(page)})

    @staticmethod
    def _go_live(conn: Connection, sub: Subscription) -> bool:
        """After history's end: send the held live frames that are newer and go live;
        False when they overflowed meanwhile (then history is read on)."""
        while sub.backlog and not sub.overflowed:
            key, live = sub.backlog.pop(0)
            if key > sub.last:
                sub.last = key
                conn.push(live)  # may switch greenlets: the listener may hold more meanwhile
        if sub.overflowed:
            sub.overflowed = False  # hold again from here; what was dropped is read from history
            return False
        sub.backlog = None  # no switch since the check above: nothing falls in between
        return True

    def _unsubscribe(self, conn: Connection, channel: str) -> None:
        sub = self._detach(conn, channel)
        if sub is not None:
            self.router.leave(self._pubsub_channels(channel, sub))
            self._presence_leave(conn, channel)

    def _pubsub_channels(self, channel: str, sub: Subscription) -> list[str]:
        """The pub/sub channels `sub` needs: the messages, and status and presence if it asked."""
        names = [self.keys.message_channel(channel)]
        if sub.status:
            names.append(self.keys.status_channel(channel))
        if sub.presence:
            names.append(self.keys.presence_channel(channel))
        return names

    def _attach(self, conn: Connection, channel: str, sub: Subscription) -> Subscription | None:
        """Index `sub` (in place of the connection's earlier one, which is returned)."""
        with conn.lock:
            previous = conn.subscriptions.get(channel)
            conn.subscriptions[channel] = sub
            self.channels.setdefault(channel, {})[conn.id] = sub
            for kind, wanted in (("s", sub.status), ("p", sub.presence)):
                if wanted:
                    self.watchers[kind].setdefault(channel, {})[conn.id] = sub
                else:
                    _discard(self.watchers[kind], channel, conn.id)
        return previous

    def _detach(self, conn: Connection, channel: str) -> Subscription | None:
        """Remove the connection's subscription from every index; returns it (None if it had none)."""
        with conn.lock:
            sub = conn.subscriptions.pop(channel, None)
            for index in (self.channels, *self.watchers.values()):
                _discard(index, channel, conn.id)
        return sub

    def _publish(self, conn: Connection, frame: dict, ref) -> None:
        body = {k: v for k, v in frame.items() if k not in ("op", "ref")}
        envelope = parse_publish(body, sender=conn.identity.user)
        if not conn.identity.may_publish(envelope.channel):
            raise ValidationError(f"this token may not publish to {envelope.channel}", status=403,
                                  title="forbidden")
        try:
            answer = self.services.ingest.publish(envelope, idempotent="id" in body,
                                                  origin=f"{self.node}/{conn.id}", request_id=new_id())
        except ValidationError:
            raise
        except HeraldError as exc:
            # Its text names internal hosts: logged, not sent (README: WebSocket close codes and errors).
            log.warning("ws publish refused: service unavailable", extra={"client": conn.id, "error": str(exc)})
            raise Unavailable("the message was not accepted, retry later") from None
        conn.send(_with_ref({"op": "ack", "id": answer["id"], "status": "accepted"}, ref))

    def _presence_join(self, conn: Connection, channel: str) -> None:
        store = self.services.store
        entry = dumps({"client": conn.id, "user": conn.identity.user, "since": int(time.time() * 1000),
                       "node": self.node})
        try:
            pipe = store.redis.pipeline(transaction=False)
            pipe.hset(store.keys.presence(channel), conn.id, entry)
            pipe.sadd(store.keys.presence_channels, channel)
            store.publish(store.keys.presence_channel(channel),
                          _presence_frame("join", channel, conn.identity.user, conn.id), pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("presence not recorded", extra={"client": conn.id, "channel": channel})

    def _presence_leave(self, conn: Connection, channel: str) -> None:
        store = self.services.store
        try:
            pipe = store.redis.pipeline(transaction=False)
            pipe.hdel(store.keys.presence(channel), conn.id)
            store.publish(store.keys.presence_channel(channel),
                          _presence_frame("leave", channel, conn.identity.user, conn.id), pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("presence not removed", extra={"client": conn.id, "channel": channel})

    def _heartbeat(self) -> None:
        # This node's liveness key: presence entries of a node whose key has
        # expired (the process died) are removed by whichever node reaps next.
        store = self.services.store
        period = max(1.0, self.settings.presence_ttl / 3)
        while self.running:
            try:
                store.redis.set(store.keys.node(self.node), "1", ex=self.settings.presence_ttl)
                # A connection closing meanwhile may be counted again: it lapses after the TTL.
                store.refresh_connections([(self._member(c.id), c.identity.user, c.remote)
                                           for c in list(self.connections.values())])
                if store.redis.set(store.keys.presence_reaper, self.node, nx=True, ex=int(period)):
                    for channel, entry in store.reap_presence():
                        log.info("presence reaped", extra={"channel": channel, "client": entry["client"]})
            except redis.RedisError as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            time.sleep(period)

    def _member(self, client_id: str) -> str:
        return f"{self.node}/{client_id}"

    def _drop(self, conn: Connection) -> None:
        for channel in list(conn.subscriptions):
            self._unsubscribe(conn, channel)
        self.connections.pop(conn.id, None)
        try:
            self.services.store.release_connection(self._member(conn.id), conn.identity.user, conn.remote)
        except redis.RedisError:
            log.warning("connection not uncounted", extra={"client": conn.id})  # it lapses after the TTL
        conn.stop_writer()
        # flask-sock closes with 1000 once we return: let our close code go
        # first, waiting a while for a stalled client to make room for it.
        conn.wait_writer(CLOSE_WAIT)
        log.info("ws disconnected", extra={"client": conn.id, "user": conn.identity.user})


def init_app(app, services) -> Hub:
    """Mount `/ws` on the app and attach this process's Hub to the services."""
    hub = Hub(services)
    services.hub = hub
    sock = Sock(app)

    @app.before_request
    def guard_upgrade():
        if request.path != "/ws":
            return None
        origin = request.headers.get("Origin")
        if origin and not origin_allowed(origin, request.host, services.settings.cors_origins):
            return problem(403, f"Origin {origin} is not allowed (HERALD_CORS_ORIGINS)", slug="origin-not-allowed")
        # permessage-deflate holds compression state of a few hundred KB per
        # connection; at thousands of connections that is most of the memory.
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        return None

    @sock.route("/ws")
    def websocket(ws):
        hub.serve(ws)

    return hub


def origin_allowed(origin: str, host: str, allowed) -> bool:
    """Same-origin, or listed in HERALD_CORS_ORIGINS."""
    origin = origin.rstrip("/")
    return origin in allowed or urlsplit(origin).netloc == host


def _discard(index: dict, channel: str, client: str) -> None:
    subs = index.get(channel)
    if subs is not None:
        subs.pop(client, None)
        if not subs:
            del index[channel]


def _presence_frame(op: str, channel: str, user: str, client: str) -> str:
    return dumps({"op": op, "channel": channel, "user": user, "client": client})


def _parse(raw):
    if raw is None:
        return None
    try:
        return loads(raw)
    except (TypeError, ValueError, RecursionError):
        return None


def _channel(frame: dict) -> str:
    channel = frame.get("channel")
    if not valid_channel(channel):
        raise ValidationError("channel must match [A-Za-z0-9_:.@-]{1,200}", title="bad_channel")
    return channel


def _with_ref(frame: dict, ref) -> dict:
    if ref is not None:
        frame["ref"] = ref
    return frame


def _format_sid(key: tuple[int, int]) -> str | None:
    return None if key < (0, 0) else f"{key[0]}-{key[1]}"
