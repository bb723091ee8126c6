"""Bearer tokens: HS256 JWTs with `sub`, `exp`, `publish`/`subscribe` channel globs and `admin`; optionally
`jti` and `iat` (what a revocation names: docs/server-api.md) and `channels` (subscribed on connect)."""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time

import jwt

from pipeline.core.errors import Refused
from pipeline.core.messages import channel_allowed, valid_channel

LEEWAY_SECONDS = 10
MAX_JTI = 128  # characters of a token id: a revocation names one, and the hubs keep it in memory
MAX_USER = 256  # characters of a token's `sub`: the server API names users, and must reach every one


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
    jti: str | None = None        # the token's id: revocable by it
    issued: float | None = None   # `iat`: revocable by a user's `issued_before`
    channels: tuple[str, ...] = ()  # subscribed on connect (web/hub/protocol.py)

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
    if identity.expires - time.time() > settings.revocation_ttl + LEEWAY_SECONDS:
        # A revocation is kept HERALD_REVOCATION_TTL: a token living longer would outlive it.
        raise AuthError(f"the token lives longer than HERALD_REVOCATION_TTL ({settings.revocation_ttl} s) allows")
    if len(identity.channels) > settings.ws_max_subscriptions:
        raise AuthError(f"the token's channels claim lists more than {settings.ws_max_subscriptions} channels "
                        f"(HERALD_WS_MAX_SUBSCRIPTIONS)")
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
    jti, issued, channels = claims.get("jti"), claims.get("iat"), claims.get("channels", [])
    if not 0 < len(str(claims["sub"])) <= MAX_USER:
        raise AuthError(f"the token is invalid: sub must be 1 to {MAX_USER} characters")
    if jti is not None and not (isinstance(jti, str) and 0 < len(jti) <= MAX_JTI):
        raise AuthError(f"the token is invalid: jti must be a string of 1 to {MAX_JTI} characters")
    if not isinstance(channels, list) or not all(valid_channel(channel) for channel in channels):
        raise AuthError("the token is invalid: channels must be a list of channel names")
    return Identity(
        user=str(claims["sub"]),
        publish=_globs(claims.get("publish")),
        subscribe=_globs(claims.get("subscribe")),
        admin=claims.get("admin") is True,
        expires=float(claims["exp"]),
        jti=jti,
        # PyJWT checked that `iat`, when present, is a number.
        issued=float(issued) if issued is not None else None,
        channels=tuple(dict.fromkeys(channels)),
    )


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def mint(settings, sub: str, *, publish=("*",), subscribe=("*",), admin=False, ttl: int = 3600,
         channels=()) -> str:
    """Sign a token (for `flask token`, `make dev` and tests), with a random `jti` and `iat`
    so that it can be revoked."""
    if not settings.secret_key:
        raise AuthError("HERALD_SECRET_KEY is not set")
    now = time.time()
    claims = {"sub": sub, "jti": secrets.token_urlsafe(12), "iat": now, "exp": int(now) + ttl,
              "publish": list(publish), "subscribe": list(subscribe), "admin": admin}
    if channels:
        claims["channels"] = list(channels)
    return jwt.encode(claims, settings.secret_key, algorithm="HS256")


def _globs(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()
