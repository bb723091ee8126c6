"""The SQL archive of delivered messages (SQLite by default, PostgreSQL via DATABASE_URL).

Rows are keyed by the message's global id, which scopes a client's id to its
sender (pipeline/core/ids.py): another sender's message never shares a row.
"""

from __future__ import annotations

import json

import redis
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from pipeline.core import streamids
from pipeline.core.errors import TransientError
from pipeline.core.frames import message_frame
from pipeline.core.ids import client_id
from pipeline.core.messages import Envelope

BIGINT_MAX = (1 << 63) - 1

metadata = MetaData()

messages = Table(
    "herald_messages",
    metadata,
    Column("id", String(128), primary_key=True),  # the global id
    Column("channel", String(200), nullable=False, index=True),
    Column("type", String(64), nullable=False),
    Column("data", Text, nullable=False),
    Column("sender", String(200), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("partition", Integer),
    Column("offset", BigInteger),
    # The message's history offset (its Redis stream id, ms-seq), recorded once
    # delivered: history read from the archive carries the same cursor.
    Column("stream_ms", BigInteger),
    Column("stream_seq", BigInteger),
    Index("ix_herald_messages_channel_stream", "channel", "stream_ms", "stream_seq"),
    Index("ix_herald_messages_ts", "ts"),
)


class Archive:
    """Idempotent inserts: archiving one message twice keeps one row; of two messages one
    sender published under one id (a day apart: its id may be published again once its
    status expired), the row keeps the later one."""

    def __init__(self, database_url: str, bloom=None):
        self.bloom = bloom  # pipeline.archive.bloom.Bloom: archived ids are added to it
        sqlite = database_url.startswith("sqlite")
        # SQLite serialises writers; a busy timeout makes concurrent workers wait, not fail.
        self.engine = create_engine(database_url, connect_args={"timeout": 15} if sqlite else {},
                                    pool_pre_ping=True)
        self._insert = sqlite_insert if sqlite else pg_insert
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_wal)
        self._ready = False

    def create_schema(self) -> None:
        """Apply the schema migrations (the release phase calls this)."""
        from pipeline.archive.migrations import upgrade

        upgrade(self.engine)

    def _ensure_table(self) -> None:
        # Made on first use, not at start: a database that is down when the
        # worker starts is a transient error of the first task, not a crash.
        if self._ready:
            return
        try:
            metadata.create_all(self.engine)
        except OperationalError:
            # Another worker process may have created the table between our
            # check and our CREATE; a second pass sees it and does nothing.
            metadata.create_all(self.engine)
        self._ready = True

    def store(self, envelopes: list[Envelope]) -> None:
        """Insert messages not archived yet; raises TransientError when the database fails."""
        if not envelopes:
            return
        latest: dict[str, Envelope] = {}  # one row per id: an upsert may not touch a row twice
        for e in envelopes:
            if e.id not in latest or latest[e.id].ts < e.ts:
                latest[e.id] = e
        rows = [{
            "id": e.id, "channel": e.channel, "type": e.type,
            "data": json.dumps(e.data, ensure_ascii=False), "sender": e.sender or "",
            "ts": e.ts, "partition": e.partition, "offset": e.offset,
        } for e in latest.values()]
        insert = self._insert(messages)
        # A later message under the id replaces the row, and its history offset
        # is recorded afresh (record_offsets): the earlier one's offset was once
        # written onto a row that kept the first message for ever (issue 19).
        replaced = {name: insert.excluded[name] for name in
                    ("channel", "type", "data", "sender", "ts", "partition", "offset")}
        statement = insert.on_conflict_do_update(
            index_elements=["id"], set_={**replaced, "stream_ms": None, "stream_seq": None},
            where=messages.c.ts < insert.excluded.ts)
        try:
            self._ensure_table()
            with self.engine.begin() as conn:
                conn.execute(statement, rows)
        except SQLAlchemyError as exc:  # down, a pool timeout, a refusal: never one message's fault
            raise TransientError(f"archive unavailable: {getattr(exc, 'orig', None) or exc}") from None
        self._add_to_bloom([e.id for e in envelopes])

    def _add_to_bloom(self, ids: list[str]) -> None:
        # After the insert: an id in the filter is always in the archive. A
        # failure retries the batch (both steps are idempotent); an id left
        # out would be a 404 until the filter is rebuilt.
        if self.bloom is None:
            return
        try:
            self.bloom.add(ids)
        except redis.RedisError as exc:
            raise TransientError(f"Bloom filter unavailable: {exc}") from None

    def record_offsets(self, placed: list[tuple[str, str]]) -> None:
        """Record the history offsets (stream ids) of delivered messages, (global id, stream id)
        pairs, in one statement; raises TransientError when the database fails."""
        if not placed:
            return
        rows = []
        for msg_id, sid in placed:
            ms, seq = streamids.parts(sid)
            rows.append({"m_id": msg_id, "m_ms": ms, "m_seq": seq})
        statement = update(messages).where(messages.c.id == bindparam("m_id")).values(
            stream_ms=bindparam("m_ms"), stream_seq=bindparam("m_seq"))
        try:
            with self.engine.begin() as conn:
                conn.execute(statement, rows)
        except SQLAlchemyError as exc:  # down, a pool timeout, a refusal: never one message's fault
            raise TransientError(f"archive unavailable: {getattr(exc, 'orig', None) or exc}") from None

    def count(self, channel: str | None = None) -> int:
        """How many messages are archived (in one channel)."""
        self._ensure_table()
        query = select(func.count()).select_from(messages)
        if channel:
            query = query.where(messages.c.channel == channel)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def dispose(self) -> None:
        """Close pooled connections (before a fork, or at exit)."""
        self.engine.dispose()


