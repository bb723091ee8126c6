"""Compare and delete (release_owned.lua): only whoever set a claim or lock lets go of it.

An idempotency claim and the cache's fill lock are both released this way:
one that lapsed and was taken by another is not ours to delete.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline.store.scripts import Runner, Script


class OwnedKeys(NamedTuple):
    key: str  # the claim or lock


class OwnedArgs(NamedTuple):
    token: str  # the value its owner set


RELEASE_OWNED = Script("release_owned.lua", OwnedKeys, OwnedArgs)


def release_owned(runner: Runner, key: str, token: str) -> None:
    """Delete `key` if it still holds `token`."""
    runner.one(RELEASE_OWNED(OwnedKeys(key), OwnedArgs(token)))
