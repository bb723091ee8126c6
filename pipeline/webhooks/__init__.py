"""Webhooks (docs/webhooks.md): events appended to one Redis stream, sent to each receiver.

Web processes and workers append events (`Outbox.emit`, or an occupancy
script that appends the events its transition decides); each receiver reads
the stream from a cursor of its own, in order, so a channel's events reach it
in the order they were appended.

- `signing`: the Herald-Signature header and `verify`, what a receiver checks;
- `sender`: one POST, bounded in time and in what it reads;
- `delivery`: one receiver's batches from its cursor, under its lease;
- `deadletters`: a receiver's dead letters, listed and replayed.
"""

from __future__ import annotations

from pipeline.core.events import event
from pipeline.core.ids import client_id
from pipeline.core.messages import Envelope, dumps

# The field of a stream entry that holds the event's JSON (the occupancy scripts are given it).
EVENT_FIELD = "e"


class Outbox:
    """Appends events to the webhook stream, when a receiver wants them."""

    def __init__(self, store, settings):
        self.store = store
        self.keys = store.keys
        self.receivers = settings.webhooks

    def wants(self, event_type: str) -> bool:
        """True when some receiver wants events of `event_type` (else emitting them is skipped)."""
        return any(receiver.wants(event_type) for receiver in self.receivers)

    @staticmethod
    def message_event(event_type: str, envelope: Envelope, **fields: object) -> dict[str, object]:
        """A `message.*` event about `envelope`. Its id is the same each time the same outcome
        of the same record is told (a worker that died after the gate and before the event
        tells it again; the receiver dedupes): `<global id>.delivered` (a message is delivered
        once), else `<global id>.<outcome>.<offset>` (a replayed message is a new record)."""
        outcome = event_type.partition(".")[2]
        event_id = f"{envelope.id}.{outcome}"
        if outcome != "delivered":
            event_id += f".{envelope.offset}"
        return event(event_type, envelope.channel, event_id=event_id, message_id=client_id(envelope.id),
                     global_id=envelope.id, sender=envelope.sender or None, offset=envelope.offset, **fields)

    def emit(self, events: list[dict], pipe=None) -> None:
        """Append the wanted ones of `events` (pipeline.core.events.event) in order: on `pipe`
        when given (the caller executes it), else in one round trip of their own."""
        wanted = [e for e in events if self.wants(e["type"])]
        if not wanted:
            return
        target = pipe if pipe is not None else self.store.redis.pipeline(transaction=False)
        for one in wanted:
            target.xadd(self.keys.events, {EVENT_FIELD: dumps(one)})
        if pipe is None:
            target.execute()
