"""The hub's protocol: the handshake's checks, then each client's ops and errors.

A client's frames are handled one at a time, in order, by a greenlet that
exists only while it has frames to handle (docs/protocol.md: "WebSocket protocol").
An op that fails because Redis or Kafka does not answer is answered
`unavailable` and never counts against the client; five bad frames in a row
close it. What a client can make the hub hold is bounded (docs/protocol.md: "WebSocket
limits"): a socket authenticates within CONNECT_TIMEOUT or is closed; frames
waiting for their op are at most INBOX_FRAMES and `max_inbox_size`; a replay
page is bounded in bytes and waits at most REPLAY_WAIT for the client to take it.
Each op's checks sit beside the op they guard, in one class: hence its length.
"""

from __future__ import annotations

import logging
import time

import gevent
import redis
from flask import request
from pydantic import ValidationError as PydanticError

from pipeline.archive import ArchiveUnavailable
from pipeline.core.errors import (
    Forbidden,
    HeraldError,
    InvalidInput,
    Refused,
)
from pipeline.core.messages import CHANNEL_RE, dumps, field_errors, loads, new_id, parse_publish, valid_channel
from pipeline.core.metrics import SLOW_CLOSES, WS_CONNECTIONS
from pipeline.core.streamids import from_key as _format_sid
from pipeline.core.streamids import key as stream_id_key
from pipeline.core.streamids import valid as valid_stream_id
from pipeline.ingest import ephemeral
from web.auth import LEEWAY_SECONDS, AuthError, verify
from web.authorize import PUBLISH, SUBSCRIBE, AuthorizeUnavailable
from web.hub import frames
from web.hub.batch import Batcher
from web.hub.control import Subscribe as SubscribeCommand
from web.hub.errors import BadChannel, BadFrame, TooManySubscriptions, Unavailable, error_code
from web.hub.router import Subscription
from web.hub.transport import ABNORMAL_CLOSURE, LoopWatcher, Socket, WebSocket, wire_frame
from web.ratelimit import address_group
from web.revocations import REVOKED_REASON

log = logging.getLogger("herald.hub")
# History reads go to Redis, and to the archive for offsets older than the stream retains.
HISTORY_ERRORS = (redis.RedisError, ArchiveUnavailable)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_TOO_SLOW = 4008
CLOSE_TOO_LARGE = 4009
CLOSE_RATE_LIMITED = 4029
CONNECT_TIMEOUT = 10.0  # seconds from the upgrade to an accepted token, whatever the socket sends meanwhile
INBOX_FRAMES = 64  # frames waiting for their op (while one blocks, e.g. a replay waiting for the client)
REPLAY_WAIT = 10.0  # seconds a replay page waits for the client to take the page before it
MAX_BAD_FRAMES = 5
CHANNEL_PROBLEM = f"channel must match {CHANNEL_RE.pattern}"
SINCE_PROBLEM = "since is an offset from a message frame"
# The ops a connected client sends, by name (`connect` comes first, or not at all).
CLIENT_OPS: dict[str, type[frames.Ping | frames.Subscribe | frames.Unsubscribe | frames.PublishOp]] = {
    "ping": frames.Ping, "subscribe": frames.Subscribe, "unsubscribe": frames.Unsubscribe, "publish": frames.PublishOp}
DROP_WAIT = 60.0  # seconds a closed client's cleanup waits for its op under way (bounded by Redis timeouts)
SINCE_MAP_PROBLEM = "since must map channel names to offsets from message frames"
BY_SERVER, BY_TOKEN = "server", "token"  # the `by` of a subscription the client did not ask for


class ServerOp:
    """Subscribes or unsubscribes made for a client outside its frames (a server API command, a
    token's `channels`, an event stream's channels: `by` None, checked as the client's own),
    queued in the client's inbox as one entry: they run in order with the client's own ops,
    through the same code, in the client's op greenlet."""

    __slots__ = ("channels", "subscribe", "since", "by")

    def __init__(self, channels: tuple[str, ...], subscribe: bool, since: dict[str, str], by: str | None):
        self.channels, self.subscribe, self.since, self.by = channels, subscribe, since, by

    def __len__(self) -> int:
        return 0  # the inbox's byte bound counts what the client sent, not this


