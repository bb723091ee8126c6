"""The archive's table as the queries see it, and how a message's stream id is stored in it.

The schema itself is the migrations' (pipeline/archive/migrations): the release
phase applies them, and a test checks that this table matches what they make.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text

from pipeline.core import streamids

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


def bounded(sid: str) -> tuple[int, int]:
    """A stream id's (ms, seq), each part at most the columns' largest value.

    A client's offset may hold parts up to 2**64 - 1 (Redis takes them); the
    columns are signed 64-bit, and SQLite refuses a larger value outright. No
    stored id comes near 2**63, so the largest column value orders the same way
    against every row.
    """
    ms, seq = streamids.parts(sid)
    return min(ms, BIGINT_MAX), min(seq, BIGINT_MAX)


def row_stream_id(row) -> str | None:
    """The stream id a row's columns hold, or None before its offset was recorded."""
    return streamids.join(row["stream_ms"], row["stream_seq"]) if row["stream_ms"] is not None else None
