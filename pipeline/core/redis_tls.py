"""TLS for every Redis client Herald makes: the state store, the hub's listener,
the Celery broker (kombu), the worker's hand-back and Flower.

`rediss://` URLs verify the server's certificate by default. The options come
from the URL's query (`ssl_cert_reqs`, `ssl_ca_certs`), else from
`REDIS_SSL_CERT_REQS` and `REDIS_TLS_CA` (docs/configuration.md). They are
taken out of the URL and given to each client as redis-py keyword arguments:
redis-py takes them beside the URL, kombu as `broker_use_ssl` (which it hands
to redis-py's `SSLConnection`, and Flower to redis-py's asyncio client), so
every client sees the same options whatever it would make of the query.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.core.settings import Settings

CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_QUERY_KEYS = ("ssl_cert_reqs", "ssl_ca_certs")


def cert_reqs(name: str, raw: str) -> str:
    """`required`, `optional` or `none` from `raw` (kombu's `CERT_REQUIRED` spelling too)."""
    key = raw.strip().lower().removeprefix("cert_")
    if key not in CERT_REQS:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(CERT_REQS)}")
    return key


def check_ca_pem(name: str, pem: str) -> str:
    """`pem` if it is PEM certificate text (what Heroku-like hosts put in variables)."""
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{name} is not PEM certificate text (-----BEGIN CERTIFICATE-----...): {exc}") from None
    return pem


def redis_tls(url: str, settings: Settings, name: str = "REDIS_URL") -> tuple[str, dict[str, Any]]:
    """(the URL without its TLS query, redis-py TLS keyword arguments) for one Redis URL.

    The arguments are empty for `redis://` and `unix://`. For `rediss://` the
    URL's `ssl_cert_reqs` wins over `settings.redis_ssl_cert_reqs`; the CA
    file of `ssl_ca_certs` and the PEM text of `settings.redis_tls_ca` are both
    trusted when given, else the system's CAs are. Raises ConfigError, naming
    `name`, for a value no client could use.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    tls = {key: value for key, value in query if key.startswith("ssl_")}
    unknown = sorted(set(tls) - set(_QUERY_KEYS))
    if unknown:
        raise ConfigError(f"{name} has {', '.join(unknown)}: Herald takes only {', '.join(_QUERY_KEYS)}")
    if parts.scheme != "rediss":
        if tls:
            raise ConfigError(f"{name} has {', '.join(sorted(tls))} but is not a rediss:// URL")
        return url, {}
    reqs = cert_reqs(f"{name} ssl_cert_reqs", tls.get("ssl_cert_reqs", settings.redis_ssl_cert_reqs))
    # redis-py keyword arguments, given to each client as they are.
    options: dict[str, Any] = {"ssl_cert_reqs": CERT_REQS[reqs]}
    if "ssl_ca_certs" in tls:
        path = tls["ssl_ca_certs"]
        if not os.path.isfile(path):
            raise ConfigError(f"{name} ssl_ca_certs={path!r} is not a file")
        try:
            ssl.create_default_context(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{name} ssl_ca_certs={path!r} is not a PEM CA file: {exc}") from None
        options["ssl_ca_certs"] = path
    if settings.redis_tls_ca:
        options["ssl_ca_data"] = settings.redis_tls_ca
    rest = urlencode([(key, value) for key, value in query if not key.startswith("ssl_")])
    return urlunsplit(parts._replace(query=rest)), options
