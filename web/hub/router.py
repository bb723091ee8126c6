"""The hub's router: the local channel index, and the Redis pub/sub listener that feeds it.

A web process SUBSCRIBEs to a pub/sub channel when its first local
subscriber arrives and UNSUBSCRIBEs after the last one leaves, so it receives
only the messages of its own subscribers: with a PSUBSCRIBE to every channel,
each process would parse every message of the cluster. On a Redis
Cluster the link is sharded (pipeline/store/pubsub.py): SSUBSCRIBE on the node of
each channel's slot.

Fan-out reads every pub/sub message Redis has already sent (up to
`BATCH`) and writes consecutive frames of one channel to each live
subscriber in one send: under a burst the cost per delivery is a comparison
and a share of one syscall, not a call chain per frame.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from prometheus_client import Counter

from pipeline.core.messages import dumps, loads
from pipeline.core.metrics import FRAMES_SENT
from pipeline.core.streamids import key as stream_id_key
from pipeline.store.keys import split_routed
from pipeline.store.pubsub import open_link
from web.hub.transport import wire_frame

log = logging.getLogger("herald.hub")

RECEIVED = Counter("herald_hub_pubsub_messages_total", "Pub/sub messages this process's hub listener received")
CONFIRM_TIMEOUT = 5.0  # seconds a subscribe waits for Redis to confirm its channel
BATCH = 500  # pub/sub messages read before fanning out (all that are already buffered, up to this)


class Subscription:
    """One client's interest in one channel, with the resume seam state."""

    __slots__ = ("ws", "status", "presence", "last", "backlog", "hold", "hold_bytes", "held", "overflowed")

    def __init__(self, ws, status: bool, presence: bool, hold: int, hold_bytes: int):
        self.ws = ws
        self.status = status
        self.presence = presence
        self.last = (-1, -1)      # newest stream id sent, to skip duplicates at the seam
        self.backlog: list | None = []  # live frames held while history is replayed
        self.hold = hold          # at most this many of them,
        self.hold_bytes = hold_bytes  # and this many bytes
        self.held = 0             # bytes held now
        self.overflowed = False   # more came: they were dropped, and are read from history

    def offer(self, key: tuple[int, int] | None, frame: bytes) -> None:
        """Send a message frame (`key`: its parsed offset, None for an ephemeral message) unless
        the replay already sent it."""
        if self.backlog is not None:
            # An ephemeral frame is held too, in its place among the others, so that
            # nothing comes before the `subscribed` reply and the replay; if the
            # backlog overflows it is lost with them, and history does not have it.
            # A frame is in history before it is published (one Lua script,
            # docs/design.md: "Delivery guarantees"), so a replay that falls behind the
            # live flow drops what it holds and reads it from history instead.
            if self.overflowed:
                return
            if len(self.backlog) >= self.hold or self.held + len(frame) > self.hold_bytes:
                self.backlog.clear()
                self.held = 0
                self.overflowed = True
                return
            self.backlog.append((key, frame))
            self.held += len(frame)
            return
        if key is None:
            self.ws.push(frame)
        elif key > self.last:
            self.last = key
            self.ws.push(frame)


class Index:
    """Which local clients hear which channel: message subscribers, and those asking for
    status ("s") or presence ("p") frames, so that a join among 10,000 subscribers is
    not a walk over all of them."""

    def __init__(self):
        self.channels: dict[str, dict[str, Subscription]] = {}
        self.watchers: dict[str, dict[str, dict[str, Subscription]]] = {"s": {}, "p": {}}

    def attach(self, client, channel: str, sub: Subscription) -> Subscription | None:
        """Index `sub` in place of the client's earlier one on `channel`, which is returned."""
        previous = client.subscriptions.get(channel)
        client.subscriptions[channel] = sub
        self.channels.setdefault(channel, {})[client.id] = sub
        for kind, wanted in (("s", sub.status), ("p", sub.presence)):
            if wanted:
                self.watchers[kind].setdefault(channel, {})[client.id] = sub
            else:
                _discard(self.watchers[kind], channel, client.id)
        return previous

    def detach(self, client, channel: str) -> Subscription | None:
        """Remove the client's subscription from every index; returns it (None if it had none)."""
        sub = client.subscriptions.pop(channel, None)
        for index in (self.channels, *self.watchers.values()):
            _discard(index, channel, client.id)
        return sub


