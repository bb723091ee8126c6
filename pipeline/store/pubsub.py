"""A subscriber's Redis pub/sub connection(s): plain on one Redis, sharded on a cluster.

A link subscribes and unsubscribes pub/sub channels built by `Keys` and reads
their messages. It never resubscribes by itself: whoever uses it starts a new
link after an error, and catches up from history (web/hub/router.py). Messages
come as redis-py gives them, with the sharded kinds renamed to the plain ones
(`smessage` -> `message`, `ssubscribe` -> `subscribe`, `sunsubscribe` ->
`unsubscribe`), so the reader is the same in both modes.
"""

from __future__ import annotations

import collections
import select
import socket
from typing import Any

import redis

from pipeline.core.settings import Settings
from pipeline.store.client import connect

# A message or confirmation as redis-py gives it: {"type", "channel", "data", ...}.
Item = dict[str, Any]

_PLAIN = {"smessage": "message", "ssubscribe": "subscribe", "sunsubscribe": "unsubscribe"}


def open_link(settings: Settings) -> Link | ShardedLink:
    """A new, unconnected link to the main Redis."""
    return ShardedLink(settings) if settings.redis_cluster else Link(settings)


class Link:
    """One pub/sub connection to a single Redis: SUBSCRIBE and UNSUBSCRIBE."""

    def __init__(self, settings: Settings) -> None:
        client: Any = connect(settings, 1)  # a single node's client (redis-py's pubsub is untyped)
        self._client = client
        self._pubsub = client.pubsub()

    def send(self, subscribe: bool, names: list[str]) -> None:
        """Ask for (or stop) `names`; the confirmations come through get_message()."""
        command = "SUBSCRIBE" if subscribe else "UNSUBSCRIBE"
        if self._pubsub.connection is None:
            self._pubsub.subscribe(*names)  # makes the connection
        else:
            # Straight on the connection: PubSub.subscribe() would reconnect a
            # broken one by itself, resubscribing without the catch-up.
            self._pubsub.connection.send_command(command, *names, check_health=False)

    def get_message(self, timeout: float) -> Item | None:
        """The next message or confirmation, or None after `timeout` seconds."""
        item: Item | None = self._pubsub.get_message(timeout=timeout)
        return item

    def close(self) -> None:
        """Drop the connection."""
        try:
            self._pubsub.close()
            self._client.close()
        except (redis.RedisError, OSError):
            pass


class ShardedLink:
    """One pub/sub connection per cluster node in use: SSUBSCRIBE and SUNSUBSCRIBE
    on the node that holds each channel's slot (a channel's frames go to that
    node only, so a web process is sent only those of its own subscribers).

    A shard channel whose slot moved to another node is unsubscribed by the
    server; that ends the link (ConnectionError), and the next one, made from
    a fresh slot map, subscribes it where it now lives.
    """

    def __init__(self, settings: Settings) -> None:
        # For its slot map and per-node clients (redis-py's cluster client is untyped).
        self._cluster: Any = connect(settings, 1)
        self._pubsubs: dict[str, Any] = {}  # node name -> its pub/sub connection
        self._leaving: collections.Counter[str] = collections.Counter()  # SUNSUBSCRIBEs not answered yet
        self._turn = 0

    def send(self, subscribe: bool, names: list[str]) -> None:
        """Ask for (or stop) `names`, one command per slot (a sharded command may
        name channels of one slot only); confirmations come through get_message()."""
        by_slot: dict[int, list[str]] = collections.defaultdict(list)
        for name in names:
            by_slot[self._cluster.keyslot(name)].append(name)
        for group in by_slot.values():
            node = self._cluster.get_node_from_key(group[0])
            pubsub = self._pubsubs.get(node.name)
            if not subscribe:
                self._leaving.update(group)
                if pubsub is None:
                    raise redis.ConnectionError(f"no pub/sub connection to {node.name}")
            if pubsub is None:
                pubsub = self._cluster.get_redis_connection(node).pubsub()
                # Through redis-py the first time: it makes the connection, and
                # get_message() reads only from a PubSub that knows it subscribed.
                pubsub.ssubscribe(*group)
                self._pubsubs[node.name] = pubsub  # only now: the reader polls connected ones
                continue
            pubsub.connection.send_command("SSUBSCRIBE" if subscribe else "SUNSUBSCRIBE", *group,
                                           check_health=False)

    def get_message(self, timeout: float) -> Item | None:
        """The next message or confirmation from any node, or None after `timeout` seconds."""
        item = self._poll()
        if item is None and self._pubsubs:
            sockets: list[socket.socket] = []
            for pubsub in list(self._pubsubs.values()):
                sock = pubsub.connection._sock if pubsub.connection is not None else None
                if sock is None:
                    raise redis.ConnectionError("a shard pub/sub connection is closed")
                sockets.append(sock)
            select.select(sockets, [], [], timeout)
            item = self._poll()
        return item

    def _poll(self) -> Item | None:
        # Round robin over the nodes, so a busy one does not starve the others.
        pubsubs = list(self._pubsubs.values())
        for _ in range(len(pubsubs)):
            self._turn = (self._turn + 1) % len(pubsubs)
            item = pubsubs[self._turn].get_message(timeout=0)
            if item is not None:
                return self._plain(item)
        return None

    def _plain(self, item: Item) -> Item:
        kind = item["type"]
        if kind == "sunsubscribe":
            name = item["channel"]
            if not self._leaving[name]:
                raise redis.ConnectionError(f"Redis unsubscribed {name}: its slot moved")
            self._leaving[name] -= 1
            if not self._leaving[name]:
                del self._leaving[name]
        return {**item, "type": _PLAIN.get(kind, kind)}

    def close(self) -> None:
        """Drop every connection."""
        for pubsub in list(self._pubsubs.values()):
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass
        try:
            self._cluster.close()
        except (redis.RedisError, OSError):
            pass
