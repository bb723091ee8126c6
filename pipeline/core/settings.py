"""Herald's one settings object, read from the environment once per process.

Every process builds `Settings.from_env()` at start and passes it down; tests
build it from a plain dict. A bad value fails here, with a sentence that says
which variable and what to do, never later with a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import socket
import ssl
import sys
import tempfile
import zoneinfo
from urllib.parse import urlsplit

from pipeline.core.errors import ConfigError
from pipeline.core.messages import CHANNEL_RE, namespace, valid_channel
from pipeline.core.redis_tls import cert_reqs, check_ca_pem, redis_tls

_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}
MIN_SECRET_BYTES = 32
# Seconds of silence after which RabbitMQ drops a connection, handing back
# its unacknowledged tasks; also the workers' side (Celery's broker_heartbeat).
AMQP_HEARTBEAT = 60
# prometheus-client's multiprocess mode: read when prometheus_client is first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# HTTP rate limits (docs/guide.md: "Rate limits"): per route group, (per token, per
# client address); None is off. High enough that no benchmark of one
# deployment meets them (bench/pipeline.py drives ~2,500 single POSTs a
# second from one token and one address on 2 cores): they stop a runaway or
# hostile client, not a busy one. HERALD_RATE_LIMITS overrides any of them.
RATE_LIMITS = (
    ("publish", "10000/second", "20000/second"),
    ("batch", "1000/second", "2000/second"),
    ("read", "2000/second", "10000/second"),
    ("admin", "100/second", "200/second"),
    ("default", "200/second", "1000/second"),
)
RATE_LIMIT_GROUPS = tuple(group for group, _, _ in RATE_LIMITS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration; field names mirror the SPEC's variables."""

    port: int = 8000
    redis_url: str = "redis://localhost:6379/0"
    celery_broker_url: str = "redis://localhost:6379/0"
    redis_ssl_cert_reqs: str = "required"  # for rediss:// URLs whose query does not say
    redis_tls_ca: str | None = None  # PEM text of the CA a rediss:// server's certificate chains to
    allow_eviction: bool = False  # run on a Redis whose maxmemory-policy may evict Herald's keys
    redis_cluster: bool = False  # REDIS_URL is a Redis Cluster node (docs/operations.md: "Running on a Redis Cluster")
    kafka_bootstrap_servers: str = "localhost:9092"
    # How clients reach and prove themselves to Kafka (docs/operations.md: "Managed Kafka").
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_client_cert: str | None = None  # PEM text, as Heroku gives it
    kafka_client_cert_key: str | None = None
    kafka_trusted_cert: str | None = None
    kafka_check_hostname: bool = True
    kafka_prefix: str = ""
    database_url: str = "sqlite:///herald.db"
    topic: str = "herald.messages"
    secret_key: str | None = None
    auth: bool = True
    # Development only (`flask dev` sets HERALD_DEV=1): the web process hands a
    # token to anyone at GET /dev/token, and Flower may run without a password.
    dev: bool = False
    dev_token_ttl: int = 86400
    cors_origins: tuple[str, ...] = ()
    max_message_bytes: int = 65536
    # Internals a deployment may tune; the SPEC leaves them to us.
    topic_partitions: int = 12
    topic_replication: int | None = None  # None: min(3, brokers), decided by the release step
    redis_prefix: str = "herald"
    redis_pool_size: int = 50
    redis_pool_wait: float = 30.0
    consumer_group: str = "herald-bridge"
    # The bridge's Kafka session: a dead bridge's partitions move after this
    # long. 6 s is the smallest Apache Kafka accepts by default
    # (group.min.session.timeout.ms); Tansu also holds a new group's first
    # join for half of it, so `flask dev` asks for 2 s from its own Tansu.
    kafka_session_timeout: float = 6.0
    produce_timeout: float = 5.0
    retry_max: int = 8
    retry_base_delay: float = 0.5
    retry_max_delay: float = 60.0
    visibility_timeout: int = 300
    history_maxlen: int = 1000
    history_max_age: int = 86400
    history_retention: tuple = ()  # ((namespace, maxlen, max_age_seconds), ...)
    status_ttl: int = 86400
    channel_idle_ttl: int = 7 * 86400
    batch_size: int = 100
    send_queue_size: int = 512
    send_queue_bytes: int = 8 * 1024 * 1024  # a WebSocket's send queue in bytes too (review H2)
    ping_interval: int = 25
    ws_rate: float = 50.0
    ws_max_per_user: int = 100
    ws_max_per_ip: int = 1000
    trusted_proxies: int = 0
    ws_max_subscriptions: int = 100
    ws_replay_page: int = 200
    history_page_bytes: int = 1024 * 1024  # a history or replay page stops past this many bytes (review M3)
    presence_ttl: int = 15
    worker_lapse: float = 5.0
    order_wait: float = 5.0  # beyond the broker's hand-back of a dead worker's tasks (see from_env)
    max_redeliveries: int = 3
    task_time_limit: float = 60.0  # seconds a task may run before it is handed back (tasks/)
    message_types: tuple[str, ...] = ()
    worker_concurrency: int = 2
    log_level: str = "INFO"
    node_id: str = ""
    # Rules (docs/guide.md: "Rules"): a set loaded at start when none is stored, the
    # time zone of `time_range` conditions that name none, where alerts go.
    rules_file: str | None = None
    rules_timezone: str = "UTC"
    rules_alert_channel: str = "alerts:rules"
    # The archive read path (docs/guide.md: "The archive and its cache").
    cache_url: str | None = None  # the Redis of cache entries, fill locks and the Bloom filter; None: REDIS_URL
    cache_ttl: int = 3600
    cache_ttl_jitter: float = 0.1  # each entry lives cache_ttl * (1 +- this), so a burst does not expire at once
    cache_negative_ttl: int = 60
    cache_fill_wait: float = 2.0  # how long a read waits for another's archive read (its lock's lifetime too)
    bloom_capacity: int = 10_000_000
    bloom_error_rate: float = 0.001
    archive_max_age: int = 0  # seconds an archived message is kept; 0: for ever
    archive_prune_interval: int = 3600
    # Metrics (docs/operations.md: "Metrics"): the port the bridge and the worker serve
    # /metrics on (None: not served) and the address they listen on, the
    # bearer token every /metrics asks for, and whether a /metrics reachable
    # beyond this host may answer without one (development always may).
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    metrics_token: str | None = None
    metrics_public: bool = False
    # Seconds /readyz and the cluster gauges of /metrics answer from their last
    # probe of Kafka, Redis and the broker: a burst of calls costs one probe.
    probe_ttl: float = 2.0
    # HTTP rate limits: ((group, per-token limit, per-address limit), ...), a
    # limit being a `limits` string ("100/second", "10/second,600/minute") or None (off).
    rate_limits: tuple = RATE_LIMITS

    def rate_limit(self, group: str) -> tuple[str | None, str | None]:
        """(per-token, per-address) limit of a route group (RATE_LIMIT_GROUPS); None is off."""
        for name, token, address in self.rate_limits:
            if name == group:
                return token, address
        raise KeyError(group)

    @property
    def redis_broker(self) -> bool:
        """True when Celery's broker is Redis (tasks of a dead worker come back only
        after the visibility timeout)."""
        return urlsplit(self.celery_broker_url).scheme in {"redis", "rediss", "unix"}

    @property
    def amqp_broker(self) -> bool:
        """True when Celery's broker is RabbitMQ (docs/operations.md: "RabbitMQ as the Celery broker")."""
        return urlsplit(self.celery_broker_url).scheme in {"amqp", "amqps", "pyamqp"}

    @property
    def unacked_restore_interval(self) -> int:
        """How often a worker sweeps the Redis broker for tasks of dead workers."""
        return max(1, self.visibility_timeout // 10)

    @property
    def redispatch_after(self) -> float:
        """Seconds after which an unfinished dispatched message is sent again: well past
        the broker's own hand-back of a dead worker's tasks (the visibility timeout)."""
        return 2.0 * self.visibility_timeout

    @property
    def sweep_interval(self) -> float:
        """How often the bridge looks for dispatched messages older than `redispatch_after`."""
        return self.redispatch_after / 10

    @property
    def max_batch_bytes(self) -> int:
        """The largest batch body (docs/protocol.md: "Limits"): parsed JSON takes up to ~24 times
        its size in memory, so 1 MiB, or 16 messages of the largest size."""
        return max(1024 * 1024, 16 * self.max_message_bytes)

    @property
    def max_inbox_size(self) -> int:
        """What a WebSocket's frames waiting for their op may total (docs/protocol.md: "WebSocket limits"),
        by `len`: characters of a text frame, bytes of a binary one. Room for four frames of
        the largest size, and no less than 1 Mi."""
        return max(1024 * 1024, 4 * self.max_message_bytes)

    @property
    def dlq_topic(self) -> str:
        """Dead letters go to `<topic>.dlq` (SPEC)."""
        return f"{self.topic}.dlq"

    @classmethod
    def from_env(cls, environ=None) -> Settings:
        """Build settings from an environment mapping (default `os.environ`)."""
        env = os.environ if environ is None else environ
        redis_url = _url(env, "REDIS_URL", cls.redis_url, {"redis", "rediss", "unix"})
        auth = _flag(env, "HERALD_AUTH", True)
        secret = env.get("HERALD_SECRET_KEY") or None
        if auth and not secret:
            raise ConfigError(
                "HERALD_SECRET_KEY is not set: set it to a long random string, "
                "or set HERALD_AUTH=off for local development"
            )
        if secret and len(secret.encode()) < MIN_SECRET_BYTES:
            # A short HS256 key is brute-forced offline from one token (docs/configuration.md).
            raise ConfigError(
                f"HERALD_SECRET_KEY is {len(secret.encode())} bytes; use at least {MIN_SECRET_BYTES} random bytes "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        origins = tuple(o.strip().rstrip("/") for o in env.get("HERALD_CORS_ORIGINS", "").split(",") if o.strip())
        if "*" in origins:
            raise ConfigError("HERALD_CORS_ORIGINS may not contain '*': list the allowed origins")
        settings = cls(
            port=_int(env, "PORT", cls.port, 1, 65535),
            redis_url=redis_url,
            celery_broker_url=_url(env, "CELERY_BROKER_URL", redis_url, {"redis", "rediss", "unix", "amqp", "amqps", "pyamqp", "sqs"}),
            redis_ssl_cert_reqs=cert_reqs("REDIS_SSL_CERT_REQS",
                                          env.get("REDIS_SSL_CERT_REQS") or cls.redis_ssl_cert_reqs),
            redis_tls_ca=check_ca_pem("REDIS_TLS_CA", env["REDIS_TLS_CA"]) if env.get("REDIS_TLS_CA") else None,
            allow_eviction=_flag(env, "HERALD_ALLOW_EVICTION", False),
            redis_cluster=_flag(env, "REDIS_CLUSTER", False),
            **_kafka_connection(env),
            database_url=_database_url(env),
            topic=_topic(env),
            secret_key=secret,
            auth=auth,
            dev=_flag(env, "HERALD_DEV", False),
            cors_origins=origins,
            max_message_bytes=_int(env, "HERALD_MAX_MESSAGE_BYTES", cls.max_message_bytes, 64, 16 * 1024 * 1024),
            topic_partitions=_int(env, "HERALD_TOPIC_PARTITIONS", cls.topic_partitions, 1, 10000),
            topic_replication=_int(env, "HERALD_TOPIC_REPLICATION", None, 1, 100),
            redis_prefix=env.get("HERALD_REDIS_PREFIX", cls.redis_prefix) or cls.redis_prefix,
            redis_pool_size=_int(env, "HERALD_REDIS_POOL_SIZE", cls.redis_pool_size, 2, 10000),
            redis_pool_wait=_float(env, "HERALD_REDIS_POOL_WAIT", cls.redis_pool_wait, 0.1, 600),
            # Heroku's multi-tenant Kafka accepts only names under KAFKA_PREFIX.
            consumer_group=env.get("KAFKA_PREFIX", "")
            + (env.get("HERALD_CONSUMER_GROUP", cls.consumer_group) or cls.consumer_group),
            kafka_session_timeout=_float(env, "HERALD_KAFKA_SESSION_TIMEOUT", cls.kafka_session_timeout, 1, 300),
            produce_timeout=_float(env, "HERALD_PRODUCE_TIMEOUT", cls.produce_timeout, 0.1, 60),
            retry_max=_int(env, "HERALD_RETRY_MAX", cls.retry_max, 0, 100),
            retry_base_delay=_float(env, "HERALD_RETRY_BASE_DELAY", cls.retry_base_delay, 0.001, 3600),
            retry_max_delay=_float(env, "HERALD_RETRY_MAX_DELAY", cls.retry_max_delay, 0.001, 86400),
            visibility_timeout=_int(env, "HERALD_VISIBILITY_TIMEOUT", cls.visibility_timeout, 1, 7 * 86400),
            history_maxlen=_int(env, "HERALD_HISTORY_MAXLEN", cls.history_maxlen, 1, 10_000_000),
            history_max_age=_int(env, "HERALD_HISTORY_MAX_AGE", cls.history_max_age, 0, 365 * 86400),
            history_retention=_retention(env.get("HERALD_HISTORY_RETENTION", "")),
            status_ttl=_int(env, "HERALD_STATUS_TTL", cls.status_ttl, 60, 30 * 86400),
            channel_idle_ttl=_int(env, "HERALD_CHANNEL_IDLE_TTL", cls.channel_idle_ttl, 60, 365 * 86400),
            batch_size=_int(env, "HERALD_BATCH_SIZE", cls.batch_size, 1, 10000),
            send_queue_size=_int(env, "HERALD_SEND_QUEUE", cls.send_queue_size, 1, 1_000_000),
            send_queue_bytes=_int(env, "HERALD_SEND_QUEUE_BYTES", cls.send_queue_bytes, 64 * 1024, 1 << 30),
            ping_interval=_int(env, "HERALD_PING_INTERVAL", cls.ping_interval, 1, 3600),
            ws_rate=_float(env, "HERALD_WS_RATE", cls.ws_rate, 0.1, 100000),
            ws_max_per_user=_int(env, "HERALD_WS_MAX_PER_USER", cls.ws_max_per_user, 1, 10_000_000),
            ws_max_per_ip=_int(env, "HERALD_WS_MAX_PER_IP", cls.ws_max_per_ip, 1, 10_000_000),
            trusted_proxies=_int(env, "HERALD_TRUSTED_PROXIES", cls.trusted_proxies, 0, 10),
            ws_max_subscriptions=_int(env, "HERALD_WS_MAX_SUBSCRIPTIONS", cls.ws_max_subscriptions, 1, 100_000),
            ws_replay_page=_int(env, "HERALD_WS_REPLAY_PAGE", cls.ws_replay_page, 1, 100_000),
            history_page_bytes=_int(env, "HERALD_HISTORY_PAGE_BYTES", cls.history_page_bytes, 4096, 256 << 20),
            presence_ttl=_int(env, "HERALD_PRESENCE_TTL", cls.presence_ttl, 3, 3600),
            worker_lapse=_float(env, "HERALD_WORKER_LAPSE", cls.worker_lapse, 1, 600),
            order_wait=_float(env, "HERALD_ORDER_WAIT", cls.order_wait, 0, 7 * 86400),
            max_redeliveries=_int(env, "HERALD_MAX_REDELIVERIES", cls.max_redeliveries, 0, 100),
            task_time_limit=_float(env, "HERALD_TASK_TIME_LIMIT", cls.task_time_limit, 1, 86400),
            message_types=tuple(t.strip() for t in env.get("HERALD_MESSAGE_TYPES", "").split(",") if t.strip()),
            worker_concurrency=_int(env, "HERALD_WORKER_CONCURRENCY", cls.worker_concurrency, 1, 256),
            log_level=_choice(env, "HERALD_LOG_LEVEL", cls.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
            node_id=env.get("HERALD_NODE_ID") or f"{socket.gethostname()}-{os.getpid()}",
            rules_file=_rules_file(env),
            rules_timezone=_timezone(env, "HERALD_RULES_TIMEZONE", cls.rules_timezone),
            rules_alert_channel=_alert_channel(env),
            cache_url=_url(env, "HERALD_CACHE_URL", redis_url, {"redis", "rediss", "unix"})
            if env.get("HERALD_CACHE_URL") else None,
            cache_ttl=_int(env, "HERALD_CACHE_TTL", cls.cache_ttl, 1, 30 * 86400),
            cache_ttl_jitter=_float(env, "HERALD_CACHE_TTL_JITTER", cls.cache_ttl_jitter, 0, 0.9),
            cache_negative_ttl=_int(env, "HERALD_CACHE_NEGATIVE_TTL", cls.cache_negative_ttl, 1, 86400),
            cache_fill_wait=_float(env, "HERALD_CACHE_FILL_WAIT", cls.cache_fill_wait, 0.05, 60),
            bloom_capacity=_int(env, "HERALD_BLOOM_CAPACITY", cls.bloom_capacity, 1000, 1_000_000_000),
            bloom_error_rate=_float(env, "HERALD_BLOOM_ERROR_RATE", cls.bloom_error_rate, 1e-9, 0.5),
            archive_max_age=_int(env, "HERALD_ARCHIVE_MAX_AGE", cls.archive_max_age, 0, 100 * 365 * 86400),
            archive_prune_interval=_int(env, "HERALD_ARCHIVE_PRUNE_INTERVAL", cls.archive_prune_interval, 1, 86400),
            metrics_port=_int(env, "HERALD_METRICS_PORT", None, 1, 65535),
            metrics_bind=_bind_address(env),
            metrics_token=env.get("HERALD_METRICS_TOKEN") or None,
            metrics_public=_flag(env, "HERALD_METRICS_PUBLIC", False),
            probe_ttl=_float(env, "HERALD_PROBE_TTL", cls.probe_ttl, 0, 300),
            rate_limits=_rate_limits(env.get("HERALD_RATE_LIMITS", "")),
        )
        if not env.get("HERALD_ORDER_WAIT") and settings.redis_broker:
            # Strict order by default (docs/design.md: "Order"): a record waits for a
            # predecessor until the last safety net would have sent it again and
            # a worker run it: the bridge's sweep of what no worker finished (a
            # task the Redis broker lost when its worker died between taking it
            # and recording it), which may find it a sweep late, then a second
            # sweep's time for the re-sent task to reach a worker.
            settings = dataclasses.replace(settings, order_wait=settings.redispatch_after
                                           + 2 * settings.sweep_interval + cls.order_wait)
        elif not env.get("HERALD_ORDER_WAIT") and settings.amqp_broker:
            # RabbitMQ hands a killed worker's tasks back at once, but those of
            # a machine that vanished only when its connection's heartbeat lapses.
            settings = dataclasses.replace(settings, order_wait=AMQP_HEARTBEAT + cls.order_wait)
        _check_development_flags(settings)
        if settings.send_queue_bytes < 2 * settings.history_page_bytes:
            # A replay page goes into the send queue whole, with live frames behind it.
            raise ConfigError(f"HERALD_SEND_QUEUE_BYTES ({settings.send_queue_bytes}) must be at least twice "
                              f"HERALD_HISTORY_PAGE_BYTES ({settings.history_page_bytes})")
        _check_redis_tls(settings)
        if settings.redis_cluster:
            _check_cluster(env, settings)
        if settings.redis_broker and settings.retry_max_delay * 2 > settings.visibility_timeout:
            # A retry parked longer than the visibility timeout is handed to a
            # second worker by the Redis broker: the task would run twice.
            raise ConfigError(
                f"HERALD_RETRY_MAX_DELAY ({settings.retry_max_delay:g}s) must stay under half of "
                f"HERALD_VISIBILITY_TIMEOUT ({settings.visibility_timeout}s)"
            )
        return settings

    def retention(self, channel: str) -> tuple[int, int]:
        """(max length, max age in seconds; 0 = no limit) of a channel's history, by its namespace."""
        space = namespace(channel)
        for name, maxlen, age in self.history_retention:
            if name == space:
                return maxlen, age
        return self.history_maxlen, self.history_max_age



@functools.cache
def current() -> Settings:
    """This process's settings, read from `os.environ` on first use."""
    return load_or_exit()


def multiprocess_metrics_dir() -> str | None:
    """Point PROMETHEUS_MULTIPROC_DIR at a fresh private directory unless it is set; returns
    the directory made (the caller removes it at exit), or None. Call it before anything
    imports prometheus_client: the variable is read then."""
    if os.environ.get(MULTIPROC_ENV):
        return None
    path = tempfile.mkdtemp(prefix="herald-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def load_or_exit(environ=None) -> Settings:
    """`Settings.from_env`, or one line on stderr and exit 1 (SPEC: no traceback)."""
    try:
        return Settings.from_env(environ)
    except ConfigError as exc:
        print(f"herald: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _flag(env, name, default):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _ON:
        return True
    if raw.lower() in _OFF:
        return False
    raise ConfigError(f"{name}={raw!r} is not on or off")


def _choice(env, name, default, choices):
    raw = (env.get(name) or default).upper()
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _int(env, name, default, low, high):
    return _number(env, name, default, low, high, int, "a whole number")


def _float(env, name, default, low, high):
    return _number(env, name, default, low, high, float, "a number")


def _number(env, name, default, low, high, kind, noun):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {noun}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value:g} is outside {low:g}..{high:g}")
    return value


def _retention(raw: str) -> tuple:
    # "chat=500/86400,alerts=50/3600": per namespace, entries kept / seconds kept.
    rules = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, rule = item.partition("=")
        maxlen, _, age = rule.partition("/")
        if not name or not (maxlen.isascii() and maxlen.isdigit() and age.isascii() and age.isdigit()) \
                or int(maxlen) < 1:
            raise ConfigError(f"HERALD_HISTORY_RETENTION item {item!r} is not namespace=LENGTH/SECONDS")
        rules.append((name, int(maxlen), int(age)))
    return tuple(rules)


def _rate_limits(raw: str) -> tuple:
    # "publish=100/second;batch.address=50/second;admin=off", or "off" for every
    # limit. GROUP= sets both the per-token and the per-address limit, GROUP.token=
    # or GROUP.address= one of them; later items win; unnamed groups keep RATE_LIMITS.
    # Items are split on ";" because a value may list several limits with ",".
    from limits import parse_many

    if raw.strip().lower() == "off":
        return tuple((group, None, None) for group in RATE_LIMIT_GROUPS)
    table = {group: {"token": token, "address": address} for group, token, address in RATE_LIMITS}
    for item in filter(None, (part.strip() for part in raw.split(";"))):
        name, sep, value = item.partition("=")
        group, dot, who = name.strip().lower().partition(".")
        value = " ".join(value.split())
        if not sep or not value:
            raise ConfigError(f"HERALD_RATE_LIMITS item {item!r} is not GROUP=LIMIT (publish=100/second)")
        if group not in table:
            raise ConfigError(f"HERALD_RATE_LIMITS item {item!r}: {group!r} is not a route group "
                              f"({', '.join(RATE_LIMIT_GROUPS)})")
        if dot and who not in ("token", "address"):
            raise ConfigError(f"HERALD_RATE_LIMITS item {item!r}: after {group}. comes token or address")
        if value.lower() == "off":
            value = None
        else:
            try:
                parsed = parse_many(value)
            except ValueError:
                parsed = []
            if not parsed:
                raise ConfigError(f"HERALD_RATE_LIMITS item {item!r}: {value!r} is not a rate limit "
                                  "(100/second, 20 per minute, 10/second,600/hour) or off")
            if any(limit.amount < 1 for limit in parsed):
                # 0/second would refuse every request of the group: say off, or a limit.
                raise ConfigError(f"HERALD_RATE_LIMITS item {item!r}: a limit of 0 refuses everything; "
                                  "give at least 1")
        for key in (who,) if dot else ("token", "address"):
            table[group][key] = value
    return tuple((group, limits["token"], limits["address"]) for group, limits in table.items())


def _url(env, name, default, schemes):
    raw = env.get(name) or default
    parts = urlsplit(raw)
    if parts.scheme not in schemes:
        raise ConfigError(f"{name}={raw!r} is not a URL of scheme {', '.join(sorted(schemes))}")
    if parts.scheme != "unix" and parts.scheme != "sqs" and not parts.hostname:
        raise ConfigError(f"{name}={raw!r} names no host")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{name}={raw!r} has a bad port") from None
    return raw


def _check_development_flags(settings):
    # HERALD_AUTH=off lets anyone act as an admin: a developer's machine only
    # (docs/configuration.md). `flask dev` sets HERALD_DEV, and binds loopback.
    if not settings.auth and not settings.dev:
        raise ConfigError("HERALD_AUTH=off lets anyone in as an admin: it is for development only "
                          "(set HERALD_DEV=1, as `flask dev` does), or set HERALD_SECRET_KEY and leave auth on")
    if settings.metrics_port and not settings.metrics_token and not settings.metrics_public \
            and not settings.dev and not loopback(settings.metrics_bind):
        raise ConfigError(f"HERALD_METRICS_BIND={settings.metrics_bind} serves metrics beyond this host: "
                          "set HERALD_METRICS_TOKEN, or HERALD_METRICS_PUBLIC=1 to serve them to anyone")


def loopback(address: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, an IPv4-mapped 127.x)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _bind_address(env) -> str:
    raw = env.get("HERALD_METRICS_BIND") or Settings.metrics_bind
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(f"HERALD_METRICS_BIND={raw!r} is not an IP address (127.0.0.1, 0.0.0.0, ::)") from None
    return raw


def _check_cluster(env, settings):
    # Celery's Redis transport cannot run on a cluster (its queue and unacked
    # keys are used together in one MULTI), and a broker on the state cluster
    # would share its nodes' memory with the history.
    if not env.get("CELERY_BROKER_URL") or settings.celery_broker_url == settings.redis_url:
        raise ConfigError("REDIS_CLUSTER is on: set CELERY_BROKER_URL to a Redis (not the cluster) or a RabbitMQ")
    if any(brace in settings.redis_prefix for brace in "{}"):
        # The channel's hash tag must be the first {...} of every key.
        raise ConfigError(f"HERALD_REDIS_PREFIX={settings.redis_prefix!r} may not contain {{ or }} on a Redis Cluster")
    if urlsplit(settings.redis_url).scheme == "unix":
        raise ConfigError("REDIS_CLUSTER is on: REDIS_URL must be a redis:// or rediss:// URL of one of its nodes")


def _check_redis_tls(settings):
    # Every Redis client builds its TLS options from these URLs at start;
    # a value none of them could use fails here, in one line.
    urls = [("REDIS_URL", settings.redis_url)]
    if settings.redis_broker:
        urls.append(("CELERY_BROKER_URL", settings.celery_broker_url))
    for name, url in urls:
        redis_tls(url, settings, name)
    if settings.redis_tls_ca and not any(urlsplit(url).scheme == "rediss" for _, url in urls):
        raise ConfigError("REDIS_TLS_CA is set but neither REDIS_URL nor CELERY_BROKER_URL is a rediss:// URL")


_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _kafka_connection(env) -> dict:
    """The Kafka fields of Settings: addresses, TLS material, SASL, prefix."""
    servers, tls_url = _kafka_servers(env)
    username = env.get("KAFKA_SASL_USERNAME") or None
    password = env.get("KAFKA_SASL_PASSWORD") or None
    mechanism = env.get("KAFKA_SASL_MECHANISM") or None
    if mechanism is not None:
        mechanism = _choice(env, "KAFKA_SASL_MECHANISM", None, _SASL_MECHANISMS)
    sasl = bool(mechanism or username or password)
    explicit = env.get("KAFKA_SECURITY_PROTOCOL")
    if explicit:
        protocol = _choice(env, "KAFKA_SECURITY_PROTOCOL", None, _SECURITY_PROTOCOLS)
        if tls_url and not protocol.endswith("SSL"):
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol} contradicts the kafka+ssl:// of KAFKA_URL")
    else:
        protocol = ("SASL_" if sasl else "") + ("SSL" if tls_url else "PLAINTEXT")
        protocol = "SSL" if protocol == "PLAINTEXT" and (env.get("KAFKA_CLIENT_CERT") or env.get(
            "KAFKA_TRUSTED_CERT")) else protocol
    if protocol.startswith("SASL"):
        if not mechanism:
            raise ConfigError(f"KAFKA_SASL_MECHANISM is not set: {protocol} needs one of {', '.join(_SASL_MECHANISMS)}")
        for name, value in (("KAFKA_SASL_USERNAME", username), ("KAFKA_SASL_PASSWORD", password)):
            if not value:
                raise ConfigError(f"{name} is not set: KAFKA_SASL_MECHANISM={mechanism} needs a user name and password")
    elif sasl:
        raise ConfigError(f"KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL")
    cert, key, trusted = (_pem(env, name) for name in ("KAFKA_CLIENT_CERT", "KAFKA_CLIENT_CERT_KEY",
                                                        "KAFKA_TRUSTED_CERT"))
    if (cert or key or trusted) and not protocol.endswith("SSL"):
        raise ConfigError(f"KAFKA_CLIENT_CERT/KAFKA_TRUSTED_CERT is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                          "does not use TLS")
    if bool(cert) != bool(key):
        raise ConfigError("KAFKA_CLIENT_CERT and KAFKA_CLIENT_CERT_KEY go together: set both or neither")
    if trusted:
        _check_ca(trusted)
    if cert:
        _check_cert_pair(cert, key)
    prefix = env.get("KAFKA_PREFIX", "")
    if not _topic_name_ok(prefix):
        raise ConfigError(f"KAFKA_PREFIX={prefix!r} has characters Kafka names may not contain")
    return {
        "kafka_bootstrap_servers": servers, "kafka_security_protocol": protocol,
        "kafka_sasl_mechanism": mechanism, "kafka_sasl_username": username, "kafka_sasl_password": password,
        "kafka_client_cert": cert, "kafka_client_cert_key": key, "kafka_trusted_cert": trusted,
        "kafka_check_hostname": _flag(env, "KAFKA_SSL_CHECK_HOSTNAME", True), "kafka_prefix": prefix,
    }


def _kafka_servers(env) -> tuple[str, bool]:
    # Heroku's Kafka add-on sets KAFKA_URL as comma-separated kafka:// or
    # kafka+ssl:// URLs; returns ("host:port,...", whether they ask for TLS).
    name = "KAFKA_BOOTSTRAP_SERVERS" if env.get("KAFKA_BOOTSTRAP_SERVERS") else "KAFKA_URL"
    raw = env.get(name) or Settings.kafka_bootstrap_servers
    servers, schemes = [], set()
    for item in raw.split(","):
        item = item.strip()
        if "://" in item:
            scheme, _, item = item.partition("://")
            if scheme not in {"kafka", "kafka+ssl", "tcp", "plaintext"}:
                raise ConfigError(f"{name}: {scheme}://{item} has an unsupported scheme (kafka:// or kafka+ssl://)")
            schemes.add(scheme == "kafka+ssl")
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}: Kafka address {item!r} is not host:port")
        servers.append(f"{host}:{port}")
    if len(schemes) > 1:
        raise ConfigError(f"{name} mixes kafka:// and kafka+ssl:// addresses")
    return ",".join(servers), schemes == {True}


def _pem(env, name):
    # Heroku config vars keep the PEM's newlines; some dashboards turn them into "\n".
    raw = (env.get(name) or "").replace("\\n", "\n").strip()
    if not raw:
        return None
    if not raw.startswith("-----BEGIN ") or "-----END " not in raw:
        raise ConfigError(f"{name} is not PEM text (-----BEGIN ...): give the certificate or key itself, "
                          "not a file name")
    return raw + "\n"


def _check_ca(pem: str) -> None:
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"KAFKA_TRUSTED_CERT does not parse as a PEM certificate ({exc})") from None


def _check_cert_pair(cert: str, key: str) -> None:
    # OpenSSL reads a certificate chain only from files: a private directory, gone at once.
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, text in ((cert_path, cert), (key_path, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
                out.write(text)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cadata=cert)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"KAFKA_CLIENT_CERT does not parse as a PEM certificate ({exc})") from None
        try:
            context.load_cert_chain(cert_path, key_path, password=lambda: b"")  # never prompt on a tty
        except ssl.SSLError as exc:
            raise ConfigError(f"KAFKA_CLIENT_CERT_KEY is not the key of KAFKA_CLIENT_CERT, or does not parse "
                              f"({exc.reason or exc})") from None


def _database_url(env):
    raw = env.get("DATABASE_URL") or Settings.database_url
    # Heroku still hands out postgres://, which SQLAlchemy 2 no longer accepts.
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://"):]
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if not scheme.startswith(("sqlite", "postgresql")):
        raise ConfigError(f"DATABASE_URL={raw!r} is neither sqlite:// nor postgresql://")
    return raw


def _topic(env):
    topic = env.get("HERALD_TOPIC") or Settings.topic
    if not _topic_name_ok(topic):
        raise ConfigError(f"HERALD_TOPIC={topic!r} is not a valid Kafka topic name")
    # Heroku's multi-tenant Kafka accepts only names under KAFKA_PREFIX.
    return env.get("KAFKA_PREFIX", "") + topic


def _topic_name_ok(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    return len(name) <= 200 and set(name) <= allowed


def _rules_file(env):
    path = env.get("HERALD_RULES_FILE") or None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"HERALD_RULES_FILE={path!r} is not a readable file")
    return path


def _timezone(env, name, default):
    value = env.get(name) or default
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an IANA time zone (Europe/Paris, UTC)") from None
    return value


def _alert_channel(env):
    value = env.get("HERALD_RULES_ALERT_CHANNEL") or Settings.rules_alert_channel
    if not valid_channel(value):
        raise ConfigError(f"HERALD_RULES_ALERT_CHANNEL={value!r} is not a channel name ({CHANNEL_RE.pattern})")
    return value
