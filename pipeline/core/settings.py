"""Herald's one settings object, read from the environment once per process.

Each field of Settings declares its variable once, with `env`: the name, the
default, the parser that turns the variable's text into the value (bounds,
choices, URL schemes) and a line of doc. `Settings.from_env` reads every
declared variable, then applies the rules that tie several together (the
order wait's default, Kafka's protocol, a Redis Cluster's broker, TLS). A bad
value fails there, with a sentence that says which variable and what to do,
never later with a traceback. docs/configuration.md's table documents the same
variables (tests/unit/test_settings_table.py keeps the two in step).
The module is long because it is the table of record: about ninety
declarations, each a few lines with its doc, and their parsers beside them.

Each process reads its settings once, in its entry point, and passes them
down as an argument. `current()` reads them on first use and keeps them:
app.py (each gunicorn worker of `web`, and the `flask` commands), the bridge's
`main`, and tasks/worker.py when Celery imports it. `load_or_exit()` reads them
afresh: in gunicorn.conf.py (the arbiter, whose workers then read their own:
`node_id` names each), and in a command that checks them before it runs
another program (`python -m tasks`, Flower) or that makes the environment
itself (`flask dev`). Tests build them from a plain dict with `Settings.from_env`.
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
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pipeline.core.errors import ConfigError
from pipeline.core.events import Receiver, parse_receivers
from pipeline.core.messages import CHANNEL_RE, namespace, valid_channel
from pipeline.core.redis_tls import cert_reqs, check_ca_pem, redis_tls

T = TypeVar("T")
N = TypeVar("N", int, float)
# Turns a variable's text (never empty) into its field's value: (name, text) -> value,
# or ConfigError with one sentence naming the variable.
Parser = Callable[[str, str], T]
# ((namespace, maxlen, max_age_seconds), ...)
Retention = tuple[tuple[str, int, int], ...]
# ((group, per-token limit, per-address limit), ...), a limit being a `limits`
# string ("100/second", "10/second,600/minute") or None (off).
RateLimits = tuple[tuple[str, str | None, str | None], ...]

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
RATE_LIMITS: RateLimits = (
    ("publish", "10000/second", "20000/second"),
    ("batch", "1000/second", "2000/second"),
    ("read", "2000/second", "10000/second"),
    ("admin", "100/second", "200/second"),
    ("default", "200/second", "1000/second"),
)
RATE_LIMIT_GROUPS = tuple(group for group, _, _ in RATE_LIMITS)
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_BROKER_SCHEMES = (*_REDIS_SCHEMES, *_AMQP_SCHEMES, "sqs")
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_VAR = "herald.env"  # the key of a field's Var in its metadata


@dataclasses.dataclass(frozen=True)
class Var:
    """The environment variable that sets one Settings field."""

    name: str
    # `env` checks at the declaration that it returns the field's type.
    parse: Callable[[str, str], Any]
    doc: str
    alias: str | None = None  # read when `name` is unset or empty


def env(name: str, default: T, parse: Parser[T], doc: str, *, alias: str | None = None) -> T:
    """Declare a Settings field set by the variable `name`: `default` when the variable is
    unset or empty, else `parse(name, text)`; `doc` says what it is, in one line."""
    return dataclasses.field(default=default, metadata={_VAR: Var(name, parse, doc, alias)})


# Parsers: each takes the variable's name (for its message) and its non-empty text.


def whole(low: int, high: int) -> Parser[int]:
    """A whole number in low..high."""
    return lambda name, raw: _number(name, raw, low, high, int, "a whole number")


def number(low: float, high: float) -> Parser[float]:
    """A number in low..high."""
    return lambda name, raw: _number(name, raw, low, high, float, "a number")


def _number(name: str, raw: str, low: N, high: N, kind: type[N], noun: str) -> N:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {noun}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value:g} is outside {low:g}..{high:g}")
    return value


def flag(name: str, raw: str) -> bool:
    """on or off (1/0, true/false, yes/no too)."""
    if raw.lower() in _ON:
        return True
    if raw.lower() in _OFF:
        return False
    raise ConfigError(f"{name}={raw!r} is not on or off")


def text(name: str, raw: str) -> str:
    """Any text, as given."""
    return raw


def choice(*choices: str) -> Parser[str]:
    """One of `choices` (upper case), in any case."""

    def parse(name: str, raw: str) -> str:
        value = raw.upper()
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def url(*schemes: str) -> Parser[str]:
    """A URL of one of `schemes`, with a host (unix:// and sqs:// need none) and a good port."""

    def parse(name: str, raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes:
            raise ConfigError(f"{name}={raw!r} is not a URL of scheme {', '.join(sorted(schemes))}")
        if parts.scheme != "unix" and parts.scheme != "sqs" and not parts.hostname:
            raise ConfigError(f"{name}={raw!r} names no host")
        try:
            _ = parts.port  # a port that is not a number in 0..65535 raises here
        except ValueError:
            raise ConfigError(f"{name}={raw!r} has a bad port") from None
        return raw

    return parse


def words(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list; blanks around items and empty items are dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


# The parsers of single variables whose text has a grammar of its own.


def _secret(name: str, raw: str) -> str:
    if len(raw.encode()) < MIN_SECRET_BYTES:
        # A short HS256 key is brute-forced offline from one token (docs/configuration.md).
        raise ConfigError(
            f"{name} is {len(raw.encode())} bytes; use at least {MIN_SECRET_BYTES} random bytes "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return raw


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(origin.rstrip("/") for origin in words(name, raw))
    if "*" in origins:
        raise ConfigError(f"{name} may not contain '*': list the allowed origins")
    return origins


def _retention(name: str, raw: str) -> Retention:
    # "chat=500/86400,alerts=50/3600": per namespace, entries kept / seconds kept.
    rules: list[tuple[str, int, int]] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        space, _, rule = item.partition("=")
        maxlen, _, age = rule.partition("/")
        if not space or not (maxlen.isascii() and maxlen.isdigit() and age.isascii() and age.isdigit()) \
                or int(maxlen) < 1:
            raise ConfigError(f"{name} item {item!r} is not namespace=LENGTH/SECONDS")
        rules.append((space, int(maxlen), int(age)))
    return tuple(rules)


def _namespaces(name: str, raw: str) -> tuple[str, ...]:
    # "typing,cursors": the part before a channel's first ':' (messages.namespace), so no ':'.
    spaces = words(name, raw)
    for space in spaces:
        if ":" in space or not valid_channel(space):
            raise ConfigError(f"{name} item {space!r} is not a namespace (a channel name's part before its first ':')")
    return spaces


def _rate_limits(name: str, raw: str) -> RateLimits:
    # "publish=100/second;batch.address=50/second;admin=off", or "off" for every
    # limit. GROUP= sets both the per-token and the per-address limit, GROUP.token=
    # or GROUP.address= one of them; later items win; unnamed groups keep RATE_LIMITS.
    # Items are split on ";" because a value may list several limits with ",".
    from limits import parse_many

    if raw.strip().lower() == "off":
        return tuple((group, None, None) for group in RATE_LIMIT_GROUPS)
    table: dict[str, dict[str, str | None]] = {
        group: {"token": token, "address": address} for group, token, address in RATE_LIMITS}
    for item in filter(None, (part.strip() for part in raw.split(";"))):
        key, sep, given = item.partition("=")
        group, dot, who = key.strip().lower().partition(".")
        value: str | None = " ".join(given.split())
        if not sep or not value:
            raise ConfigError(f"{name} item {item!r} is not GROUP=LIMIT (publish=100/second)")
        if group not in table:
            raise ConfigError(f"{name} item {item!r}: {group!r} is not a route group "
                              f"({', '.join(RATE_LIMIT_GROUPS)})")
        if dot and who not in ("token", "address"):
            raise ConfigError(f"{name} item {item!r}: after {group}. comes token or address")
        if value.lower() == "off":
            value = None
        else:
            try:
                parsed = parse_many(value)
            except ValueError:
                parsed = []
            if not parsed:
                raise ConfigError(f"{name} item {item!r}: {value!r} is not a rate limit "
                                  "(100/second, 20 per minute, 10/second,600/hour) or off")
            if any(limit.amount < 1 for limit in parsed):
                # 0/second would refuse every request of the group: say off, or a limit.
                raise ConfigError(f"{name} item {item!r}: a limit of 0 refuses everything; "
                                  "give at least 1")
        for side in (who,) if dot else ("token", "address"):
            table[group][side] = value
    return tuple((group, limits["token"], limits["address"]) for group, limits in table.items())


def _ip_address(name: str, raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an IP address (127.0.0.1, 0.0.0.0, ::)") from None
    return raw


def _kafka_servers(name: str, raw: str) -> str:
    # Heroku's Kafka add-on sets KAFKA_URL as comma-separated kafka:// or
    # kafka+ssl:// URLs; returns "host:port,...".
    servers: list[str] = []
    schemes: set[bool] = set()
    for given in raw.split(","):
        item = given.strip()
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
    return ",".join(servers)


def _kafka_prefix(name: str, raw: str) -> str:
    if not _topic_name_ok(raw):
        raise ConfigError(f"{name}={raw!r} has characters Kafka names may not contain")
    return raw


def _pem(name: str, raw: str) -> str | None:
    # Heroku config vars keep the PEM's newlines; some dashboards turn them into "\n".
    pem = raw.replace("\\n", "\n").strip()
    if not pem:
        return None
    if not pem.startswith("-----BEGIN ") or "-----END " not in pem:
        raise ConfigError(f"{name} is not PEM text (-----BEGIN ...): give the certificate or key itself, "
                          "not a file name")
    return pem + "\n"


def _database_url(name: str, raw: str) -> str:
    # Heroku still hands out postgres://, which SQLAlchemy 2 no longer accepts.
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://"):]
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if not scheme.startswith(("sqlite", "postgresql")):
        raise ConfigError(f"{name}={raw!r} is neither sqlite:// nor postgresql://")
    return raw


def _topic(name: str, raw: str) -> str:
    if not _topic_name_ok(raw):
        raise ConfigError(f"{name}={raw!r} is not a valid Kafka topic name")
    return raw


def _topic_name_ok(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    return len(name) <= 200 and set(name) <= allowed


def _rules_file(name: str, raw: str) -> str:
    if not os.path.isfile(raw):
        raise ConfigError(f"{name}={raw!r} is not a readable file")
    return raw


def _timezone(name: str, raw: str) -> str:
    try:
        zoneinfo.ZoneInfo(raw)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not an IANA time zone (Europe/Paris, UTC)") from None
    return raw


def _alert_channel(name: str, raw: str) -> str:
    if not valid_channel(raw):
        raise ConfigError(f"{name}={raw!r} is not a channel name ({CHANNEL_RE.pattern})")
    return raw


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration; each field is set by the variable its `env` names."""

    # Fields are read in this order: the first bad one is the one reported.
    redis_url: str = env(
        "REDIS_URL", "redis://localhost:6379/0", url(*_REDIS_SCHEMES),
        "the Redis of state, cache, pub/sub and history; rediss:// for TLS")
    auth: bool = env("HERALD_AUTH", True, flag, "off lets every request in, as an admin (development only)")
    secret_key: str | None = env("HERALD_SECRET_KEY", None, _secret, "HS256 key for tokens, at least 32 bytes")
    cors_origins: tuple[str, ...] = env(
        "HERALD_CORS_ORIGINS", (), _origins, "origins whose pages may call the HTTP API and open /ws")
    port: int = env("PORT", 8000, whole(1, 65535), "the web port")
    # Unset: REDIS_URL (from_env).
    celery_broker_url: str = env(
        "CELERY_BROKER_URL", "redis://localhost:6379/0", url(*_BROKER_SCHEMES),
        "Celery's broker: a Redis or a RabbitMQ")
    redis_ssl_cert_reqs: str = env(
        "REDIS_SSL_CERT_REQS", "required", cert_reqs,
        "verification of rediss:// servers whose URL does not say: required, optional or none")
    redis_tls_ca: str | None = env(
        "REDIS_TLS_CA", None, check_ca_pem, "PEM text of the CA a rediss:// server's certificate chains to")
    allow_eviction: bool = env(
        "HERALD_ALLOW_EVICTION", False, flag, "run on a Redis whose maxmemory-policy may evict Herald's keys")
    # docs/operations.md: "Running on a Redis Cluster".
    redis_cluster: bool = env("REDIS_CLUSTER", False, flag, "REDIS_URL is a node of a Redis Cluster")
    # How clients reach and prove themselves to Kafka (docs/operations.md: "Managed Kafka").
    kafka_bootstrap_servers: str = env(
        "KAFKA_BOOTSTRAP_SERVERS", "localhost:9092", _kafka_servers, "Kafka brokers, host:port,...", alias="KAFKA_URL")
    # Unset: what KAFKA_URL, the SASL variables and the certificates imply (from_env).
    kafka_security_protocol: str = env(
        "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", choice(*_SECURITY_PROTOCOLS),
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str | None = env(
        "KAFKA_SASL_MECHANISM", None, choice(*_SASL_MECHANISMS), "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str | None = env("KAFKA_SASL_USERNAME", None, text, "the SASL user name")
    kafka_sasl_password: str | None = env("KAFKA_SASL_PASSWORD", None, text, "the SASL password")
    kafka_client_cert: str | None = env(
        "KAFKA_CLIENT_CERT", None, _pem, "PEM text of the client certificate, as Heroku gives it")
    kafka_client_cert_key: str | None = env(
        "KAFKA_CLIENT_CERT_KEY", None, _pem, "PEM text of the client certificate's unencrypted key")
    kafka_trusted_cert: str | None = env(
        "KAFKA_TRUSTED_CERT", None, _pem, "PEM text of the CA of the brokers' certificates")
    kafka_check_hostname: bool = env(
        "KAFKA_SSL_CHECK_HOSTNAME", True, flag, "off accepts a broker certificate that does not name its host")
    kafka_prefix: str = env("KAFKA_PREFIX", "", _kafka_prefix, "put before the topic names and the consumer group")
    database_url: str = env(
        "DATABASE_URL", "sqlite:///herald.db", _database_url, "the message archive: sqlite:// or postgresql://")
    # KAFKA_PREFIX comes before it (from_env).
    topic: str = env("HERALD_TOPIC", "herald.messages", _topic, "the main topic")
    # Development only (`flask dev` sets HERALD_DEV=1): the web process hands a
    # token to anyone at GET /dev/token, and Flower may run without a password.
    dev: bool = env("HERALD_DEV", False, flag, "development mode, set by `flask dev`")
    max_message_bytes: int = env(
        "HERALD_MAX_MESSAGE_BYTES", 65536, whole(64, 16 * 1024 * 1024),
        "the largest message body or WebSocket frame, in UTF-8 bytes")
    # Internals a deployment may tune.
    topic_partitions: int = env(
        "HERALD_TOPIC_PARTITIONS", 12, whole(1, 10000), "partitions of the topics the release step creates")
    # None: min(3, brokers), decided by the release step.
    topic_replication: int | None = env(
        "HERALD_TOPIC_REPLICATION", None, whole(1, 100), "replication factor of the topics the release step creates")
    redis_prefix: str = env(
        "HERALD_REDIS_PREFIX", "herald", text, "the first part of Herald's Redis keys and Celery queue")
    redis_pool_size: int = env("HERALD_REDIS_POOL_SIZE", 50, whole(2, 10000), "Redis connections per process")
    redis_pool_wait: float = env(
        "HERALD_REDIS_POOL_WAIT", 30.0, number(0.1, 600), "seconds a caller waits for a free Redis connection")
    # KAFKA_PREFIX comes before it (from_env).
    consumer_group: str = env("HERALD_CONSUMER_GROUP", "herald-bridge", text, "the bridges' Kafka consumer group")
    # The bridge's Kafka session: a dead bridge's partitions move after this
    # long. 6 s is the smallest Apache Kafka accepts by default
    # (group.min.session.timeout.ms); Tansu also holds a new group's first
    # join for half of it, so `flask dev` asks for 2 s from its own Tansu.
    kafka_session_timeout: float = env(
        "HERALD_KAFKA_SESSION_TIMEOUT", 6.0, number(1, 300),
        "seconds before a dead bridge's partitions move to another")
    produce_timeout: float = env(
        "HERALD_PRODUCE_TIMEOUT", 5.0, number(0.1, 60), "seconds a publish waits for Kafka to take it")
    retry_max: int = env(
        "HERALD_RETRY_MAX", 8, whole(0, 100), "retries of a failing message before it is dead-lettered")
    retry_base_delay: float = env(
        "HERALD_RETRY_BASE_DELAY", 0.5, number(0.001, 3600), "seconds of the first retry's backoff")
    retry_max_delay: float = env(
        "HERALD_RETRY_MAX_DELAY", 60.0, number(0.001, 86400), "seconds of the longest retry backoff")
    visibility_timeout: int = env(
        "HERALD_VISIBILITY_TIMEOUT", 300, whole(1, 7 * 86400),
        "seconds before the Redis broker hands a dead worker's tasks back")
    history_maxlen: int = env(
        "HERALD_HISTORY_MAXLEN", 1000, whole(1, 10_000_000), "messages kept per channel for history and resume")
    history_max_age: int = env(
        "HERALD_HISTORY_MAX_AGE", 86400, whole(0, 365 * 86400), "seconds history is kept (0: no limit)")
    history_retention: Retention = env(
        "HERALD_HISTORY_RETENTION", (), _retention,
        "per namespace, entries / seconds kept: chat=500/86400,alerts=50/3600")
    # docs/protocol.md: "Ephemeral messages".
    ephemeral_namespaces: tuple[str, ...] = env(
        "HERALD_EPHEMERAL_NAMESPACES", (), _namespaces,
        "namespaces whose messages go straight to subscribers: no Kafka, history or status")
    status_ttl: int = env(
        "HERALD_STATUS_TTL", 86400, whole(60, 30 * 86400),
        "seconds a message's status, dedupe marker and idempotency answer are kept")
    channel_idle_ttl: int = env(
        "HERALD_CHANNEL_IDLE_TTL", 7 * 86400, whole(60, 365 * 86400),
        "seconds without messages after which a channel loses its history and gate keys")
    batch_size: int = env("HERALD_BATCH_SIZE", 100, whole(1, 10000), "records per task, at most")
    send_queue_size: int = env(
        "HERALD_SEND_QUEUE", 512, whole(1, 1_000_000), "writes queued per WebSocket before it is closed")
    send_queue_bytes: int = env(
        "HERALD_SEND_QUEUE_BYTES", 8 * 1024 * 1024, whole(64 * 1024, 1 << 30),
        "bytes queued per WebSocket before it is closed")
    ping_interval: int = env("HERALD_PING_INTERVAL", 25, whole(1, 3600), "seconds between WebSocket pings")
    ws_rate: float = env("HERALD_WS_RATE", 50.0, number(0.1, 100000), "frames a second a client may send")
    ws_max_per_user: int = env("HERALD_WS_MAX_PER_USER", 100, whole(1, 10_000_000), "open WebSockets per user")
    ws_max_per_ip: int = env("HERALD_WS_MAX_PER_IP", 1000, whole(1, 10_000_000), "open WebSockets per client address")
    trusted_proxies: int = env(
        "HERALD_TRUSTED_PROXIES", 0, whole(0, 10), "proxies whose X-Forwarded-For entries are trusted")
    ws_max_subscriptions: int = env(
        "HERALD_WS_MAX_SUBSCRIPTIONS", 100, whole(1, 100_000), "channels one WebSocket may subscribe to")
    ws_replay_page: int = env(
        "HERALD_WS_REPLAY_PAGE", 200, whole(1, 100_000), "history messages a replay reads and sends at a time")
    history_page_bytes: int = env(
        "HERALD_HISTORY_PAGE_BYTES", 1024 * 1024, whole(4096, 256 << 20),
        "bytes past which a history or replay page stops")
    presence_ttl: int = env(
        "HERALD_PRESENCE_TTL", 15, whole(3, 3600),
        "seconds before a dead web process's presence and connection counts are cleared")
    presence_grace: float = env(
        "HERALD_PRESENCE_GRACE", 3.0, number(0, 300),
        "seconds a user's last leave waits for a reconnect before presence.leave and channel.vacated are sent")
    # Webhooks (docs/webhooks.md): where events go, how they are signed, batched and retried.
    webhooks: tuple[Receiver, ...] = env(
        "HERALD_WEBHOOK_URL", (), parse_receivers,
        "webhook receivers, ';'-separated: a URL, then optionally the event globs it wants")
    webhook_secret: str | None = env(
        "HERALD_WEBHOOK_SECRET", None, _secret, "the HMAC-SHA256 key signing webhook POSTs, at least 32 bytes")
    webhook_timeout: float = env(
        "HERALD_WEBHOOK_TIMEOUT", 5.0, number(0.1, 60), "seconds a webhook POST waits for its answer")
    webhook_batch: int = env("HERALD_WEBHOOK_BATCH", 500, whole(1, 10_000), "events one webhook POST carries, at most")
    webhook_max_delay: float = env(
        "HERALD_WEBHOOK_MAX_DELAY", 30.0, number(0.01, 3600), "seconds of the longest backoff of a failing receiver")
    webhook_retry_for: float = env(
        "HERALD_WEBHOOK_RETRY_FOR", 3600.0, number(1, 30 * 86400),
        "seconds a batch a receiver keeps refusing is retried before it is dead-lettered")
    webhook_backlog: int = env(
        "HERALD_WEBHOOK_BACKLOG", 1_000_000, whole(1000, 100_000_000),
        "events waiting for a lagging receiver, at most; past it the oldest are dead-lettered")
    # Permissions from the deployment's own backend (docs/guide.md: "Permissions from your backend").
    authorize_url: str | None = env(
        "HERALD_AUTHORIZE_URL", None, url("http", "https"),
        "asked about a subscribe or publish the token's globs do not allow")
    authorize_ttl: float = env(
        "HERALD_AUTHORIZE_TTL", 60.0, number(0, 86400), "seconds an answer of HERALD_AUTHORIZE_URL is cached")
    authorize_timeout: float = env(
        "HERALD_AUTHORIZE_TIMEOUT", 1.0, number(0.01, 30), "seconds a call to HERALD_AUTHORIZE_URL waits")
    authorize_on_timeout: str = env(
        "HERALD_AUTHORIZE_ON_TIMEOUT", "DENY", choice("DENY", "ALLOW"),
        "what a call to HERALD_AUTHORIZE_URL that gets no answer decides: deny or allow")
    revocation_ttl: int = env(
        "HERALD_REVOCATION_TTL", 7 * 86400, whole(60, 365 * 86400),
        "seconds a token revocation is kept: longer than any token lives")
    worker_lapse: float = env(
        "HERALD_WORKER_LAPSE", 5.0, number(1, 600), "seconds of silence after which a worker is taken for dead")
    # Unset: beyond the broker's hand-back of a dead worker's tasks (from_env).
    order_wait: float = env(
        "HERALD_ORDER_WAIT", 5.0, number(0, 7 * 86400),
        "seconds a parked message waits for its channel's previous one before it passes anyway")
    max_redeliveries: int = env(
        "HERALD_MAX_REDELIVERIES", 3, whole(0, 100), "worker deaths one message may cause before it is dead-lettered")
    task_time_limit: float = env(
        "HERALD_TASK_TIME_LIMIT", 60.0, number(1, 86400), "seconds a task may run before it is handed back (tasks/)")
    message_types: tuple[str, ...] = env("HERALD_MESSAGE_TYPES", (), words, "message types workers accept; empty: any")
    worker_concurrency: int = env("HERALD_WORKER_CONCURRENCY", 2, whole(1, 256), "worker processes per `worker`")
    log_level: str = env("HERALD_LOG_LEVEL", "INFO", choice(*_LOG_LEVELS), "DEBUG, INFO, WARNING or ERROR")
    # Unset: <host name>-<process id> (from_env).
    node_id: str = env("HERALD_NODE_ID", "", text, "this process's name: its hub node, its Kafka client ids")
    # Rules (docs/guide.md: "Rules"): a set loaded at start when none is stored, the
    # time zone of `time_range` conditions that name none, where alerts go.
    rules_file: str | None = env(
        "HERALD_RULES_FILE", None, _rules_file, "a rule set stored at start-up when none is stored")
    rules_timezone: str = env("HERALD_RULES_TIMEZONE", "UTC", _timezone, "the zone of a time_range that names none")
    rules_alert_channel: str = env(
        "HERALD_RULES_ALERT_CHANNEL", "alerts:rules", _alert_channel, "where alert actions publish")
    # The archive read path (docs/guide.md: "The archive and its cache"); no
    # cache_url: the cache is in REDIS_URL's Redis.
    cache_url: str | None = env(
        "HERALD_CACHE_URL", None, url(*_REDIS_SCHEMES),
        "the Redis of archive cache entries, fill locks and the Bloom filter")
    cache_ttl: int = env(
        "HERALD_CACHE_TTL", 3600, whole(1, 30 * 86400), "seconds an archived message's cache entry lives")
    # Entries live cache_ttl * (1 +- this), so a burst does not expire at once.
    cache_ttl_jitter: float = env(
        "HERALD_CACHE_TTL_JITTER", 0.1, number(0, 0.9), "the share by which a cache entry's life varies")
    cache_negative_ttl: int = env(
        "HERALD_CACHE_NEGATIVE_TTL", 60, whole(1, 86400),
        "seconds an id the archive does not have is remembered as absent")
    cache_fill_wait: float = env(
        "HERALD_CACHE_FILL_WAIT", 2.0, number(0.05, 60),
        "seconds a read waits for another's archive read (its lock's lifetime too)")
    bloom_capacity: int = env(
        "HERALD_BLOOM_CAPACITY", 10_000_000, whole(1000, 1_000_000_000), "ids the archive's Bloom filter is sized for")
    bloom_error_rate: float = env(
        "HERALD_BLOOM_ERROR_RATE", 0.001, number(1e-9, 0.5), "the Bloom filter's false positive rate")
    archive_max_age: int = env(
        "HERALD_ARCHIVE_MAX_AGE", 0, whole(0, 100 * 365 * 86400), "seconds an archived message is kept; 0: for ever")
    archive_prune_interval: int = env(
        "HERALD_ARCHIVE_PRUNE_INTERVAL", 3600, whole(1, 86400), "seconds between prunes of the archive")
    # Metrics (docs/operations.md: "Metrics"): the port the bridge and the worker serve
    # /metrics on (None: not served) and the address they listen on, the
    # bearer token every /metrics asks for, and whether a /metrics reachable
    # beyond this host may answer without one (development always may).
    metrics_port: int | None = env(
        "HERALD_METRICS_PORT", None, whole(1, 65535), "the port bridge and worker serve /metrics on")
    metrics_bind: str = env(
        "HERALD_METRICS_BIND", "127.0.0.1", _ip_address, "the address bridge and worker serve /metrics on")
    metrics_token: str | None = env("HERALD_METRICS_TOKEN", None, text, "the bearer token every /metrics asks for")
    metrics_public: bool = env(
        "HERALD_METRICS_PUBLIC", False, flag, "on serves /metrics without a token to anyone who reaches it")
    # Seconds /readyz and the cluster gauges of /metrics answer from their last
    # probe of Kafka, Redis and the broker: a burst of calls costs one probe.
    probe_ttl: float = env(
        "HERALD_PROBE_TTL", 2.0, number(0, 300), "seconds /readyz and the cluster gauges reuse a probe")
    rate_limits: RateLimits = env(
        "HERALD_RATE_LIMITS", RATE_LIMITS, _rate_limits,
        "HTTP rate limits per route group, per token and per address; off for none")
    # gunicorn's, for the `web` process (gunicorn.conf.py).
    web_concurrency: int = env("WEB_CONCURRENCY", 1, whole(1, 100_000), "gunicorn worker processes per `web`")
    worker_connections: int = env(
        "HERALD_WORKER_CONNECTIONS", 20000, whole(1, 100_000_000),
        "connections (WebSockets too) one gunicorn worker of `web` holds at most")

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
        return urlsplit(self.celery_broker_url).scheme in _REDIS_SCHEMES

    @property
    def amqp_broker(self) -> bool:
        """True when Celery's broker is RabbitMQ (docs/operations.md: "RabbitMQ as the Celery broker")."""
        return urlsplit(self.celery_broker_url).scheme in _AMQP_SCHEMES

    @property
    def task_queue(self) -> str:
        """The Celery queue the bridge sends tasks to and the workers take them from."""
        return f"{self.redis_prefix}.tasks"

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
        """Dead letters go to `<topic>.dlq` (docs/configuration.md: HERALD_TOPIC)."""
        return f"{self.topic}.dlq"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from an environment mapping (default `os.environ`)."""
        environ = os.environ if environ is None else environ
        parsed = cls(**{field.name: _read(environ, field, var) for field, var in variables()})
        if parsed.auth and not parsed.secret_key:
            raise ConfigError(
                "HERALD_SECRET_KEY is not set: set it to a long random string, "
                "or set HERALD_AUTH=off for local development"
            )
        settings = dataclasses.replace(
            parsed,
            celery_broker_url=parsed.celery_broker_url if environ.get("CELERY_BROKER_URL") else parsed.redis_url,
            kafka_security_protocol=_kafka_protocol(environ, parsed),
            # Heroku's multi-tenant Kafka accepts only names under KAFKA_PREFIX.
            topic=parsed.kafka_prefix + parsed.topic,
            consumer_group=parsed.kafka_prefix + parsed.consumer_group,
            node_id=parsed.node_id or f"{socket.gethostname()}-{os.getpid()}",
        )
        if not environ.get("HERALD_ORDER_WAIT") and settings.redis_broker:
            # Strict order by default (docs/design.md: "Order"): a record waits for a
            # predecessor until the last safety net would have sent it again and
            # a worker run it: the bridge's sweep of what no worker finished (a
            # task the Redis broker lost when its worker died between taking it
            # and recording it), which may find it a sweep late, then a second
            # sweep's time for the re-sent task to reach a worker.
            settings = dataclasses.replace(settings, order_wait=settings.redispatch_after
                                           + 2 * settings.sweep_interval + cls.order_wait)
        elif not environ.get("HERALD_ORDER_WAIT") and settings.amqp_broker:
            # RabbitMQ hands a killed worker's tasks back at once, but those of
            # a machine that vanished only when its connection's heartbeat lapses.
            settings = dataclasses.replace(settings, order_wait=AMQP_HEARTBEAT + cls.order_wait)
        _check_development_flags(settings)
        if settings.send_queue_bytes < 2 * settings.history_page_bytes:
            # A replay page goes into the send queue whole, with live frames behind it.
            raise ConfigError(f"HERALD_SEND_QUEUE_BYTES ({settings.send_queue_bytes}) must be at least twice "
                              f"HERALD_HISTORY_PAGE_BYTES ({settings.history_page_bytes})")
        _check_redis_tls(settings)
        if settings.webhooks and not settings.webhook_secret:
            raise ConfigError("HERALD_WEBHOOK_URL is set but HERALD_WEBHOOK_SECRET is not: receivers check "
                              "each POST's signature with it")
        if settings.webhooks and settings.redis_broker and settings.webhook_max_delay * 2 > settings.visibility_timeout:
            # As HERALD_RETRY_MAX_DELAY: a retry held past the visibility timeout runs twice.
            raise ConfigError(
                f"HERALD_WEBHOOK_MAX_DELAY ({settings.webhook_max_delay:g}s) must stay under half of "
                f"HERALD_VISIBILITY_TIMEOUT ({settings.visibility_timeout}s)"
            )
        if settings.redis_cluster:
            _check_cluster(environ, settings)
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

    def ephemeral(self, channel: str) -> bool:
        """True when a channel's namespace is in HERALD_EPHEMERAL_NAMESPACES: its messages are
        published straight to its subscribers, never to Kafka or history."""
        return namespace(channel) in self.ephemeral_namespaces


def variables() -> Iterator[tuple[dataclasses.Field[Any], Var]]:
    """Each Settings field with the variable that sets it, in the order they are read."""
    for field in dataclasses.fields(Settings):
        yield field, field.metadata[_VAR]


def _read(environ: Mapping[str, str], field: dataclasses.Field[Any], var: Var) -> Any:
    # The variable, else its alias, when set and not empty; else the default.
    for name in filter(None, (var.name, var.alias)):
        raw = environ.get(name)
        if raw:
            return var.parse(name, raw)
    return field.default


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


def load_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """`Settings.from_env`, or one line on stderr and exit 1 (docs/configuration.md: no traceback)."""
    try:
        return Settings.from_env(environ)
    except ConfigError as exc:
        print(f"herald: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def loopback(address: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, an IPv4-mapped 127.x)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# The rules that tie several variables together, applied once every one is read.


def _kafka_protocol(environ: Mapping[str, str], settings: Settings) -> str:
    """KAFKA_SECURITY_PROTOCOL, else the one KAFKA_URL, SASL and the certificates imply;
    checks that the SASL and TLS variables fit it."""
    tls_url = _asks_tls(environ.get("KAFKA_BOOTSTRAP_SERVERS") or environ.get("KAFKA_URL") or "")
    mechanism = settings.kafka_sasl_mechanism
    sasl = bool(mechanism or settings.kafka_sasl_username or settings.kafka_sasl_password)
    if environ.get("KAFKA_SECURITY_PROTOCOL"):
        protocol = settings.kafka_security_protocol
        if tls_url and not protocol.endswith("SSL"):
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol} contradicts the kafka+ssl:// of KAFKA_URL")
    else:
        protocol = ("SASL_" if sasl else "") + ("SSL" if tls_url else "PLAINTEXT")
        if protocol == "PLAINTEXT" and (environ.get("KAFKA_CLIENT_CERT") or environ.get("KAFKA_TRUSTED_CERT")):
            protocol = "SSL"
    if protocol.startswith("SASL"):
        if not mechanism:
            raise ConfigError(f"KAFKA_SASL_MECHANISM is not set: {protocol} needs one of {', '.join(_SASL_MECHANISMS)}")
        for name, value in (("KAFKA_SASL_USERNAME", settings.kafka_sasl_username),
                            ("KAFKA_SASL_PASSWORD", settings.kafka_sasl_password)):
            if not value:
                raise ConfigError(f"{name} is not set: KAFKA_SASL_MECHANISM={mechanism} needs a user name and password")
    elif sasl:
        raise ConfigError(f"KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL")
    cert, key, trusted = settings.kafka_client_cert, settings.kafka_client_cert_key, settings.kafka_trusted_cert
    if (cert or key or trusted) and not protocol.endswith("SSL"):
        raise ConfigError(f"KAFKA_CLIENT_CERT/KAFKA_TRUSTED_CERT is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                          "does not use TLS")
    if bool(cert) != bool(key):
        raise ConfigError("KAFKA_CLIENT_CERT and KAFKA_CLIENT_CERT_KEY go together: set both or neither")
    if trusted:
        _check_ca(trusted)
    if cert and key:
        _check_cert_pair(cert, key)
    return protocol


def _asks_tls(servers: str) -> bool:
    # Whether Kafka addresses _kafka_servers accepted (their schemes never mixed) are kafka+ssl:// URLs.
    return any(item.strip().partition("://")[0] == "kafka+ssl" for item in servers.split(",") if "://" in item)


def _check_ca(pem: str) -> None:
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"KAFKA_TRUSTED_CERT does not parse as a PEM certificate ({exc})") from None


def _check_cert_pair(cert: str, key: str) -> None:
    # OpenSSL reads a certificate chain only from files: a private directory, gone at once.
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, pem in ((cert_path, cert), (key_path, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
                out.write(pem)
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


def _check_development_flags(settings: Settings) -> None:
    # HERALD_AUTH=off lets anyone act as an admin: a developer's machine only
    # (docs/configuration.md). `flask dev` sets HERALD_DEV, and binds loopback.
    if not settings.auth and not settings.dev:
        raise ConfigError("HERALD_AUTH=off lets anyone in as an admin: it is for development only "
                          "(set HERALD_DEV=1, as `flask dev` does), or set HERALD_SECRET_KEY and leave auth on")
    if settings.metrics_port and not settings.metrics_token and not settings.metrics_public \
            and not settings.dev and not loopback(settings.metrics_bind):
        raise ConfigError(f"HERALD_METRICS_BIND={settings.metrics_bind} serves metrics beyond this host: "
                          "set HERALD_METRICS_TOKEN, or HERALD_METRICS_PUBLIC=1 to serve them to anyone")


def _check_cluster(environ: Mapping[str, str], settings: Settings) -> None:
    # Celery's Redis transport cannot run on a cluster (its queue and unacked
    # keys are used together in one MULTI), and a broker on the state cluster
    # would share its nodes' memory with the history.
    if not environ.get("CELERY_BROKER_URL") or settings.celery_broker_url == settings.redis_url:
        raise ConfigError("REDIS_CLUSTER is on: set CELERY_BROKER_URL to a Redis (not the cluster) or a RabbitMQ")
    if any(brace in settings.redis_prefix for brace in "{}"):
        # The channel's hash tag must be the first {...} of every key.
        raise ConfigError(f"HERALD_REDIS_PREFIX={settings.redis_prefix!r} may not contain {{ or }} on a Redis Cluster")
    if urlsplit(settings.redis_url).scheme == "unix":
        raise ConfigError("REDIS_CLUSTER is on: REDIS_URL must be a redis:// or rediss:// URL of one of its nodes")


def _check_redis_tls(settings: Settings) -> None:
    # Every Redis client builds its TLS options from these URLs at start;
    # a value none of them could use fails here, in one line.
    urls = [("REDIS_URL", settings.redis_url)]
    if settings.redis_broker:
        urls.append(("CELERY_BROKER_URL", settings.celery_broker_url))
    for name, address in urls:
        redis_tls(address, settings, name)
    if settings.redis_tls_ca and not any(urlsplit(address).scheme == "rediss" for _, address in urls):
        raise ConfigError("REDIS_TLS_CA is set but neither REDIS_URL nor CELERY_BROKER_URL is a rediss:// URL")
