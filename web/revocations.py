"""Token revocations (docs/server-api.md: "Revocation"): kept in Redis, and copied in each web
process so that checking a token costs no round trip.

Two kinds: a token id (`jti`), kept until its revocation lapses
(HERALD_REVOCATION_TTL, longer than any token lives), and a user's
`issued_before` time, which revokes every token of that user whose `iat` is
earlier. A token with neither `jti` nor `iat` cannot be revoked: only its
expiry ends it.

The local copy is loaded when the hub's pub/sub link connects (at start
and after every reconnect, once the control channel is subscribed, so no
revocation falls in between: the API writes Redis before it publishes) and is
kept current by the `revoke` commands read on that channel.
"""

from __future__ import annotations

import logging
import threading
import time

from web.auth import Identity

log = logging.getLogger("herald.web")

LOAD_PAGE = 10_000  # revoked token ids read per round trip while loading

# A user's cut-off only moves forward: a later, earlier cut-off must not un-revoke tokens.
_RAISE_CUTOFF = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored or tonumber(ARGV[2]) > tonumber(stored) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return ARGV[2]
end
return stored
"""


class Revocations:
    """This process's copy of the revocations, and the writes that add one."""

    def __init__(self, services):
        self._services = services  # its store is made lazily, after the fork
        self.ttl = services.settings.revocation_ttl
        self.tokens: dict[str, float] = {}  # jti -> when its revocation lapses
        self.users: dict[str, float] = {}   # user -> tokens issued before this are revoked
        self.loaded = False
        self._loading = threading.Lock()

    # -- checking (no I/O) ----------------------------------------------------
    def revoked(self, identity: Identity, now: float | None = None) -> bool:
        """True when `identity`'s token is revoked, by its id or by its user's cut-off."""
        if identity.jti is not None:
            lapse = self.tokens.get(identity.jti)
            if lapse is not None and lapse > (now or time.time()):
                return True
        if identity.issued is not None:
            cutoff = self.users.get(identity.user)
            if cutoff is not None and identity.issued < cutoff:
                return True
        return False

    # -- the local copy ---------------------------------------------------------
    def load(self) -> None:
        """Read every live revocation from Redis into the copy (raises redis.RedisError)."""
        store = self._services.store
        client, keys = store.redis, store.keys
        with self._loading:
            now = time.time()
            tokens: dict[str, float] = {}
            start = 0
            while True:
                page = client.zrangebyscore(keys.revoked_tokens, now, "+inf", start=start, num=LOAD_PAGE,
                                            withscores=True)
                tokens.update((_text(jti), float(lapse)) for jti, lapse in page)
                if len(page) < LOAD_PAGE:
                    break
                start += LOAD_PAGE
            users = {_text(user): float(cutoff) for user, cutoff in client.hgetall(keys.revoked_users).items()}
            # Whole dicts swapped in: a check never sees half a load.
            self.tokens, self.users, self.loaded = tokens, users, True
        log.info("revocations loaded", extra={"tokens": len(tokens), "users": len(users)})

    def ensure_loaded(self) -> None:
        """Load the copy if no link has yet (a request before the hub's first connect)."""
        if not self.loaded:
            self.load()

    def apply_token(self, jti: str, lapse: float) -> None:
        """Add a token id revoked until `lapse` to the copy, dropping lapsed ones now and then."""
        self.tokens[jti] = max(lapse, self.tokens.get(jti, 0.0))
        if len(self.tokens) % 1024 == 0:
            now = time.time()
            self.tokens = {k: v for k, v in self.tokens.items() if v > now}

    def apply_user(self, user: str, issued_before: float) -> None:
        """Add (or move forward) a user's cut-off in the copy."""
        self.users[user] = max(issued_before, self.users.get(user, issued_before))

    # -- recording (the server API) ---------------------------------------------
    def record_token(self, jti: str) -> float:
        """Write a token id's revocation to Redis (pruning lapsed ones); returns when it lapses."""
        store = self._services.store
        now = time.time()
        lapse = now + self.ttl
        with store.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(store.keys.revoked_tokens, {jti: lapse}, gt=True)  # GT still adds a new member
            pipe.zremrangebyscore(store.keys.revoked_tokens, "-inf", now)
            pipe.execute()
        return lapse

    def record_user(self, user: str, issued_before: float) -> float:
        """Write a user's cut-off to Redis; returns the cut-off in force (never earlier than before)."""
        store = self._services.store
        return float(store.redis.eval(_RAISE_CUTOFF, 1, store.keys.revoked_users, user, repr(issued_before)))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
