"""A receiver's webhook dead letters: listed newest first, and replayed (docs/webhooks.md).

Each dead-lettered event is one entry of the receiver's dead-letter stream
(`keys.webhook_dead_letters`): the event's JSON as it was to be sent (`e`),
why (`r`) and when, in milliseconds (`t`); at most DEAD_LETTER_CAP are kept.
A replay POSTs them to the receiver again, with their own event ids (the
receiver dedupes), and removes them once it answered 2xx; a failed replay
keeps them.
"""

from __future__ import annotations

import logging
import time

from pipeline.core.errors import Refused
from pipeline.core.messages import loads
from pipeline.webhooks import EVENT_FIELD
from pipeline.webhooks.delivery import BODY_BYTES, batch, body
from pipeline.webhooks.sender import Sender

log = logging.getLogger("herald.webhooks")
REPLAY_MAX = 5000  # dead-lettered events one replay call sends, at most (the rest wait for the next)
MAX_IDS = 1000  # event ids one replay may name
REPLAY_SECONDS = 10.0  # a replay starts no batch past this (an admin's request must not hang on a slow receiver)
SCAN = 1000  # dead-letter entries read a round trip while looking for named ids


class UnknownReceiver(Refused):
    """No configured receiver has this name."""


class ReplayFailed(Refused):
    """The receiver did not accept the replayed events; they stay dead-lettered."""


class WebhookDeadLetters:
    """Listing and replay of the configured receivers' dead letters."""

    def __init__(self, store, settings, sender: Sender | None = None):
        self.redis = store.redis
        self.keys = store.keys
        self.settings = settings
        self.receivers = {r.name: r for r in settings.webhooks}
        self._sender = sender

    def receiver(self, name: str):
        """The configured receiver named `name`, or UnknownReceiver."""
        try:
            return self.receivers[name]
        except KeyError:
            raise UnknownReceiver(f"no webhook receiver is named {name}") from None

    def count(self, name: str) -> int:
        """How many events the receiver has dead-lettered."""
        return self.redis.xlen(self.keys.webhook_dead_letters(self.receiver(name).name))

    def page(self, name: str, limit: int = 50, after: str | None = None) -> dict:
        """Dead letters, newest first: `{items, next, total}`; `next` (the last item's letter id)
        continues the listing."""
        key = self.keys.webhook_dead_letters(self.receiver(name).name)
        entries = self.redis.xrevrange(key, f"({after}" if after else "+", "-", count=limit + 1)
        items = [_item(entry_id, fields) for entry_id, fields in entries[:limit]]
        more = len(entries) > limit
        return {"items": items, "next": items[-1]["letter"] if more else None, "total": self.redis.xlen(key)}

    def replay(self, name: str, ids: list[str] | None = None) -> dict:
        """POST the dead-lettered events (all, oldest first, up to REPLAY_MAX; or those whose
        event ids are `ids`) to the receiver again, in batches, removing each batch it accepts.
        Batches start for REPLAY_SECONDS at most. Returns `{replayed, remaining}`; ReplayFailed
        when a batch was refused (the ones before it stay replayed)."""
        receiver = self.receiver(name)
        key = self.keys.webhook_dead_letters(receiver.name)
        entries = self._entries(key, set(ids)) if ids is not None else self.redis.xrange(key, count=REPLAY_MAX)
        replayed, deadline = 0, time.monotonic() + REPLAY_SECONDS
        while entries and time.monotonic() < deadline:
            step = batch(entries, lambda _type: True, self.settings.webhook_batch, BODY_BYTES)
            taken = entries[:len(step.events)]
            accepted, what = self.sender.post(receiver.url, body(step.events))
            if not accepted:
                log.warning("webhook replay failed", extra={"receiver": receiver.name, "error": what,
                                                            "replayed": replayed})
                raise ReplayFailed(f"the receiver did not accept the replay ({what}); "
                                   f"{replayed} events were replayed before")
            self.redis.xdel(key, *[entry_id for entry_id, _ in taken])
            replayed += len(taken)
            entries = entries[len(taken):]
        log.info("webhook dead letters replayed", extra={"receiver": receiver.name, "count": replayed})
        return {"replayed": replayed, "remaining": self.redis.xlen(key)}

    @property
    def sender(self) -> Sender:
        """The HTTP client of replays, made at first use."""
        if self._sender is None:
            self._sender = Sender(self.settings)
        return self._sender

    def _entries(self, key: str, wanted: set[str]) -> list[tuple[str, dict]]:
        # The entries holding the named events, oldest first, read SCAN at a time
        # (the stream holds DEAD_LETTER_CAP at most).
        found: list[tuple[str, dict]] = []
        start = "-"
        while wanted:
            entries = self.redis.xrange(key, start, "+", count=SCAN)
            for entry_id, fields in entries:
                event_id = loads(fields[EVENT_FIELD])["id"]
                if event_id in wanted:
                    wanted.discard(event_id)
                    found.append((entry_id, fields))
            if len(entries) < SCAN:
                break
            start = f"({entries[-1][0]}"
        return found


def _item(entry_id: str, fields: dict) -> dict:
    return {"letter": entry_id, "reason": fields.get("r", ""), "failed_at": int(fields.get("t", 0)),
            "event": loads(fields[EVENT_FIELD])}
