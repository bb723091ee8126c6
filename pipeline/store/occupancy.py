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
web process counts what it added in its own hash (`node_subscriptions`), so
the subscriptions of one that died are taken off by the reaper.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from pipeline.core.messages import dumps
from pipeline.store.keys import Keys
from pipeline.store.scripts import Runner, Script

# Channels a listing page holds, at most.
MAX_PAGE = 1000


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
    field: str  # the stream entry's field (pipeline.webhooks.EVENT_FIELD)
    occupied: str  # the channel.occupied event's JSON, or ''
    join: str  # the presence.join event's JSON, or ''


class LeaveArgs(NamedTuple):
    channel: str
    member: str
    vacancy: str
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
    entries: list[str]  # (member, channel, leave event or '', vacated event or '') each


JOIN = Script("occupancy_join.lua", CountKeys, JoinArgs, batched=True)
LEAVE = Script("occupancy_leave.lua", CountKeys, LeaveArgs, batched=True)
FLUSH = Script("occupancy_flush.lua", FlushKeys, FlushArgs)
REAP = Script("occupancy_reap.lua", CountKeys, ReapArgs)


def member(channel: str, user: str) -> str:
    """A user's field in `members` and in a node's hash, and its pending leave in `leaving`."""
    return dumps([channel, user])


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
    occupied: str = ""
    join: str = ""


class Leave(NamedTuple):
    """One subscription less: the due times of a pending leave and vacate ('' to append
    their events at once) and those events ('' for none)."""

    channel: str
    user: str
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
        """Count subscriptions made on `node`, in order, in one round trip; returns the events appended."""
        keys = self._count_keys(node)
        return sum(self.runner.run([
            JOIN(keys, JoinArgs(j.channel, member(j.channel, j.user), vacancy(j.channel), node, field,
                                j.occupied, j.join)) for j in joins]))

    def leave(self, node: str, field: str, leaves: list[Leave]) -> int:
        """Take subscriptions that ended on `node` off, in order, in one round trip; returns the
        events appended at once."""
        keys = self._count_keys(node)
        return sum(self.runner.run([
            LEAVE(keys, LeaveArgs(one.channel, member(one.channel, one.user), vacancy(one.channel), field,
                                  one.leave_due, one.vacate_due, one.leave, one.vacated)) for one in leaves]))

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
        """Up to about `limit` of a web process's counted (member, channel, user)."""
        _cursor, found = self.redis.hscan(self.keys.node_subscriptions(node), 0, count=limit)
        return [(entry, *json.loads(entry)) for entry in list(found)[:limit]]

    def reap(self, node: str, field: str, entries: list[tuple[str, str, str, str]]) -> int:
        """Take a dead web process's counted (member, channel, leave event, vacated event) off
        the counts, appending the events of what that leaves empty; returns how many."""
        flat = [value for entry in entries for value in entry]
        return int(self.runner.one(REAP(self._count_keys(node), ReapArgs(node, field, flat))))

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
