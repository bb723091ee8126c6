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
them once due and still empty. Leaves that Redis refused are kept (at most
MAX_FAILED) and tried again by the flusher, with backoff: each subscription
is its own entry in the process's hash, so a retried leave takes off only
what is still its own. The presence reaper (web/hub/presence.py) calls
`reap` for the processes that died.
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
# Leaves Redis refused, kept to be tried again, at most; past it the newest are dropped (logged).
MAX_FAILED = 100_000
RETRY_FIRST, RETRY_MOST = 1.0, 30.0  # seconds before the first retry of failed leaves, and at most

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
        # Leaves Redis refused, by (client, channel): tried again by the flusher (`retry`).
        self._failed: dict[tuple[str, str], str] = {}
        self._failed_lock = threading.Lock()
        self._retry_at = 0.0  # time.monotonic() of the next retry
        self._retry_wait = RETRY_FIRST

    def _body(self, kind: str, channel: str, **fields) -> str:
        return dumps(event(kind, channel, **fields)) if self.wanted[kind] else ""

    # -- the Batchers' runs (web/hub/protocol.py) -------------------------------
    def join_all(self, calls: list[tuple[str, str, str]]) -> list[None]:
        """Count each (client, channel, user) subscription made here, a round trip per
        MAX_ENTRIES. RedisError goes to every caller of the batch."""
        with self._failed_lock:
            # A failed leave of the same socket and channel still counts it: that count now
            # stands for this subscription, and the retry must not take it off.
            for client, channel, _user in calls:
                self._failed.pop((client, channel), None)
        self.counts.join(self.node, EVENT_FIELD, [
            Join(channel, user, client, self._body(OCCUPIED, channel), self._body(JOIN, channel, user=user))
            for client, channel, user in calls])
        return [None] * len(calls)

    def leave_all(self, calls: list[tuple[str, str, Iterable[str], dict | None]]) -> list[None]:
        """Take each (client, user, channels, connection.closed event or None) off the counts,
        a round trip per MAX_ENTRIES, and append the `connection.closed` events wanted,
        whether or not Redis took the leaves (those it refused are tried again). Never raises
        RedisError."""
        leaves, closed = [], []
        for client, user, channels, closing in calls:
            leaves += [(client, channel, user) for channel in channels]
            if closing is not None:
                closed.append(closing)
        if leaves:
            try:
                self._leave(leaves)
            except redis.RedisError as exc:
                kept = self._keep(leaves)
                log.warning("subscriptions not uncounted, kept to retry",
                            extra={"node": self.node, "leaves": len(leaves), "kept": kept, "error": str(exc)})
        if closed:
            try:
                self.outbox.emit(closed)
            except redis.RedisError as exc:
                log.warning("connection.closed events not appended", extra={"events": len(closed),
                                                                             "error": str(exc)})
        return [None] * len(calls)

    def _leave(self, leaves: list[tuple[str, str, str]]) -> None:
        now = time.time()
        leave_due = now + self.user_grace if self.user_grace else ""
        vacate_due = now + self.channel_grace if self.channel_grace else ""
        self.counts.leave(self.node, EVENT_FIELD, [
            Leave(channel, user, client, leave_due, vacate_due,
                  "" if leave_due else self._body(LEAVE, channel, user=user),
                  "" if vacate_due else self._body(VACATED, channel))
            for client, channel, user in leaves])

    def _keep(self, leaves: list[tuple[str, str, str]]) -> int:
        """Keep failed leaves to retry, up to MAX_FAILED in all; returns how many were kept."""
        kept = 0
        with self._failed_lock:
            if not self._failed:  # the first failure of a run: its first retry after RETRY_FIRST
                self._retry_at = time.monotonic() + self._retry_wait
            for client, channel, user in leaves:
                if len(self._failed) >= MAX_FAILED:
                    break
                self._failed[(client, channel)] = user
                kept += 1
        return kept

    def retry(self, force: bool = False) -> int:
        """Try the failed leaves again when their backoff is over (or `force`); returns how many
        were taken (0 on another failure, kept for a later try with a longer wait)."""
        if not self._failed or not (force or time.monotonic() >= self._retry_at):
            return 0
        # Held through the call: a join of the same socket and channel (join_all) comes
        # wholly before it (and the retry leaves its count be) or wholly after.
        with self._failed_lock:
            leaves = [(client, channel, user) for (client, channel), user in self._failed.items()]
            try:
                self._leave(leaves)
            except redis.RedisError:
                self._retry_wait = min(self._retry_wait * 2, RETRY_MOST)
                self._retry_at = time.monotonic() + self._retry_wait
                return 0
            self._failed = {}
        self._retry_wait = RETRY_FIRST
        log.info("failed leaves retried", extra={"node": self.node, "leaves": len(leaves)})
        return len(leaves)

    def closed_event(self, client: str, user: str, code: int, reason: str) -> dict | None:
        """The `connection.closed` event of a socket, or None when no receiver wants it."""
        if not self.closed_wanted:
            return None
        return event(CLOSED, client=client, user=user, code=code, reason=reason)

    # -- the flusher ----------------------------------------------------------------
    def start(self) -> None:
        """Take what a process of the same name left counted off (before any client is here),
        then start the flusher (a thread): it ends the pending leaves when leaves here wait
        out a grace, and retries the leaves Redis refused."""
        try:
            # A process started under the name of one that died (HERALD_NODE_ID reused) keeps
            # that name's liveness key fresh: the reaper would never see the dead one's counts.
            while self._reap_node(self.node, REAP_ENTRIES):
                pass
        except redis.RedisError as exc:
            log.warning("leftover subscriptions not reaped", extra={"node": self.node, "error": str(exc)})
        if not self.running:
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
        """The flusher's loop, while the hub runs: every FLUSH_PERIOD, the failed leaves when
        their backoff is over, then the due leaves."""
        while self.running:
            try:
                self.retry()
                if self.waits and self.flush() >= FLUSH_ENTRIES:
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
        # A pending leave is due at most a grace from now: a vacate waiting on one, no later.
        horizon = time.time() + self.user_grace if self.user_grace else ""
        appended = self.counts.reap(node, EVENT_FIELD, horizon, [
            (entry, channel, user, self._body(LEAVE, channel, user=user), self._body(VACATED, channel))
            for entry, channel, user in entries])
        if entries:
            log.info("dead node's subscriptions reaped", extra={"node": node, "entries": len(entries),
                                                                "events": appended})
        return len(entries)
