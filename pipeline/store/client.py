"""Clients of Herald's Redis: a single node or a Redis Cluster (REDIS_CLUSTER), with TLS
as configured, and the checks a process makes before it starts."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from pipeline.core.errors import StartupError
from pipeline.core.redis_tls import redis_tls
from pipeline.core.settings import Settings

Client = redis.Redis | redis.RedisCluster


def connect(settings: Settings, pool_size: int = 4, *, url: str | None = None) -> Client:
    """A client of the main Redis (or of `url`), with bounded timeouts, so an
    outage fails fast instead of hanging, and TLS as configured for `rediss://`.

    Its pool blocks for a free connection (up to `HERALD_REDIS_POOL_WAIT`,
    30 s) when `pool_size` are in use: a burst of thousands of WebSocket
    connects and subscribes waits its turn instead of failing (a busy pool
    is a wait, not an outage; an outage still fails within the connect and
    socket timeouts of the connection a caller gets). Long-lived services
    pass `HERALD_REDIS_POOL_SIZE`; the small default suits one-off clients.
    With `REDIS_CLUSTER` on, the main Redis is a `RedisCluster` client (one
    such pool per node); `url` (the Celery broker) never is.
    """
    address, tls = redis_tls(url or settings.redis_url, settings)
    options: dict[str, Any] = dict(max_connections=pool_size, timeout=settings.redis_pool_wait,
                                   decode_responses=True, socket_timeout=5, socket_connect_timeout=3, **tls)
    if settings.redis_cluster and url in (None, settings.redis_url):
        return redis.RedisCluster.from_url(address, connection_pool_class=redis.BlockingConnectionPool,
                                           **options)
    pool = redis.BlockingConnectionPool.from_url(address, health_check_interval=15, **options)
    # The client owns its pool: closing it closes the pool's sockets (a pool merely passed in stays open).
    return redis.Redis.from_pool(pool)


def check_at_start(settings: Settings) -> str | None:
    """Refuse to run on a Redis that does not answer or may evict Herald's keys.

    Pings the main Redis and a Redis Celery broker, so a wrong address or
    certificate stops the process in one line rather than in a retry loop.
    Then reads the main Redis' `maxmemory-policy`: any policy but `noeviction`
    may evict dedupe markers and idempotency claims, and a message would then
    be delivered twice (docs/operations.md: "Redis: TLS and eviction"). Raises StartupError unless
    `HERALD_ALLOW_EVICTION` is on; returns a warning to show, if any.
    """
    client = _ping(settings, settings.redis_url)
    if settings.redis_broker and settings.celery_broker_url != settings.redis_url:
        _ping(settings, settings.celery_broker_url).close()
    try:
        policy = eviction_policy(client)
    finally:
        client.close()
    if policy is None:
        return (f"could not read the maxmemory-policy of Redis at {redacted(settings.redis_url)}: "
                "make sure it is noeviction")
    if policy == "noeviction":
        return None
    if settings.allow_eviction:
        return f"Redis maxmemory-policy is {policy}: running anyway (HERALD_ALLOW_EVICTION)"
    raise StartupError(f"Redis maxmemory-policy is {policy}, which can evict dedupe markers and idempotency "
                       "claims: set it to noeviction, or HERALD_ALLOW_EVICTION=1 to run anyway")


def eviction_policy(client: Client) -> str | None:
    """The server's `maxmemory-policy`, or None when it does not say; on a
    cluster, the first primary's that is not `noeviction`, if any.

    Managed Redis often refuses CONFIG; INFO's `maxmemory_policy` field says
    the same there.
    """
    if isinstance(client, redis.RedisCluster):
        cluster: Any = client  # redis-py's cluster client is untyped
        policies = [eviction_policy(cluster.get_redis_connection(node)) for node in cluster.get_primaries()]
        evicting = [p for p in policies if p not in (None, "noeviction")]
        return evicting[0] if evicting else (None if None in policies else "noeviction")
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        if policy:
            return str(policy)
    except redis.ResponseError:
        pass
    try:
        found = client.info("memory").get("maxmemory_policy")
        return None if found is None else str(found)
    except redis.ResponseError:
        return None


def run_ids(client: Client) -> tuple[str, ...]:
    """The `run_id` of the server behind `client` (of each primary, by address, on a
    cluster): a new one means the server restarted, keeping only what it had persisted."""
    if isinstance(client, redis.RedisCluster):
        cluster: Any = client  # redis-py's cluster client is untyped
        return tuple(f"{node.name}={run_ids(cluster.get_redis_connection(node))[0]}"
                     for node in sorted(cluster.get_primaries(), key=lambda node: node.name))
    return (str(client.info("server")["run_id"]),)


def redacted(url: str) -> str:
    """`url` without its password and query, fit for a log line."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _ping(settings: Settings, url: str) -> Client:
    client = connect(settings, 1, url=url)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        # redis-py's messages are one line; an SSL failure names its cause.
        raise StartupError(f"Redis at {redacted(url)} does not answer: {exc}") from None
    return client
