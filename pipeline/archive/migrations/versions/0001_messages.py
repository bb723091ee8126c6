"""The archive's first table, as Herald created it before migrations (create_all).

A database that has it already is left as it is.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    if sa.inspect(op.get_bind()).has_table("herald_messages"):
        return
    op.create_table(
        "herald_messages",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(200), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("sender", sa.String(200), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("partition", sa.Integer),
        sa.Column("offset", sa.BigInteger),
    )
    op.create_index("ix_herald_messages_channel", "herald_messages", ["channel"])


def downgrade():
    op.drop_table("herald_messages")
