"""Open WebSockets per user and per address, counted across every web process (the caps
HERALD_WS_MAX_PER_USER and HERALD_WS_MAX_PER_IP).

Each count is a sorted set of "node/client" scored by when the entry lapses,
so the connections of a process that died stop counting after the presence
TTL. One set per script call: a user's and an address's sets may sit on
different cluster nodes.
"""

from __future__ import annotations

import collections
import time
from typing import NamedTuple

from pipeline.core.settings import Settings
from pipeline.store.keys import Keys
from pipeline.store.scripts import Runner, Script


class ConnectionKeys(NamedTuple):
    connections: str  # a user's or an address's set


class ConnectionArgs(NamedTuple):
    member: str  # "node/client"
    now: float
    lapse: float  # when the entry lapses
    cap: int


CLAIM_CONNECTION = Script("claim_connection.lua", ConnectionKeys, ConnectionArgs)


class Connections:
    """The connection caps."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings) -> None:
        self.runner = runner
        self.keys = keys
        self.settings = settings

    def claim(self, claims: list[tuple[str, str, str]]) -> list[str | None]:
        """Count new WebSockets (member, user, address), in one round trip, in list order
        (a burst of connects, web/hub/batch.py); each result is "user" or "address" (and
        counts nothing) when that cap is reached, else None."""
        now = time.time()
        lapse = now + self.settings.presence_ttl
        calls = []
        for member, user, address in claims:
            calls.append(CLAIM_CONNECTION(ConnectionKeys(self.keys.user_connections(user)),
                                          ConnectionArgs(member, now, lapse, self.settings.ws_max_per_user)))
            calls.append(CLAIM_CONNECTION(ConnectionKeys(self.keys.address_connections(address)),
                                          ConnectionArgs(member, now, lapse, self.settings.ws_max_per_ip)))
        replies = self.runner.run(calls)
        results: list[str | None] = []
        undo = []
        for (member, user, address), over_user, over_address in zip(claims, replies[::2], replies[1::2]):
            # Each cap is one script call: a claim refused by one is taken back from the other.
            if over_user:
                results.append("user")
                if not over_address:
                    undo.append((self.keys.address_connections(address), member))
            elif over_address:
                results.append("address")
                undo.append((self.keys.user_connections(user), member))
            else:
                results.append(None)
        for key, member in undo:
            self.runner.client.zrem(key, member)
        return results

    def refresh(self, members: list[tuple[str, str, str]]) -> None:
        """Keep this process's open connections (member, user, address) counted for another TTL."""
        lapse = time.time() + self.settings.presence_ttl
        by_key: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for member, user, address in members:
            by_key[self.keys.user_connections(user)][member] = lapse
            by_key[self.keys.address_connections(address)][member] = lapse
        pipe = self.runner.client.pipeline(transaction=False)
        for key, scores in by_key.items():
            # Re-added, not only updated: a Redis that restarted empty counts them again.
            pipe.zadd(key, scores)
            pipe.pexpireat(key, int(lapse * 1000))
        pipe.execute()

    def release(self, member: str, user: str, address: str) -> None:
        """Stop counting a closed WebSocket."""
        pipe = self.runner.client.pipeline(transaction=False)
        pipe.zrem(self.keys.user_connections(user), member)
        pipe.zrem(self.keys.address_connections(address), member)
        pipe.execute()
