"""Bearer tokens: HS256 JWTs with `sub`, `exp`, `publish`/`subscribe` channel globs and `admin`."""

from __future__ import annotations

import dataclasses
import functools
import time

import jwt

from pipeline.core.errors import Refused
from pipeline.core.messages import channel_allowed

LEEWAY_SECONDS = 10


class AuthError(Refused):
    """The token is missing, malformed, expired or wrongly signed."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a request or connection acts as, and what it may do."""

    user: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: bool = False
    expires: float | None = None

    def may_publish(self, channel: str) -> bool:
        """True when a `publish` glob covers the channel."""
        return channel_allowed(channel, self.publish)

    def may_subscribe(self, channel: str) -> bool:
        """True when a `subscribe` glob covers the channel."""
        return channel_allowed(channel, self.subscribe)


# HERALD_AUTH=off: everything allowed; the settings refuse it without HERALD_DEV.
OPEN = Identity(user="anonymous", publish=("*",), subscribe=("*",), admin=True)


def verify(token: str | None, settings) -> Identity:
    """Check a token's signature, algorithm and expiry; return its Identity or raise AuthError."""
    if not settings.auth:
        return OPEN
    if not token:
        raise AuthError("a bearer token is required")
    identity = _decode(token, settings.secret_key)
    assert identity.expires is not None  # `exp` is a required claim
    # Checked on every use: a token verified earlier may have expired since.
    if identity.expires + LEEWAY_SECONDS < time.time():
        raise AuthError("the token has expired")
    return identity


# A token's signature is checked once per process, not on every request and
# connection: checking it is a large share of a WebSocket connect's CPU, and
# most clients reuse their token. Refused tokens are not cached (lru_cache
# keeps no exceptions).
@functools.lru_cache(maxsize=4096)
def _decode(token: str, secret: str) -> Identity:
    try:
        # Pinning the algorithm list is what stops alg=none and key-confusion tokens.
        claims = jwt.decode(token, secret, algorithms=["HS256"], leeway=LEEWAY_SECONDS,
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"the token is invalid: {exc}") from None
    return Identity(
        user=str(claims["sub"]),
        publish=_globs(claims.get("publish")),
        subscribe=_globs(claims.get("subscribe")),
        admin=claims.get("admin") is True,
        expires=float(claims["exp"]),
    )


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def mint(settings, sub: str, *, publish=("*",), subscribe=("*",), admin=False, ttl: int = 3600) -> str:
    """Sign a token (for `flask token`, `make dev` and tests)."""
    if not settings.secret_key:
        raise AuthError("HERALD_SECRET_KEY is not set")
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + ttl, "publish": list(publish),
              "subscribe": list(subscribe), "admin": admin}
    return jwt.encode(claims, settings.secret_key, algorithm="HS256")


def _globs(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()
