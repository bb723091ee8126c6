"""Channels' history streams: pages of message frames after an offset, and whether
anything after it was trimmed away."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import redis

from pipeline.core import streamids
from pipeline.core.frames import close_message
from pipeline.core.settings import Settings
from pipeline.store.keys import Keys
from pipeline.store.scripts import Runner, Script


class PageKeys(NamedTuple):
    history: str  # the history stream


class PageArgs(NamedTuple):
    start: str  # first id: '-' or '(<id>'
    most: int  # most entries
    budget: int  # bytes of frames past which the page stops


HISTORY_PAGE = Script("history_page.lua", PageKeys, PageArgs)


class History:
    """Reads of channels' history streams."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings) -> None:
        self.runner = runner
        self.keys = keys
        self.settings = settings

    def page(self, channel: str, since: str | None, limit: int) -> dict[str, Any]:
        """Messages after `since` (exclusive), oldest first, and whether nothing was lost.

        A page holds at most `limit` messages and stops once they pass
        HERALD_HISTORY_PAGE_BYTES (at least one message); `next` continues it.
        """
        stream = self.keys.history(channel)
        read = HISTORY_PAGE(PageKeys(stream), PageArgs(f"({since}" if since else "-", limit,
                                                       self.settings.history_page_bytes))

        def around(pipe: Any) -> None:
            pipe.get(self.keys.epoch(channel))
            pipe.xinfo_stream(stream) if since else pipe.exists(stream)

        try:
            (entries, more), (epoch, info) = self.runner.alongside(read, around)
        except redis.ResponseError:  # no such stream: nothing retained
            epoch, entries, more, info = None, [], 0, None
        recovered = True
        if since == "0-0":
            # "From the start" (a client that had seen nothing yet): nothing is
            # missing while the first message ever added is still retained.
            first: Any = (info or {}).get("first-entry")  # [id, fields] as XINFO STREAM gives it
            recovered = bool(epoch) and bool(first) and first[0] == epoch
        elif since:
            recovered = bool(epoch) and bool(info) and _nothing_trimmed_after(since, epoch, info)
        messages = [json.loads(close_message(fields[1], sid)) for sid, fields in entries]
        return {"messages": messages, "next": entries[-1][0] if more and entries else None, "recovered": recovered}

    def last_ids(self, channels: list[str]) -> list[str | None]:
        """The newest history entry's id of each channel (None for an empty one), in one round trip."""
        pipe = self.runner.client.pipeline(transaction=False)
        for channel in channels:
            pipe.xrevrange(self.keys.history(channel), count=1)
        return [newest[0][0] if newest else None for newest in pipe.execute()]


def _nothing_trimmed_after(since: str, epoch: str, info: dict[str, Any]) -> bool:
    # Trimming removes the oldest entries, so nothing after `since` is gone
    # when `since` is at or past the first retained one (or, in an emptied
    # stream, past the last one ever added). `epoch` is the first entry this
    # stream ever had: an offset older than it belongs to a lost history.
    key = streamids.key(since)
    if key < streamids.key(epoch):
        return False
    first = info.get("first-entry")
    if not first:
        return key >= streamids.key(info.get("last-generated-id", "0-0"))
    return key >= streamids.key(first[0])
