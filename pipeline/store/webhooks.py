"""Webhook delivery's Redis state: each receiver's cursor into the event stream, the lease
of the one task sending its events, and its dead letters (docs/webhooks.md).

Every key shares the `{events}` hash tag (keys.py), so each step below is one
script on one node of a cluster too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from pipeline.store.keys import Keys
from pipeline.store.locks import release_owned
from pipeline.store.scripts import Runner, Script

START = "0-0"  # the cursor of a receiver that has read nothing: the stream's first entry comes after it
DEAD_LETTER_CAP = 100_000  # dead-lettered events kept per receiver; past it the oldest are trimmed


class AdvanceKeys(NamedTuple):
    lease: str  # the receiver's lease
    cursor: str  # the receiver's cursor
    stream: str  # the event stream
    dead_letters: str  # the receiver's dead letters
    cursors: list[str]  # every configured receiver's cursor, for the trim


class AdvanceArgs(NamedTuple):
    token: str  # the lease's holder
    position: str  # the stream id the cursor moves to
    cap: int  # dead letters kept, about
    field: str  # the entry field holding an event's JSON (pipeline.webhooks.EVENT_FIELD)
    reason: str  # why `letters` are dead-lettered ('' with none)
    failed_at: int  # when, milliseconds
    letters: list[str]  # events' JSON to dead-letter


class RenewKeys(NamedTuple):
    lease: str


class RenewArgs(NamedTuple):
    token: str
    ms: int  # the lease's new time to live


ADVANCE = Script("webhook_advance.lua", AdvanceKeys, AdvanceArgs)
RENEW = Script("webhook_renew.lua", RenewKeys, RenewArgs)


class WebhookState:
    """Cursors, leases and dead letters of the configured receivers (by `Receiver.name`)."""

    def __init__(self, runner: Runner, keys: Keys, names: list[str]) -> None:
        self.runner = runner
        self.redis = runner.client
        self.keys = keys
        self.names = names

    def cursor(self, name: str) -> str:
        """The id of the last event the receiver was sent (or had dead-lettered)."""
        return str(self.redis.get(self.keys.webhook_cursor(name)) or START)

    def take_lease(self, name: str, token: str, seconds: float) -> bool:
        """Take the receiver's lease for `seconds` if no one holds it."""
        return bool(self.redis.set(self.keys.webhook_lease(name), token, nx=True, px=int(seconds * 1000)))

    def renew_lease(self, name: str, token: str, seconds: float) -> bool:
        """Extend the lease `token` holds to `seconds` from now; False when it is not held any more."""
        return bool(self.runner.one(RENEW(RenewKeys(self.keys.webhook_lease(name)),
                                          RenewArgs(token, int(seconds * 1000)))))

    def release_lease(self, name: str, token: str) -> None:
        """Let go of the lease, if `token` still holds it."""
        release_owned(self.runner, self.keys.webhook_lease(name), token)

    def advance(self, name: str, token: str, position: str, field: str, letters: Sequence[str] = (),
                reason: str = "") -> bool:
        """Move the receiver's cursor to `position` (dead-lettering `letters`, events' JSON, on the
        way, each under `field` with `reason`) and trim what every receiver passed; False, and
        nothing done, when `token` lost the lease."""
        keys = self.keys
        return bool(self.runner.one(ADVANCE(
            AdvanceKeys(keys.webhook_lease(name), keys.webhook_cursor(name), keys.events,
                        keys.webhook_dead_letters(name), [keys.webhook_cursor(n) for n in self.names]),
            AdvanceArgs(token, position, DEAD_LETTER_CAP, field, reason, int(time.time() * 1000), list(letters)))))
