"""The WebSocket hub: `/ws` connections in this process, fed by one Redis pub/sub listener.

Workers PUBLISH each frame once, already encoded; the router turns it into
WebSocket bytes once and writes them to every local subscriber whose socket
takes them at once. What a socket cannot take waits in that connection's
send queue, bounded in frames and bytes, so a slow client never holds up the
others (it is closed with 4008 when its queue overflows; docs/protocol.md: "WebSocket
limits"). The parts:

- `transport`: each socket, read and written by gevent's loop (no greenlet per idle connection);
- `router`: the local channel index, and the pub/sub listener feeding it;
- `protocol`: the handshake's checks and the ops;
- `errors`: the hub's refusals, and the one table of their WebSocket error codes;
- `presence`: who is in a channel, this node's heartbeat, and reaping dead nodes' entries;
- `occupancy`: subscriptions counted cluster-wide, and their webhook events;
- `control`: the server API's commands (disconnect, subscribe a user, revoke), read on the control channel;
- `batch`: one Redis round trip for a burst of connects and subscribes;
- `frames`: the protocol's frames as models, and its AsyncAPI document;
- `sse`: `/sse`, the same subscriptions as a Server-Sent Events stream.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit

import gevent
import redis
from flask import request
from flask_sock import Sock

from pipeline.core.messages import origin_of
from pipeline.store.keys import Keys
from web.hub import sse
from web.hub.control import Control
from web.hub.occupancy import Occupancy
from web.hub.presence import Presence
from web.hub.protocol import CLOSE_GOING_AWAY, Protocol
from web.hub.router import Router
from web.hub.transport import NoThread
from web.problems import problem

log = logging.getLogger("herald.hub")

SHUTDOWN_WAIT = 5.0  # seconds a stopping process waits for its clients' close frames to go out


class Clients(dict):
    """This process's clients by id, indexed also by user and by token id as they are added
    and removed, so that a server API command finds a user's sockets without a walk over all."""

    def __init__(self):
        super().__init__()
        self._users: dict[str, dict[str, object]] = {}
        self._tokens: dict[str, dict[str, object]] = {}

    def __setitem__(self, client_id, client) -> None:
        super().__setitem__(client_id, client)
        self._users.setdefault(client.identity.user, {})[client_id] = client
        if client.identity.jti is not None:
            self._tokens.setdefault(client.identity.jti, {})[client_id] = client

    def pop(self, client_id, default=None):
        """Remove a client from the map and from both indexes; `default` when it is not there."""
        client = super().pop(client_id, None)
        if client is None:
            return default
        _unindex(self._users, client.identity.user, client_id)
        if client.identity.jti is not None:
            _unindex(self._tokens, client.identity.jti, client_id)
        return client

    def of_user(self, user: str) -> list:
        """The user's live clients in this process."""
        return list(self._users.get(user, {}).values())

    def of_token(self, jti: str) -> list:
        """The live clients in this process connected with the token `jti`."""
        return list(self._tokens.get(jti, {}).values())


def _unindex(index: dict, key: str, client_id: str) -> None:
    entries = index.get(key)
    if entries is not None:
        entries.pop(client_id, None)
        if not entries:
            del index[key]


class Hub:
    """This process's clients, router, protocol, presence, and the server API's control."""

    def __init__(self, services):
        self.services = services
        self.settings = services.settings
        self.node = self.settings.node_id
        self.clients = Clients()
        self.running = False
        self.occupancy = Occupancy(services.store, services.outbox, self.settings, self.node)
        self.presence = Presence(services.store, self.settings, self.node, self.occupancy)
        self.revocations = services.revocations
        self.control = Control(self)
        self.router = Router(self.settings, Keys(self.settings.redis_prefix, self.settings.redis_cluster), self.node,
                             self.clients, services.store.history, on_control=self.control.handle,
                             on_connect=self._linked)
        self.protocol = Protocol(self)

    def start(self) -> None:
        """Start the listener, the pinger and the heartbeat (once per process)."""
        if self.running:
            return
        self.running = self.router.running = True
        threading.Thread(target=self.router.run, name="hub-listener", daemon=True).start()
        threading.Thread(target=self._ping, name="hub-pinger", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="hub-heartbeat", daemon=True).start()
        self.occupancy.start()

    def shutdown(self) -> None:
        """Close every connection with 1001 so clients reconnect to another process, and wait
        (a few seconds at most) until they are closed."""
        self.running = self.router.running = False
        for client in list(self.clients.values()):
            client.ws.close(CLOSE_GOING_AWAY, "server going away")
        deadline = time.monotonic() + SHUTDOWN_WAIT
        while self.clients and time.monotonic() < deadline:
            gevent.sleep(0.05)

    def _linked(self, reconnecting: bool) -> None:
        # The control channel is subscribed: read the revocations now, and
        # close the sockets of those published while the link was down.
        self.revocations.load()
        if reconnecting:
            closed = self.control.close_revoked()
            if closed:
                log.info("revoked sockets closed after reconnect", extra={"sockets": closed})

    def member(self, client_id: str) -> str:
        """The client's name in the cluster-wide connection counts."""
        return origin_of(self.node, client_id)

    def _ping(self) -> None:
        # One pass over every client per interval: a client that left the last
        # ping unanswered is closed (1008), as a dead network never says so.
        while self.running:
            time.sleep(self.settings.ping_interval)
            for client in list(self.clients.values()):
                client.ws.ping()

    def _heartbeat(self) -> None:
        while self.running:
            try:
                self.presence.beat([(self.member(c.id), c.identity.user, c.remote)
                                    for c in list(self.clients.values())])
            except redis.RedisError as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            time.sleep(self.presence.period)


def init_app(app, services) -> Hub:
    """Mount `/ws` on the app and attach this process's Hub to the services."""
    hub = Hub(services)
    services.hub = hub
    # The hub reads the sockets itself, from gevent's loop (web.hub.transport).
    app.config.setdefault("SOCK_SERVER_OPTIONS", {})["thread_class"] = NoThread
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
        hub.protocol.accept(ws)

    sse.init_app(app, hub)

    return hub


def origin_allowed(origin: str, host: str, allowed) -> bool:
    """Same-origin, or listed in HERALD_CORS_ORIGINS."""
    origin = origin.rstrip("/")
    return origin in allowed or urlsplit(origin).netloc == host
