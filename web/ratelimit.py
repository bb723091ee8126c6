"""HTTP rate limits: flask-limiter, counted in the app's own Redis across every web process.

Each route belongs to a group (publish, batch, read, admin, default; docs/guide.md:
"Rate limits"). A request is counted twice, by its token's user (`sub`) and
by its client address (`request.remote_addr`, which ProxyFix sets from
HERALD_TRUSTED_PROXIES; an IPv6 address by its /64, `address_group`), against the group's two limits of
HERALD_RATE_LIMITS; both apply. Health checks, metrics, the WebSocket, the
demo page and CORS preflights are never limited.

Counters are fixed windows that start at a key's first hit: a request's
counters are counted in one Lua call (INCRBY, EXPIRE each), on the process's Redis client (TLS,
pool and Redis Cluster included), under `<prefix>:ratelimit:`. While Redis
does not answer, each process counts in its own memory (one warning when
that starts, one line when Redis is back): a limit then holds per process,
and no request fails for want of Redis.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time

import redis
from flask import Flask, g, has_request_context, request
from flask_limiter import Limit, Limiter, RateLimitExceeded
from limits import parse_many
from limits.storage import RedisStorage, Storage

from pipeline.core.settings import RATE_LIMIT_GROUPS
from web.auth import AuthError, Identity
from web.problems import problem

log = logging.getLogger("herald.web")

# Endpoints by group; every other endpoint is "default" unless it is unlimited.
GROUPS = {
    "api.publish_one": "publish",
    "api.publish_batch": "batch",
    "api.get_message": "read",
    "api.history": "read",
    "api.presence": "read",
    "api.dlq_list": "admin",
    "api.dlq_replay": "admin",
    "api.rules_put": "admin",
    "api.rules_get": "admin",
    "api.rules_test": "admin",
}
# Probes and scrapers call these all day, the WebSocket has its own limits
# (HERALD_WS_RATE and the connection caps), the demo page is static.
UNLIMITED = frozenset({"ops.healthz", "ops.readyz", "ops.metrics", "websocket", "index", "static"})
STORAGE_SCHEME = "herald+redis"
# limits' fixed-window counter (incr_expire.lua: INCRBY, and EXPIRE on a new window)
# for several keys at once: a request's token and address counters in one round trip.
INCR_MANY = """
local counts = {}
for i, key in ipairs(KEYS) do
  local amount = tonumber(ARGV[2 * i])
  local current = redis.call("incrby", key, amount)
  if current == amount then
    redis.call("expire", key, ARGV[2 * i - 1])
  end
  counts[i] = current
end
return counts
"""


class SharedRedisStorage(RedisStorage):
    """limits' Redis storage on the client the web process already has (`client()`,
    called at first use: after gunicorn's fork, and never for a process that counts nothing).

    One pool, one TLS setup and Redis Cluster support for free: the fixed-window
    counter is one single-key script, so it runs on any node.
    """

    STORAGE_SCHEME = [STORAGE_SCHEME]

    def __init__(self, uri: str, *, client, key_prefix: str, **_options):
        Storage.__init__(self, uri)
        self.key_prefix = key_prefix
        self.target_server = "redis"
        self.dependency = redis
        self._client = client

    @functools.cached_property
    def storage(self):
        """The Redis client (RedisStorage reads this attribute)."""
        return self._client()

    @functools.cached_property
    def lua_incr_expire(self):
        """The counter's script (registered lazily: registering computes its sha only)."""
        return self.storage.register_script(self.SCRIPT_INCR_EXPIRE)

    @functools.cached_property
    def lua_incr_many(self):
        """INCR_MANY: several counters in one call."""
        return self.storage.register_script(INCR_MANY)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """The counter after this hit: the one `incr_many` already counted for this request
        (init_app's `count_together`), else one call of its own."""
        counted = g.get("rate_counts") if has_request_context() else None
        if counted and (key, expiry, amount) in counted:
            return counted.pop((key, expiry, amount))
        return super().incr(key, expiry, amount)

    def incr_many(self, hits: list[tuple[str, int, int]]) -> list[int]:
        """Count several (key, expiry, amount) hits in one round trip, each as `incr` would."""
        keys = [self.prefixed_key(key) for key, _, _ in hits]
        return [int(n) for n in self.lua_incr_many(keys, [v for _, expiry, amount in hits for v in (expiry, amount)])]

    @functools.cached_property
    def lua_clear_keys(self):
        """The script of `flask limiter clear` (RedisStorage.reset)."""
        return self.storage.register_script(self.SCRIPT_CLEAR_KEYS)


class _Quiet(logging.Filter):
    # flask-limiter logs every refused request at INFO; the access line already says it.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ratelimit ")


# One client's share of the address budgets: an IPv6 host commonly owns a
# whole /64 and picks any address in it.
IPV6_PREFIX = 64