class ArchiveUnavailable(TransientError):
    """The archive's database did not answer a read."""


def _bounded(sid: str) -> tuple[int, int]:
    # A client's offset may hold parts up to 2**64 - 1 (Redis takes them); the
    # columns are signed 64-bit, and SQLite refuses a larger value outright (a 500
    # schemathesis found). No stored id comes near 2**63, so the largest column
    # value orders the same way against every row.
    return tuple(min(part, BIGINT_MAX) for part in streamids.parts(sid))


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
    """The read side of the archive: messages by id, a channel's history by offset,
    the ids for the Bloom filter, pruning by age."""

    def __init__(self, archive: Archive):
        self.engine = archive.engine

    @_reading
    def get(self, msg_id: str) -> dict | None:
        """The archived message of a global id, in the shape of `GET /api/v1/messages/{id}`, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(messages).where(messages.c.id == msg_id)).mappings().first()
        if row is None:
            return None
        sid = _sid(row)
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
                                        position > tuple_(*_bounded(since)))
                 .order_by(messages.c.stream_ms, messages.c.stream_seq).limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [message_frame(channel=row["channel"], id=client_id(row["id"]), type=row["type"],
                              data=json.loads(row["data"]), sender=row["sender"] or None, ts=row["ts"],
                              offset=_sid(row)) for row in rows]

    @_reading
    def holds(self, channel: str, until: str) -> bool:
        """Whether the archive still has a message of the channel at or before offset `until`:
        then pruning has taken nothing after it."""
        ms, seq = _bounded(until)
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

    @_reading
    def prune(self, max_age: float, now_ms: int) -> int:
        """Delete messages older than `max_age` seconds; returns how many."""
        with self.engine.begin() as conn:
            return conn.execute(delete(messages).where(messages.c.ts < now_ms - int(max_age * 1000))).rowcount


def _sid(row) -> str | None:
    return streamids.join(row["stream_ms"], row["stream_seq"]) if row["stream_ms"] is not None else None


def _sqlite_wal(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit
    # survives the process dying, and only an OS crash or power loss may take
    # back the last ones (SQLite: "WAL mode"). FULL's fsync per commit, 4 ms on
    # the development machine, capped each worker at ~250 tasks/s whatever
    # their size, so messages arriving one by one queued for seconds.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
