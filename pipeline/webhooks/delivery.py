"""Sending one receiver's events, in stream order, from its cursor (docs/webhooks.md).

One task at a time sends a receiver's events: the one holding its lease
(`keys.webhook_lease`). A round reads the events after the receiver's cursor
(at most HERALD_WEBHOOK_BATCH, at most BODY_BYTES of body), keeps those it
wants, POSTs them as one batch and, on a 2xx, moves the cursor past them,
while it still holds the lease (webhook_advance.lua). A failed batch is
sent again, before anything after it, until HERALD_WEBHOOK_RETRY_FOR has
passed since it first failed: then it is dead-lettered and the cursor moves
past it. A receiver more than HERALD_WEBHOOK_BACKLOG events behind has the
oldest dead-lettered as well, so the stream stays bounded.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time

from pipeline.core.messages import loads
from pipeline.core.metrics import WEBHOOK_EVENTS_DEAD, WEBHOOK_EVENTS_SENT, WEBHOOK_FAILURES
from pipeline.webhooks import EVENT_FIELD
from pipeline.webhooks.sender import Sender

log = logging.getLogger("herald.webhooks")
BODY_BYTES = 1024 * 1024  # of one POST's body, at most (one event bigger than it goes alone)
SLICE = 3.0  # seconds a task sends batches before it hands the rest on as a new task
LEASE_MARGIN = 10.0  # seconds a lease outlives the longest a round may take, for a slow scheduler
BACKLOG = "backlog: the receiver was more than HERALD_WEBHOOK_BACKLOG events behind"


def lease_seconds(settings) -> float:
    """How long a lease lasts untouched: a round's POST and slice, and a margin; past it, a task
    that died (a worker killed mid-POST) is taken for gone and another sends the batch again."""
    # Invariant: a lease outlives the longest POST. A round renews it before each POST, and a
    # POST ends within webhook_timeout + sender.DEADLINE_SLACK (0.5 s) whatever the receiver does
    # (the Sender's watchdog cuts it), 12.5 s within this lease: no second task starts meanwhile.
    return settings.webhook_timeout + SLICE + LEASE_MARGIN


@dataclasses.dataclass
class Batch:
    """Events read after a cursor: the wanted ones' JSON, and the id of the last entry read
    (the cursor's next position, past entries the receiver does not want too)."""

    events: list[bytes]
    last: str | None


def batch(entries: list[tuple[str, dict]], wants, max_events: int, max_bytes: int = BODY_BYTES) -> Batch:
    """The batch of stream `entries` (id, fields) a receiver (`wants(type)`) is sent next: in
    order, at most `max_events` wanted ones and `max_bytes` of body (one at least)."""
    events: list[bytes] = []
    parsed: list[dict] = []
    size, last = len(b'{"events":[]}'), None
    for entry_id, fields in entries:
        raw = fields[EVENT_FIELD]
        raw = raw.encode() if isinstance(raw, str) else raw
        event = loads(raw)
        if wants(event["type"]):
            if events and (len(events) >= max_events or size + len(raw) + 1 > max_bytes):
                break
            events.append(raw)
            parsed.append(event)
            size += len(raw) + 1
        last = entry_id
    return Batch(in_channel_order(events, parsed), last)


def in_channel_order(events: list[bytes], parsed: list[dict]) -> list[bytes]:
    """The batch with each channel's message events in Kafka order (by `offset`), in the places
    those events hold: workers append them after the order gate in a round trip of their own,
    so two workers passing a channel's records one after the other may append them crosswise."""
    places: dict[str, list[int]] = {}
    for n, event in enumerate(parsed):
        if event["type"].startswith("message.") and isinstance(event.get("offset"), int):
            places.setdefault(event.get("channel", ""), []).append(n)
    ordered = list(events)
    for positions in places.values():
        for place, source in zip(positions, sorted(positions, key=lambda n: parsed[n]["offset"])):
            ordered[place] = events[source]
    return ordered


def body(events: list[bytes]) -> bytes:
    """The POST body of a batch: `{"events": [...]}`, each event's JSON as stored."""
    return b'{"events":[' + b",".join(events) + b"]}"


class Outcome(enum.Enum):
    """What a task's rounds came to."""

    IDLE = "idle"  # nothing left to send
    MORE = "more"  # the slice ended with events left
    FAILED = "failed"  # a batch failed: it is sent again after a backoff
    LOST = "lost"  # another task holds the lease now


IDLE, MORE, FAILED, LOST = Outcome.IDLE, Outcome.MORE, Outcome.FAILED, Outcome.LOST


class Delivery:
    """Sends one receiver's events (`Receiver`), holding its lease with `token`."""

    def __init__(self, settings, store, sender: Sender, receiver, token: str):
        self.settings = settings
        self.redis = store.redis
        self.keys = store.keys
        self.state = store.webhooks
        self.sender = sender
        self.receiver = receiver
        self.name = receiver.name
        self.token = token
        self.failing_since: float | None = None  # when the batch in hand first failed (time.time())

    def run(self, failing_since: float | None = None, slice_seconds: float = SLICE) -> Outcome:
        """Send batches for `slice_seconds`: IDLE once none is left, MORE when the slice ended
        first, FAILED when a batch failed (`failing_since` says since when), LOST when the lease
        went to another task."""
        self.failing_since = failing_since
        deadline = time.monotonic() + slice_seconds
        while time.monotonic() < deadline:
            if not self.state.renew_lease(self.name, self.token, lease_seconds(self.settings)):
                return LOST
            cursor = self.state.cursor(self.name)
            if self._over_backlog(cursor):
                continue
            entries = self.redis.xrange(self.keys.events, f"({cursor}", "+", count=self.settings.webhook_batch)
            if not entries:
                return IDLE
            step = batch(entries, self.receiver.wants, self.settings.webhook_batch)
            if not step.events:  # nothing it wants: only the cursor moves
                if not self.state.advance(self.name, self.token, step.last, EVENT_FIELD):
                    return LOST
                continue
            outcome = self._send(step)
            if outcome is not None:
                return outcome
        return MORE

    def _send(self, step: Batch) -> Outcome | None:
        accepted, what = self.sender.post(self.receiver.url, body(step.events))
        if accepted:
            self.failing_since = None
            if not self.state.advance(self.name, self.token, step.last, EVENT_FIELD):
                return LOST
            WEBHOOK_EVENTS_SENT.labels(self.name).inc(len(step.events))
            return None
        WEBHOOK_FAILURES.labels(self.name).inc()
        now = time.time()
        self.failing_since = self.failing_since or now
        if now - self.failing_since < self.settings.webhook_retry_for:
            log.warning("webhook batch failed", extra={"receiver": self.name, "error": what,
                                                       "count": len(step.events), "until": step.last})
            return FAILED
        reason = f"refused for HERALD_WEBHOOK_RETRY_FOR ({self.settings.webhook_retry_for:g}s); last: {what}"
        return self._dead_letter(step, reason)

    def _dead_letter(self, step: Batch, reason: str) -> Outcome | None:
        if not self.state.advance(self.name, self.token, step.last, EVENT_FIELD,
                                  [e.decode() for e in step.events], reason):
            return LOST
        self.failing_since = None
        WEBHOOK_EVENTS_DEAD.labels(self.name).inc(len(step.events))
        log.error("webhook events dead-lettered", extra={"receiver": self.name, "count": len(step.events),
                                                         "until": step.last, "reason": reason})
        return None

    def _over_backlog(self, cursor: str) -> bool:
        # The stream is trimmed up to the least cursor: past the backlog, the receiver
        # holding that cursor is the one behind; its oldest events are dead-lettered,
        # a batch a round, until it is within the backlog again.
        if self.redis.xlen(self.keys.events) <= self.settings.webhook_backlog:
            return False
        cursors = [self.state.cursor(r.name) for r in self.settings.webhooks]
        if min(cursors, key=position) != cursor:
            return False
        entries = self.redis.xrange(self.keys.events, f"({cursor}", "+", count=self.settings.webhook_batch)
        step = batch(entries, self.receiver.wants, self.settings.webhook_batch)
        if step.last is None:
            return False
        return self._dead_letter(step, BACKLOG) is None


def position(stream_id: str) -> tuple[int, int]:
    """A stream id (`<ms>-<seq>`) as a pair that sorts as the stream does."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
