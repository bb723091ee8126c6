"""Presence: who is in a channel now, across every web process, and this node's heartbeat.

A subscribe writes the client's entry (a hash per channel), indexes it in a
set of this node's own entries, and publishes a `join`; an unsubscribe or a
close removes both and publishes a `leave`. Each web process keeps a liveness
key fresh; entries of a process whose key expired (it died without cleaning
up) are reaped, in a loop apart from the heartbeat, every second by whichever
process holds the reaper lock, and their `leave` frames published then; the
same run takes the dead process's subscriptions off the occupancy counts
(web/hub/occupancy.py). The reaper reads only the dead process's index, a
bounded share per run, never a whole channel; listings are paged (HSCAN).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable

import redis

from pipeline.core.messages import dumps

log = logging.getLogger("herald.hub")


# Presence entries a listing page asks Redis for, by default and at most
# (docs/guide.md: "Presence"): a channel of 100,000 subscribers is 500 pages, not one
# multi-megabyte reply and one O(N) command.
PAGE = 200
MAX_PAGE = 1000
# Entries of dead nodes one reaper run reads and removes; the next run takes the next
# ones. A run's replies stay this small however large a channel or a dead node is.
REAP_ENTRIES = 1000
# Seconds between two reaper runs (one web process a run, by the reaper lock): a dead
# node is reaped within this of its liveness key lapsing (HERALD_PRESENCE_TTL).
REAP_PERIOD = 1.0


class Presence:
    """Presence entries and this node's liveness, in the main Redis. `occupancy`, when
    given (web/hub/occupancy.py), has the dead nodes' subscriptions reaped beside."""

    def __init__(self, store, settings, node: str, occupancy=None):
        self.occupancy = occupancy
        self.redis = store.redis
        self.store = store
        self.keys = store.keys
        self.settings = settings
        self.node = node
        self._reaper: threading.Thread | None = None
        self._beaten = 0.0  # time.monotonic() of this node's last heartbeat

    def join_all(self, joins: list[tuple]) -> list[None]:
        """Record each (client, channel) and tell the channel, in one round trip (web/hub/batch.py);
        best effort: logged if Redis fails."""
        since = int(time.time() * 1000)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for client, channel in joins:
                entry = dumps({"client": client.id, "user": client.identity.user, "since": since, "node": self.node})
                pipe.hset(self.keys.presence(channel), client.id, entry)
                pipe.sadd(self.keys.node_presence(self.node), indexed(channel, client.id, client.identity.user))
                self.store.publish(self.keys.presence_channel(channel),
                                   frame("join", channel, client.identity.user, client.id), pipe)
            pipe.sadd(self.keys.presence_nodes, self.node)
            pipe.execute()
        except redis.RedisError:
            log.warning("presence not recorded", extra={"clients": len(joins)})
        return [None] * len(joins)

    def leave(self, client, channel: str) -> None:
        """Remove the client from the channel and tell the channel (best effort)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.presence(channel), client.id)
            pipe.srem(self.keys.node_presence(self.node), indexed(channel, client.id, client.identity.user))
            self.store.publish(self.keys.presence_channel(channel),
                               frame("leave", channel, client.identity.user, client.id), pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("presence not removed", extra={"client": client.id, "channel": channel})

    def page(self, channel: str, cursor: int | str = 0, count: int = PAGE) -> dict:
        """One page of the clients subscribed to a channel now (entries of dead nodes left out):
        `{"clients": [...], "next": cursor or None}`, oldest first within the page.

        An HSCAN: `count` is Redis's hint (a page may hold somewhat more, or fewer, even
        none while `next` is not None); follow `next` until it is None. ValueError for a
        cursor that is not one `next` gave.
        """
        position = parse_cursor(cursor)
        found, raw = self.redis.hscan(self.keys.presence(channel), position, count=max(1, min(count, MAX_PAGE)))
        entries = [json.loads(v) for v in raw.values()]
        alive = self._alive({e.get("node", "") for e in entries})
        entries = sorted((e for e in entries if e.get("node", "") in alive), key=lambda e: e.get("since", 0))
        return {"clients": [{"client": e["client"], "user": e["user"], "since": e["since"]} for e in entries],
                "next": str(found) if int(found) else None}

    def reap(self, limit: int = REAP_ENTRIES) -> list[tuple[str, dict]]:
        """Remove presence entries of web processes that stopped heart-beating; returns them
        as (channel, {"client", "user", "node"}).

        Reads at most `limit` entries, from the dead processes' own indexes (SRANDMEMBER
        with a count), never a channel's hash: a channel of 100,000 living members costs
        the reaper nothing, and a dead process's 100,000 entries take 100 runs. A drained
        index's process leaves `presence_nodes`.
        """
        nodes = self.redis.smembers(self.keys.presence_nodes)
        dead = sorted(nodes - self._alive(nodes))
        found: list[tuple[str, ...]] = []  # (node, index member, channel, client, user)
        drained: list[str] = []
        for node in dead:
            if len(found) >= limit:
                break
            members = self.redis.srandmember(self.keys.node_presence(node), limit - len(found))
            if not members:
                drained.append(node)
            found += [(node, member, *json.loads(member)) for member in members]
        if not found and not drained:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for node, member, channel, client, _user in found:
            pipe.hdel(self.keys.presence(channel), client)
            pipe.srem(self.keys.node_presence(node), member)
        for node in drained:
            # Nothing of it is left to reap (a process back from the dead re-adds itself as it joins).
            pipe.srem(self.keys.presence_nodes, node)
        removed = pipe.execute()[:2 * len(found):2]
        reaped = [(channel, {"client": client, "user": user, "node": node})
                  for (node, _member, channel, client, user), gone in zip(found, removed) if gone]
        if reaped:
            pipe = self.redis.pipeline(transaction=False)
            for channel, entry in reaped:
                # Only the reaper that removed an entry says it left.
                self.store.publish(self.keys.presence_channel(channel),
                                   frame("leave", channel, entry["user"], entry["client"]), pipe)
            pipe.execute()
        return reaped

    def _alive(self, nodes: Iterable[str]) -> set[str]:
        nodes = [n for n in nodes if n]
        if not nodes:
            return set()
        flags = self.store.mget([self.keys.node(n) for n in nodes])
        return {n for n, flag in zip(nodes, flags) if flag}

    def beat(self, members: list[tuple[str, str, str]]) -> None:
        """One heartbeat: this node's liveness key and its connections counted for another
        TTL. The first beat starts the reaper's own loop (`_reap_loop`), so that however
        long a reaping takes, it never delays the liveness key."""
        ttl = self.settings.presence_ttl
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.node(self.node), "1", ex=ttl)
        # The live nodes counted on /metrics (herald_web_nodes); the dead fall out here.
        pipe.zadd(self.keys.nodes, {self.node: now})
        pipe.zremrangebyscore(self.keys.nodes, "-inf", now - ttl)
        pipe.execute()
        self._beaten = time.monotonic()
        # A connection closing meanwhile may be counted again: it lapses after the TTL.
        self.store.refresh_connections(members)
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="presence-reaper", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        # Each REAP_PERIOD, the node holding the reaper lock reaps a share of the dead
        # nodes' entries: within a second of a node's liveness key lapsing, its users'
        # leave events are out (docs/occupancy.md). It ends when this node stops beating
        # (a stopping process); a beat starts it again.
        while time.monotonic() - self._beaten < 2 * self.period:
            try:
                if self.redis.set(self.keys.presence_reaper, self.node, nx=True, px=int(REAP_PERIOD * 1000)):
                    for channel, entry in self.reap():
                        log.info("presence reaped", extra={"channel": channel, "client": entry["client"]})
                    if self.occupancy is not None:
                        self.occupancy.reap(self._alive)
            except redis.RedisError as exc:
                log.warning("presence reaping failed", extra={"error": str(exc)})
            except Exception:  # a bad entry must not end the loop for good
                log.exception("presence reaping failed")
            time.sleep(REAP_PERIOD)
        self._reaper = None

    @property
    def period(self) -> float:
        """Seconds between heartbeats: a third of the presence TTL."""
        return max(1.0, self.settings.presence_ttl / 3)


def parse_cursor(cursor: int | str) -> int:
    """A presence page's cursor (`next` of the page before; 0 for the first); ValueError otherwise."""
    text = str(cursor)
    if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 2 ** 64):
        raise ValueError("cursor must be the `next` of a presence page")
    return int(text)


def indexed(channel: str, client: str, user: str) -> str:
    """A presence entry's member in its node's index (`Keys.node_presence`)."""
    return dumps([channel, client, user])


def frame(op: str, channel: str, user: str, client: str) -> str:
    """A `join` or `leave` frame."""
    return dumps({"op": op, "channel": channel, "user": user, "client": client})
