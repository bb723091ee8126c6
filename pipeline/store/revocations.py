"""Token revocations in Redis (docs/server-api.md: "Revocation"): revoked token ids until their
revocation lapses, and each user's cut-off (tokens issued before it are revoked).

The web processes keep a copy of both (web/revocations.py), read here at
start and after each pub/sub reconnect; the server API writes them here first.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from pipeline.store.keys import Keys
from pipeline.store.scripts import Runner, Script

READ_PAGE = 10_000  # revoked token ids read per round trip


class CutoffKeys(NamedTuple):
    users: str  # Keys.revoked_users


class CutoffArgs(NamedTuple):
    user: str
    cutoff: str  # seconds since the epoch, as repr(float)


RAISE_CUTOFF = Script("raise_cutoff.lua", CutoffKeys, CutoffArgs)


class RevokedTokens:
    """The revocations' two keys: token ids by lapse time, and users' cut-offs."""

    def __init__(self, runner: Runner, keys: Keys) -> None:
        self.runner = runner
        self.redis: Any = runner.client
        self.keys = keys

    def revoke_token(self, jti: str, lapse: float) -> None:
        """Keep `jti` revoked until `lapse` (never shortening an earlier revocation), and drop
        the lapsed ones."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.revoked_tokens, {jti: lapse}, gt=True)  # GT still adds a new member
            pipe.zremrangebyscore(self.keys.revoked_tokens, "-inf", time.time())
            pipe.execute()

    def revoke_user(self, user: str, cutoff: float) -> float:
        """Revoke `user`'s tokens issued before `cutoff`; returns the cut-off in force (a later
        one stays)."""
        return float(self.runner.one(RAISE_CUTOFF(CutoffKeys(self.keys.revoked_users),
                                                  CutoffArgs(user, repr(cutoff)))))

    def read(self) -> tuple[dict[str, float], dict[str, float]]:
        """Every live revocation: ({jti: lapse}, {user: cut-off}), a page of ids a round trip."""
        now, start = time.time(), 0
        tokens: dict[str, float] = {}
        while True:
            page = self.redis.zrangebyscore(self.keys.revoked_tokens, now, "+inf", start=start, num=READ_PAGE,
                                            withscores=True)
            tokens.update((_text(jti), float(lapse)) for jti, lapse in page)
            if len(page) < READ_PAGE:
                break
            start += READ_PAGE
        users = {_text(user): float(cutoff) for user, cutoff in self.redis.hgetall(self.keys.revoked_users).items()}
        return tokens, users


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
