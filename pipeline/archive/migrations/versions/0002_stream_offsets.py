"""History offsets in the archive: a message's stream id (ms, seq), indexed with its
channel, so history older than the Redis stream is read from here; and an index
on ts for pruning by age.

Workers of earlier versions created a missing table with these already:
each step is skipped when what it adds is there.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    inspector = sa.inspect(op.get_bind())
    columns = {column["name"] for column in inspector.get_columns("herald_messages")}
    indexes = {index["name"] for index in inspector.get_indexes("herald_messages")}
    with op.batch_alter_table("herald_messages") as batch:
        for name in ("stream_ms", "stream_seq"):
            if name not in columns:
                batch.add_column(sa.Column(name, sa.BigInteger))
    if "ix_herald_messages_channel_stream" not in indexes:
        op.create_index("ix_herald_messages_channel_stream", "herald_messages", ["channel", "stream_ms", "stream_seq"])
    if "ix_herald_messages_ts" not in indexes:
        op.create_index("ix_herald_messages_ts", "herald_messages", ["ts"])


def downgrade():
    op.drop_index("ix_herald_messages_ts", "herald_messages")
    op.drop_index("ix_herald_messages_channel_stream", "herald_messages")
    with op.batch_alter_table("herald_messages") as batch:
        batch.drop_column("stream_seq")
        batch.drop_column("stream_ms")
