"""Occupancy: how many subscriptions each channel has, and each user in it, cluster-wide
(docs/occupancy.md), and the events their transitions append to the webhook stream.

Every key here shares the `{events}` hash tag (keys.py), so one script
decides a transition (a channel's first subscriber, a user's last leave)
and appends its event to the stream atomically: a channel's events are in
the stream in the order its transitions happened, whichever web process
made them. The scripts append only the events they are given (the caller
builds them, pipeline.core.events, and leaves out those no receiver wants).

A user's last leave and a channel's last subscriber wait in `leaving` until
due (HERALD_PRESENCE_GRACE): a pending leave's member is the user's
`members` field, a pending vacate's is `[channel]` (JSON, `vacancy`). Each
web process keeps what it added in its own hash (`node_subscriptions`), an
entry a subscription (`subscription`: [channel, user, client]), so a leave
takes off exactly its own count (or nothing), a retried one nothing twice,
and the subscriptions of a process that died are taken off by the reaper.
A script call handles at most MAX_ENTRIES subscriptions: a burst is split
into calls that each hold Redis briefly.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from pipeline.core.messages import dumps
from pipeline.store.keys import Keys
from pipeline.store.scripts import Call, Runner, Script

# Channels a listing page holds, at most.
MAX_PAGE = 1000
# Subscriptions one script call (a batched run of joins or leaves, or a reap) handles, at
# most: 50,000 leaves in one call held Redis for 1.4 s; 2,000 hold it for tens of ms.
MAX_ENTRIES = 2000
# Pending leaves a reap reads to find which emptied channels still wait on one.
PENDING_READ = 5000


class CountKeys(NamedTuple):
    subscribers: str
    channels: str
    members: str
    users: str
    leaving: str
    node: str  # the web process's own hash of what it counted
    nodes: str
    events: str


class JoinArgs(NamedTuple):
    channel: str
    member: str  # member(channel, user)
    vacancy: str  # vacancy(channel)
    node_name: str
    subscription: str  # subscription(channel, user, client): its entry in the node's hash
    field: str  # the stream entry's field (pipeline.webhooks.EVENT_FIELD)
    occupied: str  # the channel.occupied event's JSON, or ''
    join: str  # the presence.join event's JSON, or ''


class LeaveArgs(NamedTuple):
    channel: str
    member: str
    vacancy: str
    subscription: str
    field: str
    leave_due: float | str  # when a pending leave is due, or '' for none (its event now)
    vacate_due: float | str
    leave: str
    vacated: str


class FlushKeys(NamedTuple):
    leaving: str
    members: str
    subscribers: str
    events: str


class FlushArgs(NamedTuple):
    now: float
    field: str
    entries: list[str]  # (pending, 'members' or 'subscribers', the counted field, the event or '') each


class ReapArgs(NamedTuple):
    node_name: str
    field: str
    horizon: float | str  # the latest a pending leave can be due, or '' when leaves never wait
    pending_read: int  # PENDING_READ
    entries: list[str]  # (subscription, member, vacancy, channel, leave event or '', vacated event or '') each


JOIN = Script("occupancy_join.lua", CountKeys, JoinArgs, batched=True)
LEAVE = Script("occupancy_leave.lua", CountKeys, LeaveArgs, batched=True, uses=("occupancy.lua",))
FLUSH = Script("occupancy_flush.lua", FlushKeys, FlushArgs)
REAP = Script("occupancy_reap.lua", CountKeys, ReapArgs, uses=("occupancy.lua",))


def member(channel: str, user: str) -> str:
    """A user's field in `members`, and its pending leave in `leaving`."""
    return dumps([channel, user])


def subscription(channel: str, user: str, client: str) -> str:
    """A subscription's field in the hash of the web process that counted it."""
    return dumps([channel, user, client])


def vacancy(channel: str) -> str:
    """A channel's pending vacate in `leaving`."""
    return dumps([channel])


def pending(entry: str) -> tuple[str, str | None]:
    """(channel, user) of a `leaving` entry; user None for a vacate."""
    parts = json.loads(entry)
    return parts[0], (parts[1] if len(parts) > 1 else None)


class Join(NamedTuple):
    """One subscription more, with the events its transitions would append ('' for none)."""

    channel: str
    user: str
    client: str
    occupied: str = ""
    join: str = ""


class Leave(NamedTuple):
    """One subscription less: the due times of a pending leave and vacate ('' to append
    their events at once) and those events ('' for none)."""

    channel: str
    user: str
    client: str
    leave_due: float | str = ""
    vacate_due: float | str = ""
    leave: str = ""
    vacated: str = ""


