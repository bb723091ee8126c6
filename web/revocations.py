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

from web.auth import AuthError, Identity

log = logging.getLogger("herald.web")

REVOKED_REASON = "token revoked"


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
        with self._loading:
            self._read()

    def ensure_loaded(self) -> None:
        """Load the copy if no link has yet (a request before the hub's first connect)."""
        if not self.loaded:
            with self._loading:
                if not self.loaded:  # another caller may have loaded it meanwhile
                    self._read()

    def _read(self) -> None:
        # Called with the lock held: a command applied meanwhile waits, then goes into the new copy.
        tokens, users = self._services.store.revocations.read()
        # Whole dicts swapped in: a check never sees half a load.
        self.tokens, self.users, self.loaded = tokens, users, True
        log.info("revocations loaded", extra={"tokens": len(tokens), "users": len(users)})

    def apply_token(self, jti: str, lapse: float) -> None:
        """Add a token id revoked until `lapse` to the copy, dropping lapsed ones now and then."""
        with self._loading:
            self.tokens[jti] = max(lapse, self.tokens.get(jti, 0.0))
            if len(self.tokens) % 1024 == 0:
                now = time.time()
                self.tokens = {k: v for k, v in self.tokens.items() if v > now}

    def apply_user(self, user: str, issued_before: float) -> None:
        """Add (or move forward) a user's cut-off in the copy."""
        with self._loading:
            self.users[user] = max(issued_before, self.users.get(user, issued_before))

    def check(self, identity: Identity) -> None:
        """Raise AuthError when `identity`'s token is revoked: the one check of a connect, a
        frame and an HTTP request (raises redis.RedisError when the copy cannot be loaded)."""
        self.ensure_loaded()
        if self.revoked(identity):
            raise AuthError(REVOKED_REASON)

    # -- recording (the server API) ---------------------------------------------
    def record_token(self, jti: str) -> float:
        """Write a token id's revocation to Redis; returns when it lapses."""
        lapse = time.time() + self.ttl
        self._services.store.revocations.revoke_token(jti, lapse)
        return lapse

    def record_user(self, user: str, issued_before: float) -> float:
        """Write a user's cut-off to Redis; returns the cut-off in force (never earlier than before)."""
        return self._services.store.revocations.revoke_user(user, issued_before)
