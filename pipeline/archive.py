"""The SQL archive of delivered messages (SQLite by default, PostgreSQL via DATABASE_URL)."""

from __future__ import annotations

import json

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, create_engine, event, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError

from pipeline.errors import TransientError
from pipeline.messages import Envelope

metadata = MetaData()

messages = Table(
    "herald_messages",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("channel", String(200), nullable=False, index=True),
    Column("type", String(64), nullable=False),
    Column("data", Text, nullable=False),
    Column("sender", String(200), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("partition", Integer),
    Column("offset", BigInteger),
)


class Archive:
    """Idempotent inserts: archiving one message twice keeps one row."""

    def __init__(self, database_url: str):
        sqlite = database_url.startswith("sqlite")
        # SQLite serialises writers; a busy timeout makes concurrent workers wait, not fail.
        self.engine = create_engine(database_url, connect_args={"timeout": 15} if sqlite else {},
                                    pool_pre_ping=True)
        self._insert = sqlite_insert if sqlite else pg_insert
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_wal)
        self._ready = False

    def create_schema(self) -> None:
        """Create the archive's table when missing (the release phase calls this)."""
        metadata.create_all(self.engine)

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
        """Insert messages not archived yet; raises TransientError when the database is unreachable."""
        if not envelopes:
            return
        rows = [{
            "id": e.id, "channel": e.channel, "type": e.type,
            "data": json.dumps(e.data, ensure_ascii=False), "sender": e.sender or "",
            "ts": e.ts, "partition": e.partition, "offset": e.offset,
        } for e in envelopes]
        statement = self._insert(messages).on_conflict_do_nothing(index_elements=["id"])
        try:
            self._ensure_table()
            with self.engine.begin() as conn:
                conn.execute(statement, rows)
        except OperationalError as exc:
            raise TransientError(f"archive unavailable: {exc.orig}") from None

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
