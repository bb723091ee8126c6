"""The write side of the archive: the worker's inserts and history offsets, pruning by age."""

from __future__ import annotations

import json

import redis
from sqlalchemy import bindparam, create_engine, delete, event, inspect, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from pipeline.archive.tables import messages
from pipeline.core import streamids
from pipeline.core.errors import TransientError
from pipeline.core.messages import Envelope


class Archive:
    """Idempotent inserts: archiving one message twice keeps one row; of two messages one
    sender published under one id (a day apart: its id may be published again once its
    status expired), the row keeps the later one.

    The table is the migrations' (`create_schema`): the release phase applies
    them, and a process that finds no table at its first write applies them
    too, so a database that was down or lost at start is made whole when it
    comes back.
    """

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

    def _ensure_schema(self) -> None:
        # On first use, not at start: a database that is down when the worker
        # starts is a transient error of the first task, not a crash.
        if self._ready:
            return
        if not inspect(self.engine).has_table(messages.name):  # one query; the migrations only when needed
            try:
                self.create_schema()
            except SQLAlchemyError:
                # Another worker process may have applied them between our check
                # and our CREATE; a second pass finds the head revision, and does nothing.
                self.create_schema()
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
        # is recorded afresh (record_offsets): the earlier one's offset must not
        # stay on a row that now holds another message.
        replaced = {name: insert.excluded[name] for name in
                    ("channel", "type", "data", "sender", "ts", "partition", "offset")}
        statement = insert.on_conflict_do_update(
            index_elements=["id"], set_={**replaced, "stream_ms": None, "stream_seq": None},
            where=messages.c.ts < insert.excluded.ts)
        try:
            self._ensure_schema()
            with self.engine.begin() as conn:
                conn.execute(statement, rows)
        except SQLAlchemyError as exc:
            raise _unavailable(exc) from None
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
        except SQLAlchemyError as exc:
            raise _unavailable(exc) from None

    def prune(self, max_age: float, now_ms: int) -> int:
        """Delete messages older than `max_age` seconds; returns how many. Raises
        TransientError when the database fails."""
        try:
            with self.engine.begin() as conn:
                return conn.execute(delete(messages).where(messages.c.ts < now_ms - int(max_age * 1000))).rowcount
        except SQLAlchemyError as exc:
            raise _unavailable(exc) from None

    def dispose(self) -> None:
        """Close pooled connections (before a fork, or at exit)."""
        self.engine.dispose()


def _unavailable(exc: SQLAlchemyError) -> TransientError:
    # Down, a pool timeout, a refusal: never one message's fault.
    return TransientError(f"archive unavailable: {getattr(exc, 'orig', None) or exc}")


def _sqlite_wal(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit
    # survives the process dying, and only an OS crash or power loss may take
    # back the last ones (SQLite: "WAL mode"). FULL's fsync per commit capped
    # each worker's tasks a second whatever their size (docs/benchmarks.md: History).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