class Router:
    """Reference-counted pub/sub subscriptions on one connection, the listener reading it,
    and the fan-out of what it reads to the local clients in `index`.

    After a reconnect, once every channel in use is subscribed again and
    before any message read since, each channel is caught up from history
    (docs/design.md: "Under faults", the hub catches up from history).
    """

    def __init__(self, settings, keys, node: str, clients: dict, history, *, on_control=None, on_connect=None):
        self.settings = settings
        self.keys = keys
        self.node_channel = keys.node_channel(node)
        # Subscribed always, beside the node channel: the server API's commands (web/hub/control.py).
        self.control_channel = keys.control_channel
        self._on_control = on_control or (lambda payload: None)
        # Called once both are confirmed (at start and after each reconnect), before any message is read on.
        self._on_connect = on_connect or (lambda reconnecting: None)
        self.index = Index()
        self._clients = clients                        # client id -> the hub's Client
        self._history = history                        # store.history
        self._kinds: dict[str, tuple[str, str]] = {}   # pub/sub channel -> (kind, channel), for names in use
        self._users: dict[str, int] = {}               # pub/sub channel -> local subscriptions using it
        self._ready: dict[str, threading.Event] = {}   # set once Redis confirmed the channel
        self._unconfirmed: dict[str, int] = {}         # commands sent on this connection, not yet answered
        self._link = None                              # None while (re)connecting
        self._down = False                             # the last connection failed: do not wait for it
        self._lock = threading.Lock()
        self.running = False

    def names(self, channel: str, sub: Subscription) -> list[str]:
        """The pub/sub channels `sub` needs: the messages, and status and presence if it asked."""
        wanted = [("m", self.keys.message_channel(channel))]
        if sub.status:
            wanted.append(("s", self.keys.status_channel(channel)))
        if sub.presence:
            wanted.append(("p", self.keys.presence_channel(channel)))
        for kind, name in wanted:
            self._kinds[name] = (kind, channel)
        return [name for _, name in wanted]

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
                    self._kinds.pop(name, None)
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
        link.send(True, [self.node_channel, self.control_channel])
        with self._lock:
            self._unconfirmed = {self.node_channel: 1, self.control_channel: 1}
            self._link = link
            waiting = {self.node_channel, self.control_channel, *self._users}
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
        self._on_connect(reconnecting)
        if reconnecting:
            self._catch_up()
        log.info("hub listening", extra={"node": self.node_channel, "channels": len(self._users)})
        if held:
            self._receive(held)

    def _listen(self, link) -> None:
        while self.running:
            self._check(link)
            item = link.get_message(timeout=1.0)
            if item is None:
                continue
            batch = [item]
            while len(batch) < BATCH:
                item = link.get_message(timeout=0.0)
                if item is None:
                    break
                batch.append(item)
            self._receive(batch)
            # Let the loop drain the sockets between batches: a burst (a
            # worker delivers a whole batch at once) must not overflow the
            # queues of clients that do read.
            time.sleep(0)

    def _check(self, link) -> None:
        if self._link is not link:
            raise redis.ConnectionError("a pub/sub command could not be sent")

    def _receive(self, batch: list[dict]) -> None:
        """Fan out a batch in order; consecutive messages of one pub/sub channel go as one run."""
        start = 0
        while start < len(batch):
            item = batch[start]
            if item["type"] != "message":
                self._confirmed(item)
                start += 1
                continue
            end = start + 1
            name = item["channel"]
            while end < len(batch) and batch[end]["type"] == "message" and batch[end]["channel"] == name:
                end += 1
            RECEIVED.inc(end - start)
            try:
                self._fan_out(name, [one["data"] for one in batch[start:end]])
            except Exception:  # one bad message must not cost every channel its listener
                log.exception("hub skipped a bad pub/sub message", extra={"channel": name})
            start = end

    def _fan_out(self, name: str, payloads: list[str]) -> None:
        if name == self.node_channel:
            for payload in payloads:
                self._to_client(payload)
            return
        if name == self.control_channel:
            for payload in payloads:
                self._on_control(payload)
            return
        kind, channel = self._kinds.get(name, ("", ""))
        if kind == "m":
            subs = self.index.channels.get(channel)
            if subs:
                frames = [split_routed(payload) for payload in payloads]
                # An ephemeral message has no stream id (pipeline/store/keys.py: routed payloads).
                self.send_messages(subs, [stream_id_key(sid) if sid else None for sid, _ in frames],
                                   [wire_frame(frame) for _, frame in frames])
        elif kind:
            watchers = self.index.watchers[kind].get(channel)
            if watchers:
                data = b"".join(wire_frame(payload) for payload in payloads)
                pushed = 0
                for sub in list(watchers.values()):
                    if sub.backlog is None:
                        sub.ws.push(data)
                        pushed += 1
                FRAMES_SENT.inc(pushed * len(payloads))

    @staticmethod
    def send_messages(subs: dict[str, Subscription], keys: list, frames: list[bytes]) -> None:
        """Send a channel's message frames, in offset order, to each of its subscribers.

        A live subscriber that has none of them yet gets them all in one
        send; one replaying history, or resuming at the seam, gets each
        frame it lacks. An ephemeral frame (key None) has no offset to order
        or drop it by: every live subscriber gets it.
        """
        stored = [key for key in keys if key is not None]
        first, last = (stored[0], stored[-1]) if stored else (None, None)
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        targets = list(subs.values())
        for sub in targets:
            if sub.backlog is None and (first is None or sub.last < first):
                if last is not None:
                    sub.last = last
                sub.ws.push(data)
            else:
                for key, frame in zip(keys, frames):
                    sub.offer(key, frame)
        # One increment per fan-out, not per frame (a replaying subscriber may skip some it had).
        FRAMES_SENT.inc(len(targets) * len(frames))

    def _to_client(self, payload: str) -> None:
        # A frame for one client (its own message's status): skipped when the
        # client hears the channel's status frames anyway.
        client_id, frame = split_routed(payload)
        client = self._clients.get(client_id)
        if client is not None:
            sub = client.subscriptions.get(loads(frame).get("channel"))
            if sub is None or not sub.status:
                client.ws.push(wire_frame(frame))
                FRAMES_SENT.inc()

    def _catch_up(self) -> None:
        for channel, subs in list(self.index.channels.items()):
            since = min(sub.last for sub in subs.values())
            cursor = f"{since[0]}-{since[1]}" if since >= (0, 0) else "0-0"
            # Page by page: a page is bounded in bytes (HERALD_HISTORY_PAGE_BYTES), not only in count,
            # and goes to a live subscriber as one write, however many frames it holds.
            while cursor is not None:
                page = self._history(channel, cursor, self.settings.retention(channel)[0])
                messages = page["messages"]
                if messages:
                    self.send_messages(subs, [stream_id_key(m["offset"]) for m in messages],
                                       [wire_frame(dumps(m)) for m in messages])
                cursor = page["next"]
        log.info("hub caught up after reconnect", extra={"channels": len(self.index.channels)})

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


def _discard(index: dict, channel: str, client: str) -> None:
    subs = index.get(channel)
    if subs is not None:
        subs.pop(client, None)
        if not subs:
            del index[channel]
