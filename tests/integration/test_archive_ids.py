"""Archive rows by global id (docs/design.md: "Message ids"): another sender's id is another row, and a
sender's id published again a day later keeps the later message; on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from pipeline.archive import Archive, ArchiveReader
from pipeline.core.ids import scoped
from pipeline.core.messages import Envelope
from tests.integration.test_archive_cache import database_url  # noqa: F401 (the fixture, both databases)


@pytest.fixture
def archive(database_url):  # noqa: F811
    archive = Archive(database_url)
    archive.create_schema()
    yield archive
    archive.dispose()


def _message(sender, client, data, ts, channel="chat:a"):
    return Envelope(scoped(sender, client), channel, "message", data, sender, ts, partition=0, offset=ts % 1000)


def test_the_same_id_from_two_senders_is_two_rows(archive):
    client = f"invoice-{uuid.uuid4().hex[:6]}"
    archive.store([_message("alice", client, "a", 1_700_000_000_000), _message("mallory", client, "m",
                                                                                 1_700_000_000_001)])
    reader = ArchiveReader(archive)
    assert reader.get(scoped("alice", client))["data"] == "a"
    row = reader.get(scoped("mallory", client))
    assert (row["id"], row["sender"], row["data"]) == (client, "mallory", "m")


def test_an_id_published_again_later_keeps_the_later_message_and_its_own_offset(archive):
    client = f"daily-{uuid.uuid4().hex[:6]}"
    first = _message("billing", client, "monday", 1_700_000_000_000, channel="bill:1")
    archive.store([first])
    archive.record_offsets([(first.id, "1700000000000-0")])
    # A day later, once its status expired, the sender's id names a new message.
    later = _message("billing", client, "tuesday", 1_700_086_400_000, channel="bill:2")
    archive.store([later, later])  # a retried publish written twice: one row, in one statement
    reader = ArchiveReader(archive)
    row = reader.get(later.id)
    assert (row["data"], row["channel"], row["stream_id"]) == ("tuesday", "bill:2", None)
    archive.record_offsets([(later.id, "1700086400000-0")])
    assert reader.get(later.id)["stream_id"] == "1700086400000-0"
    assert [m["data"] for m in reader.after("bill:2", "0-0", 10)] == ["tuesday"]
    assert reader.after("bill:1", "0-0", 10) == []
    # The earlier message again (a task run late) does not take the row back.
    archive.store([first])
    assert reader.get(later.id)["data"] == "tuesday"
