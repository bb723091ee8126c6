"""Idempotent publishing: the first request claims a message id, later ones get its answer."""

from __future__ import annotations

from typing import NamedTuple

from pipeline.core.settings import Settings
from pipeline.store.keys import Keys
from pipeline.store.locks import release_owned
from pipeline.store.scripts import Call, Runner, Script


class ClaimKeys(NamedTuple):
    claim: str  # Keys.idempotency


class ClaimArgs(NamedTuple):
    value: str  # the pending claim's value
    ttl: int  # seconds


class AnswerArgs(NamedTuple):
    token: str  # the value this request claimed the id with
    answer: str
    expires_at: int  # Unix seconds (pipeline.store.statuses.expires_at)


CLAIM = Script("claim.lua", ClaimKeys, ClaimArgs)
ANSWER = Script("answer.lua", ClaimKeys, AnswerArgs, batched=True)


class Idempotency:
    """Claims of message ids and their first answers."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings) -> None:
        self.runner = runner
        self.keys = keys
        self.settings = settings

    def claim(self, msg_id: str, claim: str) -> str | None:
        """None when this request now owns `msg_id` (claimed with the value `claim`);
        else the value there: another request's pending claim, or a stored answer.

        A pending claim lapses after a few produce timeouts, so a web process
        killed mid-publish does not block the id for a day; the retry may then
        write a second record, which the workers deduplicate.
        """
        ttl = max(10, int(self.settings.produce_timeout * 3))
        reply = self.runner.one(CLAIM(ClaimKeys(self.keys.idempotency(msg_id)), ClaimArgs(claim, ttl)))
        return None if reply is None else str(reply)

    def release(self, msg_id: str, claim: str) -> None:
        """Forget a claim whose publish failed, so the client may retry; only its owner can."""
        release_owned(self.runner, self.keys.idempotency(msg_id), claim)

    def answer_call(self, msg_id: str, claim: str, answer: str, expires_at: int) -> Call:
        """The call that keeps `answer` as the id's in place of the claim, until `expires_at`,
        only while the claim is still `claim`."""
        return ANSWER(ClaimKeys(self.keys.idempotency(msg_id)), AnswerArgs(claim, answer, expires_at))