class Occupancy:
    """The occupancy counts, their transitions' events, and the reads of the server API."""

    def __init__(self, runner: Runner, keys: Keys) -> None:
        self.runner = runner
        self.keys = keys
        self.redis: Any = runner.client

    def _count_keys(self, node: str) -> CountKeys:
        k = self.keys
        return CountKeys(k.subscribers, k.active_channels, k.members, k.channel_users, k.leaving,
                         k.node_subscriptions(node), k.subscription_nodes, k.events)

    # -- writes ----------------------------------------------------------------
    def join(self, node: str, field: str, joins: list[Join]) -> int:
        """Count subscriptions made on `node` (each once however often given), in order, a
        round trip per MAX_ENTRIES; returns the events appended."""
        keys = self._count_keys(node)
        return self._run([
            JOIN(keys, JoinArgs(j.channel, member(j.channel, j.user), vacancy(j.channel), node,
                                subscription(j.channel, j.user, j.client), field, j.occupied, j.join))
            for j in joins])

    def leave(self, node: str, field: str, leaves: list[Leave]) -> int:
        """Take subscriptions that ended on `node` off (each one counted there, once: a leave
        given again takes nothing), in order, a round trip per MAX_ENTRIES; returns the
        events appended at once."""
        keys = self._count_keys(node)
        return self._run([
            LEAVE(keys, LeaveArgs(one.channel, member(one.channel, one.user), vacancy(one.channel),
                                  subscription(one.channel, one.user, one.client), field,
                                  one.leave_due, one.vacate_due, one.leave, one.vacated)) for one in leaves])

    def _run(self, calls: list[Call]) -> int:
        # A script call at most MAX_ENTRIES long: Redis runs each whole, and serves no one meanwhile.
        return sum(sum(self.runner.run(calls[start:start + MAX_ENTRIES]))
                   for start in range(0, len(calls), MAX_ENTRIES))

    def due(self, now: float, limit: int) -> list[str]:
        """Pending leaves and vacates due by `now`, oldest first, at most `limit`."""
        return list(self.redis.zrangebyscore(self.keys.leaving, "-inf", now, start=0, num=limit))

    def flush(self, now: float, field: str, ended: list[tuple[str, str]]) -> int:
        """End pending entries due by `now`, each given with its event ('' for none): each one
        still pending and whose count is still 0 appends its event. Returns the events appended."""
        entries: list[str] = []
        for entry, body in ended:
            channel, user = pending(entry)
            entries += [entry, "subscribers", channel, body] if user is None else [entry, "members", entry, body]
        k = self.keys
        return int(self.runner.one(FLUSH(FlushKeys(k.leaving, k.members, k.subscribers, k.events),
                                         FlushArgs(now, field, entries))))

    def nodes(self) -> set[str]:
        """The web processes whose subscriptions are counted."""
        return set(self.redis.smembers(self.keys.subscription_nodes))

    def node_entries(self, node: str, limit: int) -> list[tuple[str, str, str]]:
        """Up to about `limit` of a web process's counted subscriptions: (entry, channel, user)."""
        _cursor, found = self.redis.hscan(self.keys.node_subscriptions(node), 0, count=limit)
        return [(entry, *json.loads(entry)[:2]) for entry in list(found)[:limit]]

    def reap(self, node: str, field: str, horizon: float | str,
             entries: list[tuple[str, str, str, str, str]]) -> int:
        """Take a dead web process's counted subscriptions (entry, channel, user, leave event,
        vacated event) off the counts, a call per MAX_ENTRIES, appending the events of what
        that leaves empty (a channel's vacate waits while a living user's leave of it waits:
        `horizon` is the latest such a leave can be due, '' when none waits); returns how many."""
        keys = self._count_keys(node)
        appended = 0
        for start in range(0, max(len(entries), 1), MAX_ENTRIES):  # an empty hash too: it leaves `nodes`
            flat: list[str] = []
            for entry, channel, user, leave, vacated in entries[start:start + MAX_ENTRIES]:
                flat += [entry, member(channel, user), vacancy(channel), channel, leave, vacated]
            appended += int(self.runner.one(REAP(keys, ReapArgs(node, field, horizon, PENDING_READ, flat))))
        return appended

    # -- reads -----------------------------------------------------------------
    def counts(self, channel: str) -> tuple[int, int]:
        """(subscriptions, distinct users) of a channel now: two hash fields, O(1)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.keys.subscribers, channel)
        pipe.hget(self.keys.channel_users, channel)
        subscriptions, users = pipe.execute()
        return int(subscriptions or 0), int(users or 0)

    def page(self, prefix: str, after: bytes | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Channels with subscribers whose names start with `prefix`, in name order, after
        `after` (the last channel of the page before, or any place in that order), at most
        `limit` (<= MAX_PAGE): each `{"channel", "subscribers", "users"}`, and the last
        channel when more follow."""
        limit = max(1, min(limit, MAX_PAGE))
        start = prefix.encode()
        # Channel names are ASCII: every name starting with the prefix sorts below prefix + 0xff.
        low = b"(" + after if after is not None and after >= start else b"[" + start
        names = self.redis.zrangebylex(self.keys.active_channels, low, b"[" + start + b"\xff",
                                       start=0, num=limit + 1)
        more = len(names) > limit
        names = [n.decode() if isinstance(n, bytes) else n for n in names[:limit]]
        if not names:
            return [], None
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.subscribers, names)
        pipe.hmget(self.keys.channel_users, names)
        subscriptions, users = pipe.execute()
        channels = [{"channel": name, "subscribers": int(s or 0), "users": int(u or 0)}
                    for name, s, u in zip(names, subscriptions, users)]
        return channels, (names[-1] if more else None)
