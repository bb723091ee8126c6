"""Dead letters: the `<topic>.dlq` Kafka topic, plus a Redis index for listing and replay."""

from __future__ import annotations

import json
import logging

from pipeline.messages import encode, now_ms

log = logging.getLogger("herald.dlq")


class DeadLetters:
    """Writes a dead letter durably to Kafka first, then indexes it in Redis."""

    def __init__(self, publisher, store, settings):
        self.publisher = publisher
        self.store = store
        self.settings = settings

    def send(self, *, reason: str, partition: int, offset: int, attempts: int,
             envelope: dict | None = None, raw: bytes | None = None, key=None) -> str:
        """Dead-letter one message (an envelope, or a record that could not be decoded); returns its id."""
        letter_id = envelope["id"] if envelope else f"raw-{partition}-{offset}"
        failed_at = now_ms()
        headers = [
            ("herald-error", reason.encode()[:4096]),
            ("herald-partition", str(partition).encode()),
            ("herald-offset", str(offset).encode()),
            ("herald-attempts", str(attempts).encode()),
            ("herald-failed-at", str(failed_at).encode()),
        ]
        value = encode(_original(envelope)) if envelope else (raw or b"")
        if key is None and envelope:
            key = envelope["channel"]
        self.publisher.publish(self.settings.dlq_topic, key, value, headers)
        entry = {
            "id": letter_id, "reason": reason, "partition": partition, "offset": offset,
            "attempts": attempts, "failed_at": failed_at,
            "channel": envelope["channel"] if envelope else None,
            "message": _original(envelope) if envelope else None,
            "raw": None if envelope else (raw or b"").decode("utf-8", "replace")[:4096],
        }
        pipe = self.store.redis.pipeline()
        pipe.set(self.store.key("dlq", letter_id), json.dumps(entry), ex=self.settings.status_ttl * 7)
        pipe.zadd(self.store.key("dlq", "index"), {letter_id: failed_at})
        pipe.execute()
        log.warning("dead-lettered", extra={"message_id": letter_id, "reason": reason,
                                            "partition": partition, "offset": offset, "attempts": attempts})
        return letter_id


def _original(envelope: dict) -> dict:
    # Pipeline bookkeeping (offsets, ordering hints) is not part of the message.
    return {k: envelope[k] for k in ("id", "channel", "type", "data", "sender", "ts") if k in envelope}
