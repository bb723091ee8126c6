"""The read side of the archive: messages by id, a channel's history by offset, the ids for the Bloom filter."""

from __future__ import annotations

import json
from typing import cast

from sqlalchemy import and_, or_, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from pipeline.archive.tables import bounded, messages, row_stream_id
from pipeline.core.errors import TransientError
from pipeline.core.frames import message_frame
from pipeline.core.ids import client_id


class ArchiveUnavailable(TransientError):
    """The archive's database did not answer a read."""


def _reading(method):
    # Every read failure is one error the web turns into a 503 with Retry-After.
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise ArchiveUnavailable(f"archive unavailable: {getattr(exc, 'orig', None) or exc}") from None
    wrapped.__doc__ = method.__doc__
    wrapped.__name__ = method.__name__
    return wrapped


class ArchiveReader:
    """Reads of the archive, on the engine of an `Archive` (pipeline/archive/writer.py)."""

    def __init__(self, archive):
        self.engine = archive.engine

    @_reading
    def get(self, msg_id: str) -> dict | None:
        """The archived message of a global id, in the shape of `GET /api/v1/messages/{id}`, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(messages).where(messages.c.id == msg_id)).mappings().first()
        if row is None:
            return None
        sid = row_stream_id(row)
        return {"id": client_id(row["id"]), "channel": row["channel"], "type": row["type"],
                "sender": row["sender"] or None,
                # Only messages that passed their order gate carry a stream id; one archived
                # and then dead-lettered keeps none.
                "status": "delivered" if sid else "archived", "error": None, "ts": row["ts"], "attempts": 0,
                "partition": row["partition"], "offset": row["offset"], "data": json.loads(row["data"]),
                "stream_id": sid}

    @_reading
    def after(self, channel: str, since: str, limit: int) -> list[dict]:
        """Up to `limit` message frames of the channel after offset `since`, oldest first."""
        position = tuple_(messages.c.stream_ms, messages.c.stream_seq)
        query = (select(messages).where(messages.c.channel == channel, messages.c.stream_ms.is_not(None),
                                        position > tuple_(*bounded(since)))
                 .order_by(messages.c.stream_ms, messages.c.stream_seq).limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [message_frame(channel=row["channel"], id=client_id(row["id"]), type=row["type"],
                              data=json.loads(row["data"]), sender=row["sender"] or None, ts=row["ts"],
                              offset=cast(str, row_stream_id(row))) for row in rows]  # rows with a stream_ms only

    @_reading
    def holds(self, channel: str, until: str) -> bool:
        """Whether the archive still has a message of the channel at or before offset `until`:
        then pruning has taken nothing after it."""
        ms, seq = bounded(until)
        query = select(messages.c.id).where(
            messages.c.channel == channel, messages.c.stream_ms.is_not(None),
            or_(messages.c.stream_ms < ms, and_(messages.c.stream_ms == ms, messages.c.stream_seq <= seq))).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def ids(self, chunk: int = 10000):
        """Every archived (global) id, read in chunks by id."""
        last = ""
        while True:
            with self.engine.connect() as conn:
                batch = conn.execute(select(messages.c.id).where(messages.c.id > last)
                                     .order_by(messages.c.id).limit(chunk)).scalars().all()
            yield from batch
            if len(batch) < chunk:
                return
            last = batch[-1]