def address_group(address: str) -> str:
    """The client address budgets are counted by (docs/guide.md: "Rate limits"): an IPv4 address
    as is, an IPv6 address as its /64 (`2001:db8:1:2::/64`), an IPv4-mapped IPv6
    address as its IPv4 address; anything else unchanged. The HTTP limits and the
    WebSocket per-address cap (HERALD_WS_MAX_PER_IP) both count by it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip.packed, IPV6_PREFIX), strict=False))


def group_of(endpoint: str | None) -> str | None:
    """The rate limit group of an endpoint, or None when it is never limited."""
    if endpoint in GROUPS:
        return GROUPS[endpoint]
    if endpoint is None or endpoint in UNLIMITED or endpoint.endswith(".static"):
        return None
    return "default"


def init_app(app: Flask, services) -> Limiter | None:
    """Count and limit the app's routes (docs/guide.md: "Rate limits"); None, and no hook at all,
    when every limit is off."""
    from web.api import identify

    settings = services.settings
    if all(token is None and address is None for _, token, address in settings.rate_limits):
        return None
    table = {group: settings.rate_limit(group) for group in RATE_LIMIT_GROUPS}

    def group() -> str:
        return group_of(request.endpoint) or "default"

    def token_key() -> str:
        identity = identify()
        assert isinstance(identity, Identity)  # only asked when no_user() is false
        return f"user:{identity.user}"

    def address_key() -> str:
        return f"addr:{address_group(request.remote_addr or '-')}"

    def no_user() -> bool:
        # A bad or missing token is answered 401 by the view, counted by its address
        # alone; with HERALD_AUTH=off every caller is the one "anonymous".
        return not settings.auth or isinstance(identify(), AuthError)

    # The limits of each group, parsed once (flask-limiter parses them per request).
    items = {name: tuple(parse_many(limit) if limit else () for limit in limits) for name, limits in table.items()}

    @app.before_request
    def count_together():
        # flask-limiter counts each limit in a call of its own, one after the other.
        # Here every counter of the request goes in one call first, and the storage
        # answers flask-limiter's calls from it (SharedRedisStorage.incr): one round
        # trip, not two. It cannot span slots of a Redis Cluster, nor the in-memory
        # counting of an outage: flask-limiter's own calls do those. Both counters
        # count every request: one its user's limit refuses still spends its address's budget.
        name = group_of(request.endpoint)
        if name is None or request.method == "OPTIONS" or settings.redis_cluster:
            return
        if limiter.limiter.storage is not limiter.storage:
            return
        token_items, address_items = items[name]
        hits = [] if no_user() else [(item.key_for(token_key(), name), item.get_expiry(), 1) for item in token_items]
        hits += [(item.key_for(address_key(), name), item.get_expiry(), 1) for item in address_items]
        if len(hits) < 2:
            return
        try:
            g.rate_counts = dict(zip(hits, limiter.storage.incr_many(hits)))
        except redis.RedisError:
            pass  # flask-limiter's own calls meet the outage, and fall back

    limiter = Limiter(
        address_key,
        default_limits=[
            # The user's limit, then the address's (count_together has usually
            # counted both in one call already).
            Limit(lambda: table[group()][0] or "", key_function=token_key, scope=lambda _: group(),
                  shared=True, exempt_when=no_user, error_message="token"),
            Limit(lambda: table[group()][1] or "", key_function=address_key, scope=lambda _: group(),
                  shared=True, error_message="address"),
        ],
        storage_uri=f"{STORAGE_SCHEME}://",
        # flask-limiter types a storage's options as strings and ints; SharedRedisStorage takes a client factory.
        storage_options={"client": lambda: services.store.redis,  # type: ignore[dict-item]
                         "key_prefix": f"{settings.redis_prefix}:ratelimit"},
        strategy="fixed-window",
        # Headers on every answer would cost two more Redis calls per request;
        # a 429 carries them (too_many below).
        headers_enabled=False,
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )
    limiter.request_filter(lambda: request.method == "OPTIONS" or group_of(request.endpoint) is None)
    limiter.init_app(app)
    logging.getLogger("flask-limiter").addFilter(_Quiet())

    @app.errorhandler(RateLimitExceeded)
    def too_many(exc: RateLimitExceeded):
        return refusal(limiter, exc)

    return limiter


def refusal(limiter: Limiter, exc: RateLimitExceeded):
    """The 429 problem, with Retry-After (whole seconds) and the X-RateLimit headers
    of the limit that refused the request."""
    breached = limiter.current_limit
    item = breached.limit if breached is not None else exc.limit.limit
    now = time.time()
    reset = now + item.get_expiry()
    if breached is not None:
        try:
            # Remaining is 0 by definition; only the window's end is asked for (a TTL).
            reset = breached.limiter.storage.get_expiry(breached.key)
        except redis.RedisError:
            pass  # Redis went away just now: the window's length is an upper bound
    # Redis rounds a TTL to whole seconds: so does the answer (RFC 9110: delay-seconds).
    retry_after = max(1, round(reset - now))
    by = exc.limit.error_message  # "token" or "address" (see init_app)
    g.log_fields = {**g.get("log_fields", {}), "rate_limited_by": by, "rate_limit": str(item)}
    subject = "this token's user" if by == "token" else "this client address"
    return problem(429, f"Rate limit of {item} exceeded for {subject}; retry after {retry_after} s",
                   slug="rate-limited", headers={
                       "Retry-After": str(retry_after), "X-RateLimit-Limit": str(item.amount),
                       "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(math.ceil(reset))})
