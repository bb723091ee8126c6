"""The grammar of a history offset: a Redis stream id, 'ms-seq' or 'ms'.

Clients resume after an offset (`since`), the hub orders frames by it, the
archive stores it as two integer columns: all of them parse and write it here.
"""

from __future__ import annotations

import re

# As JSON Schema writes it (the `subscribe` frame's `since`); `valid` adds the
# bound Redis sets on each part.
PATTERN = r"^[0-9]{1,20}(-[0-9]{1,20})?$"
_GRAMMAR = re.compile(PATTERN)
_PART_LIMIT = 1 << 64

# The key of no offset at all: before every stream id.
BEFORE_ALL = (-1, -1)


def valid(value: object) -> bool:
    """An offset as Redis writes stream ids, each part below 2**64: anything else would make
    Redis refuse the history read."""
    if not isinstance(value, str) or not _GRAMMAR.fullmatch(value):
        return False
    ms, _, seq = value.partition("-")
    return int(ms) < _PART_LIMIT and int(seq or 0) < _PART_LIMIT


def parts(sid: str) -> tuple[int, int]:
    """(ms, seq) of a stream id; raises ValueError when it is not one."""
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


def key(sid: str) -> tuple[int, int]:
    """Orders stream ids; malformed ids sort first (as BEFORE_ALL)."""
    try:
        return parts(sid)
    except ValueError:
        return BEFORE_ALL


def join(ms: int, seq: int) -> str:
    """The stream id of (ms, seq)."""
    return f"{ms}-{seq}"


def from_key(sort_key: tuple[int, int]) -> str | None:
    """The stream id of a `key`, or None for one before every stream id."""
    return None if sort_key < (0, 0) else join(*sort_key)
