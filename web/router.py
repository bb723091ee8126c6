"""The hub's Redis side: one pub/sub connection per process, subscribed only to the channels in use here.

A web process SUBSCRIBEs to a pub/sub channel when its first local
subscriber arrives and UNSUBSCRIBEs after the last one leaves, so it receives
only the messages of its own subscribers: with a PSUBSCRIBE to every channel,
each process parsed every message of the cluster (issue 10). On a Redis
Cluster the link is sharded (pipeline/pubsub.py): SSUBSCRIBE on the node of
each channel's slot.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from prometheus_client import Counter

from pipeline.pubsub import open_link

log = logging.getLogger("herald.hub")

RECEIVED = Counter("herald_hub_pubsub_messages_total", "Pub/sub messages this process's hub listener received")
CONFIRM_TIMEOUT = 5.0  # seconds a subscribe waits for Redis to confirm its channel


class Router:
    """Reference-counted pub/sub subscriptions on one connection, and the listener reading it.

    `deliver(item)` gets each pub/sub message, in the order Redis sent them;
    `catch_up()` runs after a reconnect, once every channel in use is
    subscribed again and before any message read since (README: the hub
    catches up from history).
    """

    def __init__(self, settings, node_channel: str, deliver, catch_up):
        self.settings = settings
        self.node_channel = node_channel
        self._deliver = deliver
        self._catch_up = catch_up
        self._users: dict[str, int] = {}               # pub/sub channel -> local subscriptions using it
        self._ready: dict[str, threading.Event] = {}   # set once Redis confirmed the channel
        self._unconfirmed: dict[str, int] = {}         # commands sent on this connection, not yet answered
        self._link = None                              # None while (re)connecting
        self._down = False                             # the last connection failed: do not wait for it
        self._lock = threading.Lock()
        self.running = False

    def join(self, names: list[str]) -> None:
        """Count one more local user of each pub/sub channel; return once Redis confirmed each.

        Raises redis.RedisError (having counted nothing) when it cannot: the
        caller answers `unavailable`.
        """
        with self._lock:
            new = []
            for name in names:
                self._users[name] = self._users.get(name, 0) + 1
                if self._users[name] == 1:
                    self._ready[name] = threading.Event()
                    new.append(name)
            if new:
                self._send(True, new)
            events = [self._ready[name] for name in names]
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        for event in events:
            if event.is_set():
                continue
            if self._down or not event.wait(max(0.0, deadline - time.monotonic())):
                self.leave(names)
                raise redis.ConnectionError("the hub's pub/sub subscription was not confirmed")

    def leave(self, names: list[str]) -> None:
        """Count one user less of each pub/sub channel; unsubscribe those nobody here uses."""
        with self._lock:
            gone = []
            for name in names:
                users = self._users.get(name, 0) - 1
                if users > 0:
                    self._users[name] = users
                else:
                    self._users.pop(name, None)
                    self._ready.pop(name, None)
                    gone.append(name)
            if gone:
                self._send(False, gone)

    def _send(self, subscribe: bool, names: list[str]) -> None:
        # Called with the lock held.
        link = self._link
        if link is None:
            return  # the listener subscribes every channel in use once it is connected
        for name in names:
            self._unconfirmed[name] = self._unconfirmed.get(name, 0) + 1
        try:
            link.send(subscribe, names)
        except (redis.RedisError, OSError) as exc:
            log.warning("hub pub/sub command failed", extra={"subscribe": subscribe, "error": str(exc)})
            self._link = None  # the listener sees it and starts over

    # -- the listener --------------------------------------------------------
    def run(self) -> None:
        """Listen until stopped, reconnecting with a doubling delay (capped at 5 s)."""
        delay = 0.1
        reconnecting = False
        while self.running:
            link = None
            try:
                link = open_link(self.settings)
                self._connect(link, reconnecting)
                self._down = False
                delay = 0.1
                reconnecting = True
                self._listen(link)
            except (redis.RedisError, OSError) as exc:
                self._down = True
                log.warning("hub listener lost Redis, reconnecting", extra={"error": str(exc), "delay": delay})
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._link = None
                if link is not None:
                    link.close()

    def _connect(self, link, reconnecting: bool) -> None:
        link.send(True, [self.node_channel])
        with self._lock:
            self._unconfirmed = {self.node_channel: 1}
            self._link = link
            waiting = {self.node_channel, *self._users}
            if self._users:
                self._send(True, list(self._users))
        # Messages read before every channel is confirmed wait behind the
        # catch-up: history first, then these, so order holds.
        held = []
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while waiting:
            self._check(link)
            if time.monotonic() > deadline:
                raise redis.TimeoutError("pub/sub subscriptions not confirmed")
            item = link.get_message(timeout=1.0)
            if item is None:
                continue
            if item["type"] == "message":
                held.append(item)
            else:
                self._confirmed(item)
                if item["type"] == "subscribe":
                    waiting.discard(item["channel"])
        if reconnecting:
            self._catch_up()
        log.info("hub listening", extra={"node": self.node_channel, "channels": len(self._users)})
        for item in held:
            self._receive(item)

    def _listen(self, link) -> None:
        while self.running:
            self._check(link)
            item = link.get_message(timeout=1.0)
            if item is None:
                continue
            if item["type"] == "message":
                self._receive(item)
                # Let the writers drain between frames: a burst (a worker
                # delivers a whole batch at once) must not overflow the
                # queues of clients that do read.
                time.sleep(0)
            else:
                self._confirmed(item)

    def _check(self, link) -> None:
        if self._link is not link:
            raise redis.ConnectionError("a pub/sub command could not be sent")

    def _receive(self, item: dict) -> None:
        RECEIVED.inc()
        try:
            self._deliver(item)
        except Exception:  # one bad message must not cost every channel its listener (issue 10)
            log.exception("hub skipped a bad pub/sub message", extra={"channel": item["channel"]})

    def _confirmed(self, item: dict) -> None:
        # A channel left and joined again before Redis answered has several
        # commands in flight: it is subscribed only once the last is answered.
        name = item["channel"]
        pending = self._unconfirmed.get(name, 0) - 1
        if pending > 0:
            self._unconfirmed[name] = pending
            return
        self._unconfirmed.pop(name, None)
        if item["type"] == "subscribe" and name in self._ready:
            self._ready[name].set()
