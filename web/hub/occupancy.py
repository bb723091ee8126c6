"""Who is subscribed where, cluster-wide, and the webhook events of its transitions
(docs/occupancy.md): `presence.join` / `presence.leave`, `channel.occupied` /
`channel.vacated`, and `connection.closed`.

Every subscription counts (not only `presence: true` ones). The hub's
protocol hands this process's subscribes and unsubscribes here through
Batchers (web/hub/batch.py), so a burst of 10,000 sockets closing costs a
round trip per 500. The scripts (pipeline/store/occupancy.py) decide each
transition and append its event atomically; this module builds the events
(pipeline.core.events, their one owner) and gives only those a receiver
wants. A user's last leave and a channel's last subscriber wait
HERALD_PRESENCE_GRACE: the flusher (`run`, a thread per web process) appends
them once due and still empty. The presence reaper (web/hub/presence.py)
calls `reap` for the processes that died.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from pipeline.core.events import event
from pipeline.core.messages import dumps
from pipeline.store.occupancy import Join, Leave, pending
from pipeline.webhooks import EVENT_FIELD

log = logging.getLogger("herald.hub")

FLUSH_PERIOD = 0.5  # seconds between two looks for pending leaves that are due
FLUSH_ENTRIES = 500  # pending leaves one flush ends, at most; a full page is followed at once
# A dead process's subscriptions one reaper run takes off; the next run takes the next ones.
REAP_ENTRIES = 1000

JOIN, LEAVE = "presence.join", "presence.leave"
OCCUPIED, VACATED = "channel.occupied", "channel.vacated"
CLOSED = "connection.closed"


class Occupancy:
    """This process's side of the occupancy counts: joins, leaves, the flusher, the reaper."""

    def __init__(self, store, outbox, settings, node: str):
        self.counts = store.occupancy
        self.settings = settings
        self.node = node
        self.running = False
        # Decided once: which events any receiver wants (HERALD_WEBHOOK_URL is fixed at start).
        self.wanted = {kind: outbox.wants(kind) for kind in (JOIN, LEAVE, OCCUPIED, VACATED)}
        self.closed_wanted = outbox.wants(CLOSED)
        self.outbox = outbox
        grace = settings.presence_grace
        # A leave waits only when grace is set and a receiver would see the pair it saves.
        self.user_grace = grace if grace > 0 and (self.wanted[JOIN] or self.wanted[LEAVE]) else 0.0
        self.channel_grace = grace if grace > 0 and (self.wanted[OCCUPIED] or self.wanted[VACATED]) else 0.0

    def _body(self, kind: str, channel: str, **fields) -> str:
        return dumps(event(kind, channel, **fields)) if self.wanted[kind] else ""

    # -- the Batchers' runs (web/hub/protocol.py) -------------------------------
    def join_all(self, calls: list[tuple[str, str]]) -> list[None]:
        """Count each (channel, user) subscription made here, in one round trip. RedisError
        goes to every caller of the batch."""
        self.counts.join(self.node, EVENT_FIELD, [
            Join(channel, user, self._body(OCCUPIED, channel), self._body(JOIN, channel, user=user))
            for channel, user in calls])
        return [None] * len(calls)

    def leave_all(self, calls: list[tuple[str, Iterable[str], dict | None]]) -> list[None]:
        """Take each (user, channels, connection.closed event or None) off the counts, in one
        round trip, then append the `connection.closed` events wanted."""
        now = time.time()
        leave_due = now + self.user_grace if self.user_grace else ""
        vacate_due = now + self.channel_grace if self.channel_grace else ""
        leaves, closed = [], []
        for user, channels, closing in calls:
            for channel in channels:
                leaves.append(Leave(channel, user, leave_due, vacate_due,
                                    "" if leave_due else self._body(LEAVE, channel, user=user),
                                    "" if vacate_due else self._body(VACATED, channel)))
            if closing is not None:
                closed.append(closing)
        if leaves:
            self.counts.leave(self.node, EVENT_FIELD, leaves)
        if closed:
            self.outbox.emit(closed)
        return [None] * len(calls)

    def closed_event(self, client: str, user: str, code: int, reason: str) -> dict | None:
        """The `connection.closed` event of a socket, or None when no receiver wants it."""
        if not self.closed_wanted:
            return None
        return event(CLOSED, client=client, user=user, code=code, reason=reason)

    # -- the flusher ----------------------------------------------------------------
    def start(self) -> None:
        """Take what a process of the same name left counted off (before any client is here),
        then start the flusher (a thread), when leaves here wait out a grace."""
        try:
            # A process started under the name of one that died (HERALD_NODE_ID reused) keeps
            # that name's liveness key fresh: the reaper would never see the dead one's counts.
            while self._reap_node(self.node, REAP_ENTRIES):
                pass
        except redis.RedisError as exc:
            log.warning("leftover subscriptions not reaped", extra={"node": self.node, "error": str(exc)})
        if self.waits and not self.running:
            self.running = True
            threading.Thread(target=self.run, name="occupancy-flusher", daemon=True).start()

    @property
    def waits(self) -> bool:
        """True when leaves here may wait out a grace (else there is nothing to flush)."""
        return bool(self.user_grace or self.channel_grace)

    def flush(self, now: float | None = None) -> int:
        """Append the events of the pending leaves and vacates due by `now` that are still
        empty (one script: several processes flushing append each once); returns how many
        entries were due (a full page means more may be)."""
        now = time.time() if now is None else now
        due = self.counts.due(now, FLUSH_ENTRIES)
        if not due:
            return 0
        ended = []
        for entry in due:
            channel, user = pending(entry)
            ended.append((entry, self._body(VACATED, channel) if user is None
                          else self._body(LEAVE, channel, user=user)))
        appended = self.counts.flush(now, EVENT_FIELD, ended)
        log.debug("pending leaves flushed", extra={"due": len(due), "appended": appended})
        return len(due)

    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """The flusher's loop, while the hub runs: every FLUSH_PERIOD, the due leaves."""
        while self.running:
            try:
                if self.flush() >= FLUSH_ENTRIES:
                    continue
            except redis.RedisError as exc:
                log.warning("pending leaves not flushed", extra={"error": str(exc)})
            except Exception:  # a bad entry must not end the loop for good
                log.exception("pending leaves not flushed")
            sleep(FLUSH_PERIOD)

    # -- dead processes -----------------------------------------------------------
    def reap(self, alive: Callable[[Iterable[str]], set[str]], limit: int = REAP_ENTRIES) -> int:
        """Take the subscriptions of web processes that died (not in `alive(nodes)`) off the
        counts, at most `limit` entries this run, appending the leave and vacate events of
        what that empties at once; returns the entries read."""
        nodes = self.counts.nodes()
        dead = sorted(nodes - alive(nodes))
        read = 0
        for node in dead:
            if read >= limit:
                break
            read += self._reap_node(node, limit - read)
        return read

    def _reap_node(self, node: str, limit: int) -> int:
        """Take up to `limit` of `node`'s counted subscriptions off; returns how many were read."""
        entries = self.counts.node_entries(node, limit)
        appended = self.counts.reap(node, EVENT_FIELD, [
            (entry, channel, self._body(LEAVE, channel, user=user), self._body(VACATED, channel))
            for entry, channel, user in entries])
        if entries:
            log.info("dead node's subscriptions reaped", extra={"node": node, "entries": len(entries),
                                                                "events": appended})
        return len(entries)
