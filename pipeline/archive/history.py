"""A channel's history past what its Redis stream retains, continued from the archive with the same cursor."""

from __future__ import annotations

from pipeline.archive.cache import ARCHIVE_QUERIES
from pipeline.core.messages import dumps_bytes
from pipeline.core.streamids import key as stream_id_key


def history(store, reader, channel: str, since: str | None, limit: int) -> dict:
    """`Store.history`, continued from the archive when `since` is older than the
    channel's stream retains: archived messages up to the stream's first
    retained entry, then the stream's, one cursor throughout. The page is
    bounded in bytes as the stream's are (HERALD_HISTORY_PAGE_BYTES).

    `recovered` is false only when neither has what followed `since`: the
    archive no longer holds a message at or before it (pruned, or older
    than the archive). Raises ArchiveUnavailable when the archive is needed
    and does not answer.
    """
    page = store.history(channel, since, limit)
    if page["recovered"] or not since:
        return page
    retained = page["messages"]
    seam = stream_id_key(retained[0]["offset"]) if retained else None
    budget = store.settings.history_page_bytes
    older, more, used = _archived(store.settings, reader, channel, since, limit, seam)
    if since == "0-0":
        # From the start: the archive must hold the channel's first message.
        epoch = store.redis.get(store.keys.epoch(channel))
        recovered = bool(epoch) and reader.holds(channel, epoch)
    else:
        recovered = reader.holds(channel, since)
    if not older:
        return {**page, "recovered": recovered}
    messages = older
    if not more:  # the archive's part is whole: the stream's follows, in the same budget
        for message in retained:
            used += len(dumps_bytes(message))
            if len(messages) == limit or used > budget:
                more = True
                break
            messages.append(message)
        more = more or page["next"] is not None
    return {"messages": messages, "next": messages[-1]["offset"] if more else None, "recovered": recovered}


def _archived(settings, reader, channel: str, since: str, limit: int, seam) -> tuple[list, bool, int]:
    """Archived messages after `since` and before the stream's first retained
    offset `seam`: at most `limit`, stopping past HERALD_HISTORY_PAGE_BYTES
    (at least one); whether more archived ones follow; their size in bytes."""
    budget = settings.history_page_bytes
    # Rows a query asks for: what the budget holds at the largest message size.
    chunk = max(1, budget // settings.max_message_bytes)
    found: list[dict] = []
    used, cursor = 0, since
    while True:
        ARCHIVE_QUERIES.inc()
        want = min(chunk, limit + 1 - len(found))
        rows = reader.after(channel, cursor, want)
        for message in rows:
            if seam is not None and stream_id_key(message["offset"]) >= seam:
                return found, False, used  # the stream holds the rest
            size = len(dumps_bytes(message))
            if len(found) == limit or (found and used + size > budget):
                return found, True, used
            found.append(message)
            used += size
        if len(rows) < want:
            return found, False, used
        cursor = rows[-1]["offset"]
