"""The SQL archive of delivered messages (SQLite by default, PostgreSQL via DATABASE_URL).

Rows are keyed by the message's global id, which scopes a client's id to its
sender (pipeline/core/ids.py): another sender's message never shares a row.
The table is `tables.py`'s (its schema the migrations'), written by `writer.py`
and read by `reader.py`; the web reads through `cache.py` and `history.py`.
"""

from pipeline.archive.reader import ArchiveReader, ArchiveUnavailable
from pipeline.archive.writer import Archive

__all__ = ["Archive", "ArchiveReader", "ArchiveUnavailable"]
