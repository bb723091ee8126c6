"""The windows of rules' `rate` conditions (rate_window.lua)."""

from __future__ import annotations

import time
from typing import NamedTuple

from pipeline.store.keys import Keys
from pipeline.store.scripts import Runner, Script

# The most message ids a window holds: a `max` above it is not enforced past
# it (docs/guide.md: "Rules").
RATE_WINDOW_CAP = 10_000


class WindowKeys(NamedTuple):
    window: str  # sorted set of the message ids counted, by when (Keys.rate)


class WindowArgs(NamedTuple):
    now: float
    per: float  # the window's seconds
    member: str  # the message id
    record: str  # '1' to count it, '0' only reads (a dry run)
    cap: int


RATE_WINDOW = Script("rate_window.lua", WindowKeys, WindowArgs)


class Rates:
    """Rate windows."""

    def __init__(self, runner: Runner, keys: Keys) -> None:
        self.runner = runner
        self.keys = keys

    def count_in_window(self, key: str, per: float, member: str, *, record: bool = True) -> int:
        """How many messages a `rate` window of `per` seconds at `key` holds up to `member`,
        counting `member` in (once) unless `record` is false; past RATE_WINDOW_CAP ids, one
        more than the cap."""
        return int(self.runner.one(RATE_WINDOW(WindowKeys(key), WindowArgs(time.time(), per, member,
                                                                            "1" if record else "0",
                                                                            RATE_WINDOW_CAP))))
