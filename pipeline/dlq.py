"""Dead letters: the `<topic>.dlq` Kafka topic, plus a Redis index for listing and replay.

A letter is named by its message's global id (pipeline/core/ids.py: a minted ULID,
or `<scope>.<id>`), a record that could not be decoded by `raw-<p>-<o>`: no
message id takes that form, so a client cannot overwrite or pre-empt the
bridge's letter by choosing one.
"""

from __future__ import annotations

import json
import logging

from pipeline.core.errors import Refused
from pipeline.core.ids import client_id
from pipeline.core.messages import Envelope, dead_letter_headers, encode, now_ms, replay_headers
from pipeline.core.metrics import DEAD_LETTERS

log = logging.getLogger("herald.dlq")


class NotReplayable(Refused):
    """A dead letter that cannot go back through the pipeline: never decoded, or being replayed."""


class NoDeadLetter(NotReplayable):
    """No dead letter has this id (never one, or replayed, or expired)."""


class DeadLetters:
    """Writes a dead letter durably to Kafka first, then indexes it in Redis."""

    def __init__(self, publisher, store, settings, outbox=None):
        self.publisher = publisher
        self.store = store
        self.settings = settings
        # pipeline.webhooks.Outbox when a receiver is configured: message.dead_lettered (docs/webhooks.md).
        self.outbox = outbox
        # A dead letter is kept for a week of status lifetimes (Kafka keeps it as long as the topic does).
        self._keep_seconds = settings.status_ttl * 7

    def send(self, *, reason: str, partition: int, offset: int, attempts: int,
             envelope: Envelope | None = None, raw: bytes | None = None, key=None) -> str:
        """Dead-letter one message (an envelope, or a record that could not be decoded); returns its id."""
        # Pipeline bookkeeping (offsets, ordering hints) is not part of the message.
        message = envelope.stripped() if envelope else None
        letter_id = message.id if message else f"raw-{partition}-{offset}"
        failed_at = now_ms()
        headers = dead_letter_headers(reason=reason, partition=partition, offset=offset, attempts=attempts,
                                      failed_at=failed_at)
        value = encode(message) if message else (raw or b"")
        if key is None and message:
            key = message.channel
        self.publisher.publish(self.settings.dlq_topic, key, value, headers)
        entry = {
            "id": letter_id, "reason": reason, "partition": partition, "offset": offset,
            "attempts": attempts, "failed_at": failed_at,
            "channel": message.channel if message else None,
            "message": message.to_wire() if message else None,
            "raw": None if message else (raw or b"").decode("utf-8", "replace")[:4096],
        }
        index = self.store.keys.dead_letter_index
        pipe = self.store.redis.pipeline()
        pipe.set(self.store.keys.dead_letter(letter_id), json.dumps(entry), ex=self._keep_seconds)
        pipe.zadd(index, {letter_id: failed_at})
        # Entries expire; their ids leave the index with them, or it would grow for ever.
        pipe.zremrangebyscore(index, "-inf", failed_at - self._keep_seconds * 1000)
        if self.outbox is not None and envelope is not None and self.outbox.wants("message.dead_lettered"):
            # A record never decoded has no message to tell about.
            self.outbox.emit([self.outbox.message_event("message.dead_lettered", envelope, reason=reason,
                                                        attempts=attempts)], pipe)
        pipe.execute()
        DEAD_LETTERS.inc()
        log.warning("dead-lettered", extra={"message_id": letter_id, "reason": reason,
                                            "partition": partition, "offset": offset, "attempts": attempts})
        return letter_id


    def list(self, limit: int = 50, cursor: int = 0) -> dict:
        """Dead letters, newest first: `{items, next, total}`; `next` is the cursor of the next page."""
        index = self.store.keys.dead_letter_index
        ids = self.store.redis.zrevrange(index, cursor, cursor + limit - 1)
        total = self.store.redis.zcard(index)
        raw = self.store.mget([self.store.keys.dead_letter(i) for i in ids]) if ids else []
        items = [json.loads(r) for r in raw if r]
        more = cursor + len(ids) < total
        return {"items": items, "next": cursor + len(ids) if more else None, "total": total}

    def get(self, letter_id: str) -> dict | None:
        """One dead letter, or None."""
        raw = self.store.redis.get(self.store.keys.dead_letter(letter_id))
        return json.loads(raw) if raw else None

    def replay(self, letter_id: str) -> dict:
        """Send a dead letter back through the pipeline; it leaves the DLQ once Kafka has it again."""
        entry = self.get(letter_id)
        if entry is None:
            raise NoDeadLetter(f"no dead letter {letter_id}")
        if not entry.get("message"):
            raise NotReplayable(f"dead letter {letter_id} was never a valid message and cannot be replayed")
        envelope = Envelope.from_wire(entry["message"])
        index = self.store.keys.dead_letter_index
        # Taken off the index first: of two replays at once, only one publishes.
        if not self.store.redis.zrem(index, letter_id):
            raise NotReplayable(f"dead letter {letter_id} is being replayed")
        try:
            partition, offset = self.publisher.publish(self.settings.topic, envelope.channel, encode(envelope),
                                                       replay_headers())
        except Exception:
            self.store.redis.zadd(index, {letter_id: entry["failed_at"]})  # still dead: it may be replayed again
            raise
        # The message starts over: its status may move forward again.
        self.store.set_status(envelope, "accepted", force=True,
                              fields={"partition": str(partition), "offset": str(offset), "error": ""})
        self.store.redis.delete(self.store.keys.dead_letter(letter_id))
        log.info("replayed", extra={"message_id": letter_id, "partition": partition, "offset": offset})
        return {"id": client_id(envelope.id), "global_id": envelope.id, "channel": envelope.channel,
                "status": "accepted", "partition": partition, "offset": offset}
