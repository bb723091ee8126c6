"""Presence: who is in a channel now, across every web process, and this node's heartbeat.

A subscribe writes the client's entry (a hash per channel) and publishes a
`join`; an unsubscribe or a close removes it and publishes a `leave`. Each
web process keeps a liveness key fresh; entries of a process whose key
expired (it died without cleaning up) are reaped by whichever process holds
the reaper lock that period, and their `leave` frames published then.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from pipeline.messages import dumps

log = logging.getLogger("herald.hub")


class Presence:
    """Presence entries and this node's liveness, in the main Redis."""

    def __init__(self, store, settings, node: str):
        self.redis = store.redis
        self.store = store
        self.keys = store.keys
        self.settings = settings
        self.node = node

    def join_all(self, joins: list[tuple]) -> list[None]:
        """Record each (client, channel) and tell the channel, in one round trip (web/hub/batch.py);
        best effort: logged if Redis fails."""
        since = int(time.time() * 1000)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for client, channel in joins:
                entry = dumps({"client": client.id, "user": client.identity.user, "since": since, "node": self.node})
                pipe.hset(self.keys.presence(channel), client.id, entry)
                pipe.sadd(self.keys.presence_channels, channel)
                self.store.publish(self.keys.presence_channel(channel),
                                   frame("join", channel, client.identity.user, client.id), pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("presence not recorded", extra={"clients": len(joins)})
        return [None] * len(joins)

    def leave(self, client, channel: str) -> None:
        """Remove the client from the channel and tell the channel (best effort)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.presence(channel), client.id)
            self.store.publish(self.keys.presence_channel(channel),
                               frame("leave", channel, client.identity.user, client.id), pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("presence not removed", extra={"client": client.id, "channel": channel})

    def members(self, channel: str) -> list[dict]:
        """Clients subscribed to a channel now, oldest first (entries of dead nodes left out)."""
        entries = [json.loads(v) for v in self.redis.hvals(self.keys.presence(channel))]
        alive = self._alive({e.get("node", "") for e in entries})
        entries = sorted((e for e in entries if e.get("node", "") in alive), key=lambda e: e.get("since", 0))
        return [{"client": e["client"], "user": e["user"], "since": e["since"]} for e in entries]

    def reap(self) -> list[tuple[str, dict]]:
        """Remove presence entries of web processes that stopped heart-beating; returns them."""
        reaped = []
        for channel in self.redis.smembers(self.keys.presence_channels):
            key = self.keys.presence(channel)
            entries = {client: json.loads(v) for client, v in self.redis.hgetall(key).items()}
            alive = self._alive({e.get("node", "") for e in entries.values()})
            for client, entry in entries.items():
                if entry.get("node", "") not in alive and self.redis.hdel(key, client):
                    self.store.publish(self.keys.presence_channel(channel),
                                       frame("leave", channel, entry["user"], client))
                    reaped.append((channel, entry))
            if not self.redis.exists(key):
                self.redis.srem(self.keys.presence_channels, channel)
        return reaped

    def _alive(self, nodes: set[str]) -> set[str]:
        nodes = [n for n in nodes if n]
        if not nodes:
            return set()
        flags = self.store.mget([self.keys.node(n) for n in nodes])
        return {n for n, flag in zip(nodes, flags) if flag}

    def beat(self, members: list[tuple[str, str, str]]) -> None:
        """One heartbeat: this node's liveness key, its connections counted for another
        TTL, and, if this node holds the reaper lock this period, the reaping."""
        ttl = self.settings.presence_ttl
        self.redis.set(self.keys.node(self.node), "1", ex=ttl)
        # The live nodes counted on /metrics (herald_web_nodes); the dead fall out here.
        now = time.time()
        self.redis.zadd(self.keys.nodes, {self.node: now})
        self.redis.zremrangebyscore(self.keys.nodes, "-inf", now - ttl)
        # A connection closing meanwhile may be counted again: it lapses after the TTL.
        self.store.refresh_connections(members)
        if self.redis.set(self.keys.presence_reaper, self.node, nx=True, ex=int(self.period)):
            for channel, entry in self.reap():
                log.info("presence reaped", extra={"channel": channel, "client": entry["client"]})

    @property
    def period(self) -> float:
        """Seconds between heartbeats: a third of the presence TTL."""
        return max(1.0, self.settings.presence_ttl / 3)


def frame(op: str, channel: str, user: str, client: str) -> str:
    """A `join` or `leave` frame."""
    return dumps({"op": op, "channel": channel, "user": user, "client": client})