class Client:
    """One authenticated connection: its socket, identity, subscriptions and frame allowance."""

    __slots__ = ("id", "ws", "identity", "remote", "subscriptions", "tokens", "refilled", "bad", "inbox",
                 "inbox_size", "worker", "expiry")

    def __init__(self, client_id: str, ws: Socket, identity, remote: str, rate: float):
        self.id = client_id
        self.ws = ws
        self.identity = identity
        self.remote = remote
        self.subscriptions: dict[str, Subscription] = {}
        # Token bucket: `rate` frames a second, bursts of twice that.
        self.tokens = rate * 2
        self.refilled = time.monotonic()
        self.bad = 0
        self.inbox: list = []
        self.inbox_size = 0  # their len(): characters of a text frame, bytes of a binary one
        self.worker = None  # the greenlet handling the inbox, while it has frames
        self.expiry: LoopWatcher | None = None  # the loop timer closing the connection when the token expires

    def send(self, frame: dict) -> None:
        """Send (or queue) a frame given as a dict."""
        self.ws.push(wire_frame(dumps(frame)))

    def take_token(self, rate: float) -> bool:
        """Spend one frame of the client's allowance; False when it is flooding."""
        now = time.monotonic()
        self.tokens = min(rate * 2, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Protocol:
    """Accepts connections and runs the ops of `/ws` for one hub."""

    def __init__(self, hub):
        self.hub = hub
        self.settings = hub.settings
        self.services = hub.services
        self.router = hub.router
        self.index = hub.router.index
        self.presence = hub.presence
        store = self.services.store
        # A burst of connects and subscribes shares round trips (web/hub/batch.py).
        self._claim = Batcher(store.claim_connections)
        self._last_id = Batcher(lambda calls: store.last_ids([channel for (channel,) in calls]))
        self._join = Batcher(self.presence.join_all)
        # Occupancy (web/hub/occupancy.py): every subscription counted, cluster-wide.
        self._count_join = Batcher(hub.occupancy.join_all)
        self._count_leave = Batcher(hub.occupancy.leave_all)

    # -- accepting ------------------------------------------------------------
    def accept(self, server) -> None:
        """Check a new WebSocket (flask-sock's, after its handshake), then hand it to the loop.

        Runs in the request's greenlet, which ends here: from now on the
        client costs no greenlet while it is idle.
        """
        # The trusted proxies' view (HERALD_TRUSTED_PROXIES, ProxyFix), an IPv6 client as its /64.
        remote = address_group(request.remote_addr or "")
        ws = WebSocket(server, self.settings.send_queue_size, self.settings.max_message_bytes,
                       self.settings.send_queue_bytes)
        if not self.hub.running:
            # Shutting down: send the client to another process now.
            ws.close(CLOSE_GOING_AWAY, "server going away")
            return
        authenticated = self._authenticate(ws, request.args.get("token"))
        if authenticated is None:
            return
        identity, since = authenticated
        client_id = new_id()
        try:
            over = self.claim(client_id, identity.user, remote)
        except redis.RedisError as exc:
            ws.close(CLOSE_TRY_AGAIN, "try again later")
            log.warning("ws refused: Redis unavailable", extra={"user": identity.user, "error": str(exc)})
            return
        if over:
            ws.close(CLOSE_RATE_LIMITED, "too many connections")
            log.info("ws refused: connection cap", extra={"user": identity.user, "remote": remote, "cap": over})
            return
        client = Client(client_id, ws, identity, remote, self.settings.ws_rate)
        ws.on_too_large = lambda: ws.close(CLOSE_TOO_LARGE, "frame too large")
        self.admit(client)
        ws.start(lambda raw: self._received(client, raw), lambda: gevent.spawn(self.drop, client))
        if self.hub.revocations.revoked(identity):
            # Revoked while this connect was under way: the command found no socket to close.
            ws.close(CLOSE_UNAUTHORIZED, REVOKED_REASON)
            log.info("ws closed: token revoked during connect", extra={"client": client.id, "user": identity.user})
            return
        # The token's channels, as if the client had subscribed (resuming after the
        # connect frame's `since`): queued before any frame it sends is read.
        if identity.channels:
            self._enqueue(client, ServerOp(identity.channels, True, since, BY_TOKEN))

    def claim(self, client_id: str, user: str, remote: str):
        """Count a new connection against its user's and address's caps, across all web processes;
        returns the cap it is over (then nothing was counted), or None. Raises redis.RedisError."""
        return self._claim(self.hub.member(client_id), user, remote)

    def admit(self, client: Client) -> None:
        """Make a claimed, authenticated client one of the hub's: registered, sent `connected`,
        and closed (4001) when its token expires. Its socket calls `drop` once closed."""
        ws, identity = client.ws, client.identity
        ws.on_overflow = lambda: _overflowed(client)
        self.hub.clients[client.id] = client
        WS_CONNECTIONS.inc()
        log.info("ws connected", extra={"client": client.id, "user": identity.user, "remote": client.remote})
        client.send({"op": "connected", "client": client.id, "user": identity.user,
                     "ping_interval": self.settings.ping_interval})
        if identity.expires is not None:
            # No polling: one loop timer per connection whose token expires.
            client.expiry = gevent.get_hub().loop.timer(max(0.0, identity.expires + LEEWAY_SECONDS - time.time())
                                                         + 0.05)
            client.expiry.start(ws.close, CLOSE_UNAUTHORIZED, "token expired")

    def _authenticate(self, ws: WebSocket, token):
        # One deadline from the upgrade: pings and parts of a frame do not
        # extend it, and nothing is answered before it is met.
        # Returns (identity, the connect frame's `since` map), or None once it closed the socket.
        ref = None
        since: dict = {}
        if token is None and self.settings.auth:
            raw = ws.read_message(time.monotonic() + CONNECT_TIMEOUT)
            if raw is None:
                ws.close(CLOSE_UNAUTHORIZED, "no connect frame in time")
                return None
            frame = _parse(raw)
            if not isinstance(frame, dict) or frame.get("op") != "connect":
                ws.close(CLOSE_UNAUTHORIZED, "first frame must be connect")
                return None
            token, ref = frame.get("token"), frame.get("ref")
            if not isinstance(token, str):
                ws.close(CLOSE_UNAUTHORIZED, "token must be a string")
                return None
            since = frame.get("since", {})
            if not self._valid_since(since):
                ws.close(CLOSE_POLICY, SINCE_MAP_PROBLEM)
                return None
        try:
            identity = verify(token, self.settings)
            self.hub.revocations.check(identity)
        except AuthError as exc:
            ws.close(CLOSE_UNAUTHORIZED, str(exc)[:120])
            log.info("ws unauthorized", extra={"error": str(exc), "ref": ref})
            return None
        except redis.RedisError as exc:  # the revocations could not be read
            ws.close(CLOSE_TRY_AGAIN, "try again later")
            log.warning("ws refused: revocations unavailable", extra={"error": str(exc), "ref": ref})
            return None
        return identity, since

    def _valid_since(self, since) -> bool:
        """A connect frame's `since`: at most HERALD_WS_MAX_SUBSCRIPTIONS channels, each to an offset."""
        return (isinstance(since, dict) and len(since) <= self.settings.ws_max_subscriptions
                and all(valid_channel(channel) and valid_stream_id(offset) for channel, offset in since.items()))

    # -- what the server does for a client --------------------------------------
    def by_server(self, client: Client, command) -> None:
        """Queue a server API `subscribe` or `unsubscribe` command's op for one of the user's clients."""
        subscribe = isinstance(command, SubscribeCommand)
        since = {command.channel: command.since} if subscribe and command.since is not None else {}
        self._enqueue(client, ServerOp((command.channel,), subscribe, since, BY_SERVER))

    def subscribe_all(self, client: Client, channels: tuple[str, ...], since: dict[str, str]) -> None:
        """Queue subscribes the client asked for outside any frame (an event stream's channels,
        resuming each in `since` after its offset), checked and answered as its own `subscribe`s."""
        self._enqueue(client, ServerOp(channels, True, since, None))

    def _enqueue(self, client: Client, op: ServerOp) -> None:
        if client.ws.closing:
            return
        client.inbox.append(op)
        if client.worker is None:
            client.worker = gevent.spawn(self._work, client)

    def _server_op(self, client: Client, op: ServerOp) -> None:
        for channel in op.channels:
            if client.ws.closing:
                return
            try:
                if op.subscribe:
                    current = client.subscriptions.get(channel)
                    if current is not None and channel not in op.since:
                        continue  # subscribed already, and no replay asked: nothing to do
                    fields: dict = {"op": "subscribe", "channel": channel}
                    if channel in op.since:
                        fields["since"] = op.since[channel]
                    if current is not None:  # a replay asked: the client's own options stay
                        fields.update(status=current.status, presence=current.presence)
                    self._subscribe(client, frames.Subscribe.model_validate(fields), None, by=op.by)
                elif channel in client.subscriptions:
                    self._unsubscribe(client, channel)
                    client.send({"op": "unsubscribed", "channel": channel, "by": op.by})
            except (Unavailable, AuthorizeUnavailable, Refused) as exc:
                log.warning("server op failed", extra={"client": client.id, "user": client.identity.user,
                                                       "channel": channel, "by": op.by, "error": str(exc)})
                if op.by is None and isinstance(exc, Refused):
                    # An event stream cannot ask again: its reconnect is answered 403.
                    client.ws.close(CLOSE_FORBIDDEN, str(exc)[:120])
                elif op.by != BY_SERVER and not isinstance(exc, Refused):
                    # Neither a token's channels nor an event stream's are asked for again:
                    # it reconnects, and resumes.
                    client.ws.close(CLOSE_TRY_AGAIN, "try again later")

    # -- frames ---------------------------------------------------------------
    def _received(self, client: Client, raw) -> None:
        # Called by the loop: nothing here may block.
        if not client.take_token(self.settings.ws_rate):
            client.ws.close(CLOSE_RATE_LIMITED, "too many frames")
            return
        if len(client.inbox) >= INBOX_FRAMES or client.inbox_size + len(raw) > self.settings.max_inbox_size:
            # Frames pile up behind an op that blocks: what waits is bounded.
            client.inbox.clear()
            client.inbox_size = 0
            client.ws.close(CLOSE_RATE_LIMITED, "too many frames waiting")
            log.info("ws inbox full", extra={"client": client.id, "user": client.identity.user})
            return
        client.inbox.append(raw)
        client.inbox_size += len(raw)
        if client.worker is None:
            client.worker = gevent.spawn(self._work, client)

    def _work(self, client: Client) -> None:
        try:
            while client.inbox and not client.ws.closing:
                raw = client.inbox.pop(0)
                client.inbox_size -= len(raw)
                self._frame(client, raw)
        finally:
            client.worker = None

    def _frame(self, client: Client, raw) -> None:
        if isinstance(raw, ServerOp):
            self._server_op(client, raw)
            return
        # A revoked token's socket is closed by the `revoke` command; a process that
        # missed it (its link was down) refuses the next frame here, from its copy.
        if self.hub.revocations.revoked(client.identity):
            client.ws.close(CLOSE_UNAUTHORIZED, REVOKED_REASON)
            log.info("ws closed: token revoked", extra={"client": client.id, "user": client.identity.user})
            return
        frame = _parse(raw)
        ref = frame.get("ref") if isinstance(frame, dict) else None
        try:
            if ref is not None and not _encodable(ref):
                ref = None  # a lone surrogate or 1e400 cannot be echoed
                raise BadFrame("ref must be JSON a reply can carry")
            self._handle(client, frame)
            client.bad = 0
        except (Unavailable, AuthorizeUnavailable, Refused) as exc:
            client.send(_with_ref({"op": "error", "code": error_code(exc), "message": str(exc)}, ref))
            # An outage says nothing about the client's frames (docs/protocol.md: "WebSocket close codes and errors").
            if isinstance(exc, Refused):
                client.bad += 1
                if client.bad >= MAX_BAD_FRAMES:
                    client.ws.close(CLOSE_FORBIDDEN if isinstance(exc, Forbidden) else CLOSE_POLICY,
                                    "too many bad frames")

    def _handle(self, client: Client, frame) -> None:
        if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
            raise BadFrame("a frame is a JSON object with an op")
        op, ref = frame["op"], frame.get("ref")
        if op == "connect":
            raise BadFrame("already connected")
        model = CLIENT_OPS.get(op)
        if model is None:
            raise BadFrame(f"unknown op {op!r}")
        # The models of web/hub/frames.py, which the AsyncAPI document shows, validate.
        try:
            parsed = model.model_validate(frame)
        except PydanticError as exc:
            raise _refusal(op, field_errors(exc)) from None
        if isinstance(parsed, frames.Ping):
            client.send(_with_ref({"op": "pong"}, ref))
        elif isinstance(parsed, frames.Subscribe):
            self._subscribe(client, parsed, ref)
        elif isinstance(parsed, frames.Unsubscribe):
            self._unsubscribe(client, parsed.channel)
            client.send(_with_ref({"op": "unsubscribed", "channel": parsed.channel}, ref))
        else:
            self._publish(client, parsed, ref)

    # -- subscribe and resume -------------------------------------------------
    def _subscribe(self, client: Client, frame: frames.Subscribe, ref, by: str | None = None) -> None:
        channel = frame.channel
        # `by`: the server (or the token's `channels`) subscribes the client; it decides, not the globs.
        if by is None and not self.services.permissions.allows(client.identity, SUBSCRIBE, channel):
            raise Forbidden(f"this token may not subscribe to {channel}")
        limit = self.settings.ws_max_subscriptions
        if channel not in client.subscriptions and len(client.subscriptions) >= limit:
            raise TooManySubscriptions(f"at most {limit} subscriptions per connection (HERALD_WS_MAX_SUBSCRIPTIONS)")
        since = frame.since
        if since is not None and not valid_stream_id(since):  # each part below 2**64, as Redis requires
            raise BadFrame(SINCE_PROBLEM)
        size = self._replay_page()
        sub = Subscription(client.ws, status=frame.status, presence=frame.presence, hold=size,
                           hold_bytes=self.settings.history_page_bytes)
        names = self.router.names(channel, sub)
        # The resume seam. Registered first, the subscription holds live
        # frames; then Redis confirms the SUBSCRIBE of the channel's pub/sub
        # channel (join() returns once the listener read the confirmation, or
        # at once when this process was subscribed already); only then is
        # history read. A message is added to history and published in one
        # Lua script (docs/design.md: "Delivery guarantees"), so one published before
        # the SUBSCRIBE took effect is in the history read, one published
        # after reaches the listener, and `last` drops what is in both. Read
        # before the confirmation, history would miss a message published
        # in between, and the live flow would not have it either.
        previous = self.index.attach(client, channel, sub)
        try:
            self.router.join(names)
            try:
                if self.settings.ephemeral(channel):
                    # No history to read, nor trimmed: a `since` replays nothing, and there
                    # is no gap to report (docs/protocol.md: "Ephemeral messages").
                    replay, recovered, more = [], True, False
                elif since:
                    page = self.services.history(channel, since, size)
                    replay, recovered, more = page["messages"], page["recovered"], page["next"] is not None
                    sub.last = stream_id_key(replay[-1]["offset"]) if replay else stream_id_key(since)
                else:
                    replay, recovered, more = [], True, False
                    newest = self._last_id(channel)
                    sub.last = stream_id_key(newest) if newest else (-1, -1)
            except HISTORY_ERRORS:
                self.router.leave(names)
                raise
            offset = _format_sid(sub.last)
        except HISTORY_ERRORS as exc:
            log.warning("subscribe failed: history unavailable",
                        extra={"client": client.id, "channel": channel, "error": str(exc)})
            if previous is not None:
                self.index.attach(client, channel, previous)
            else:
                self.index.detach(client, channel)
            raise Unavailable("history is unavailable, retry") from None
        if previous is not None:
            self.router.leave(self.router.names(channel, previous))
        else:  # a subscribe that replaces one counts once
            try:
                self._count_join(client.id, channel, client.identity.user)
            except redis.RedisError as exc:
                log.warning("subscription not counted", extra={"client": client.id, "channel": channel,
                                                               "error": str(exc)})
        reply = {"op": "subscribed", "channel": channel, "offset": offset, "recovered": recovered,
                 "replayed": len(replay)}
        if more:
            reply["more"] = True  # `replayed` and `offset` count the first page; more pages follow
        if by is not None:
            reply["by"] = by
        client.send(_with_ref(reply, ref))
        self._replay(client, channel, sub, replay, more)
        # Presence only for `presence: true` (web/hub/frames.py).
        was_present = previous is not None and previous.presence
        if sub.presence and not was_present:
            self._join(client, channel)
        elif was_present and not sub.presence:
            self.presence.leave(client, channel)

    def _replay_page(self) -> int:
        # The replay waits for an empty send queue before each page, and sends
        # a message per push: more messages than the queue holds pushes would
        # overflow it (4008) by themselves. In bytes, the history script ends a
        # page before the message that would take it past
        # HERALD_HISTORY_PAGE_BYTES (a first message larger than that is a page
        # alone), and settings refuse a HERALD_SEND_QUEUE_BYTES under twice
        # that budget: a page of several messages takes at most half the queue
        # (give or take a frame's head and offset per message).
        return min(self.settings.ws_replay_page, self.settings.send_queue_size)

    def _replay(self, client: Client, channel: str, sub: Subscription, page: list, more: bool) -> None:
        """Send history page by page, each once the client has taken the last
        (docs/configuration.md: HERALD_WS_REPLAY_PAGE), then the live frames held meanwhile.

        A client that does not take a page within REPLAY_WAIT is closed 4008:
        it holds its own op greenlet no longer than that."""
        while True:
            for message in page:
                client.send(message)
            if not more and _go_live(sub):
                return
            if not client.ws.wait_drained(REPLAY_WAIT):
                client.ws.close(CLOSE_TOO_SLOW, "too slow")  # no-op when it is closing already
                return
            try:
                rest = self.services.history(channel, _format_sid(sub.last), self._replay_page())
            except HISTORY_ERRORS as exc:
                log.warning("replay failed: history unavailable",
                            extra={"client": client.id, "channel": channel, "error": str(exc)})
                client.ws.close(CLOSE_TRY_AGAIN, "try again later")  # the client resumes from its last offset
                return
            if not rest["recovered"]:
                # Trimmed past what we sent while the client read: a gap. Resuming
                # tells the client so (`recovered: false`).
                client.ws.close(CLOSE_TOO_SLOW, "too slow")
                return
            page, more = rest["messages"], rest["next"] is not None
            if page:
                sub.last = stream_id_key(page[-1]["offset"])
            log.debug("replay page", extra={"client": client.id, "channel": channel, "messages": len(page)})

    def _unsubscribe(self, client: Client, channel: str, count: bool = True) -> bool:
        """End a subscription (False when there was none); `count`: take it off the occupancy
        counts now (a closing client's are taken off together, by `drop`)."""
        sub = self.index.detach(client, channel)
        if sub is None:
            return False
        self.router.leave(self.router.names(channel, sub))
        if sub.presence:
            self.presence.leave(client, channel)
        if count:  # a leave Redis refuses is kept and tried again (web/hub/occupancy.py)
            self._count_leave(client.id, client.identity.user, [channel], None)
        return True

    # -- publish --------------------------------------------------------------
    def _publish(self, client: Client, frame: frames.PublishOp, ref) -> None:
        envelope = parse_publish(frame, sender=client.identity.user, max_bytes=self.settings.max_message_bytes)
        if not self.services.permissions.allows(client.identity, PUBLISH, envelope.channel):
            raise Forbidden(f"this token may not publish to {envelope.channel}")
        try:
            if ephemeral(self.settings, frame):
                answer = self.services.ingest.send(envelope, idempotent=frame.id is not None)
            else:
                answer = self.services.ingest.publish(envelope, idempotent=frame.id is not None,
                                                      origin=self.hub.member(client.id), request_id=new_id())
        except Refused:
            raise
        except HeraldError as exc:
            # Its text names internal hosts: logged, not sent (docs/protocol.md: "WebSocket close codes and errors").
            log.warning("ws publish refused: service unavailable", extra={"client": client.id, "error": str(exc)})
            raise Unavailable("the message was not accepted, retry later") from None
        client.send(_with_ref({"op": "ack", "id": answer["id"], "status": answer["status"]}, ref))

    # -- closing --------------------------------------------------------------
    def drop(self, client: Client) -> None:
        """Forget a closed client: its subscriptions, presence, occupancy and connection count,
        and append its `connection.closed` event."""
        worker = client.worker
        if worker is not None:
            # An op under way (a subscribe waiting on Redis) finishes first:
            # what it still adds is then removed here, not left for ever.
            worker.join(DROP_WAIT)
        if client.expiry is not None:
            client.expiry.stop()
            client.expiry.close()
        left = [channel for channel in list(client.subscriptions) if self._unsubscribe(client, channel, count=False)]
        ws = client.ws
        closing = self.hub.occupancy.closed_event(client.id, client.identity.user, ws.close_code or ABNORMAL_CLOSURE,
                                                  ws.close_reason)
        if left or closing is not None:
            # One batched call a client: 10,000 sockets closing at once cost few round trips. A
            # leave Redis refuses is kept and tried again; the closed event goes out regardless.
            self._count_leave(client.id, client.identity.user, left, closing)
        if self.hub.clients.pop(client.id, None) is not None:
            WS_CONNECTIONS.dec()
        try:
            self.services.store.release_connection(self.hub.member(client.id), client.identity.user, client.remote)
        except redis.RedisError:
            log.warning("connection not uncounted", extra={"client": client.id})  # it lapses after the TTL
        log.info("ws disconnected", extra={"client": client.id, "user": client.identity.user})


def _overflowed(client: Client) -> None:
    SLOW_CLOSES.inc()
    log.warning("send queue overflow", extra={"client": client.id, "user": client.identity.user})


def _go_live(sub: Subscription) -> bool:
    """After history's end: send the held live frames that are newer and go live;
    False when they overflowed meanwhile (then history is read on)."""
    while sub.backlog and not sub.overflowed:
        key, live = sub.backlog.pop(0)
        if key is None:  # ephemeral: in no history, so never replayed
            sub.ws.push(live)
        elif key > sub.last:
            sub.last = key
            sub.ws.push(live)
    sub.held = 0
    if sub.overflowed:
        sub.overflowed = False  # hold again from here; what was dropped is read from history
        return False
    sub.backlog = None  # no switch since the check above: nothing falls in between
    return True


def _parse(raw):
    if raw is None:
        return None
    try:
        return loads(raw)
    except (TypeError, ValueError, RecursionError):
        return None


def _encodable(value) -> bool:
    """Whether a reply can carry `value` (strict JSON, UTF-8)."""
    try:
        dumps(value)
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return False
    return True


def _refusal(op: str, errors: list[dict]) -> InvalidInput:
    """The error an op whose frame breaks its model gets: `bad_channel`, the message's
    `invalid_message` (as HTTP's 422), or `bad_frame` naming each fault."""
    fields = {error["field"] for error in errors}
    if "channel" in fields:
        return BadChannel(CHANNEL_PROBLEM)
    if op == "publish":
        return InvalidInput("The message has invalid fields", errors)
    if fields == {"since"}:
        return BadFrame(SINCE_PROBLEM)
    return BadFrame("; ".join(f"{e['field']}: {e['problem']}" for e in errors))


def _with_ref(frame: dict, ref) -> dict:
    if ref is not None:
        frame["ref"] = ref
    return frame
