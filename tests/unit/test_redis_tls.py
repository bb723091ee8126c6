"""TLS options for Redis clients: from the URL's query or the environment, one sentence per bad value."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.redis_tls import redis_tls
from pipeline.core.settings import Settings
from tests.harness import tls_certificates

BASE = {"HERALD_SECRET_KEY": "s" * 32}
TLS_URL = "rediss://:secret@cache.example:6380/0"


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory):
    """PEM text of a real CA certificate."""
    return tls_certificates(tmp_path_factory.mktemp("ca"))["ca"].read_text()


def options(**env):
    settings = Settings.from_env({**BASE, **env})
    return redis_tls(settings.redis_url, settings)


def test_rediss_verifies_against_the_system_cas_by_default():
    assert options(REDIS_URL=TLS_URL) == (TLS_URL, {"ssl_cert_reqs": ssl.CERT_REQUIRED})


def test_plain_redis_gets_no_tls_options():
    assert options(REDIS_URL="redis://cache:6379/0") == ("redis://cache:6379/0", {})


def test_the_urls_query_wins_and_leaves_the_url():
    url, tls = options(REDIS_URL=TLS_URL + "?ssl_cert_reqs=none&health=1", REDIS_SSL_CERT_REQS="required")
    assert url == TLS_URL + "?health=1" and tls == {"ssl_cert_reqs": ssl.CERT_NONE}
    # kombu's spelling, as Celery's documentation writes it.
    assert options(REDIS_URL=TLS_URL + "?ssl_cert_reqs=CERT_OPTIONAL")[1] == {"ssl_cert_reqs": ssl.CERT_OPTIONAL}


def test_heroku_style_none_from_the_environment():
    # Heroku sets REDIS_URL itself: the query cannot be added there.
    assert options(REDIS_URL=TLS_URL, REDIS_SSL_CERT_REQS="none")[1] == {"ssl_cert_reqs": ssl.CERT_NONE}


def test_a_ca_as_pem_text_or_as_a_file(ca_pem, tmp_path):
    assert options(REDIS_URL=TLS_URL, REDIS_TLS_CA=ca_pem)[1] == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                                   "ssl_ca_data": ca_pem}
    path = tmp_path / "ca.pem"
    path.write_text(ca_pem)
    assert options(REDIS_URL=f"{TLS_URL}?ssl_ca_certs={path}")[1] == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                                        "ssl_ca_certs": str(path)}


def test_the_broker_url_gets_the_same_options(ca_pem):
    settings = Settings.from_env({**BASE, "REDIS_URL": "redis://state:6379/0", "REDIS_TLS_CA": ca_pem,
                                  "CELERY_BROKER_URL": TLS_URL + "?ssl_cert_reqs=optional"})
    assert redis_tls(settings.celery_broker_url, settings) == (TLS_URL, {"ssl_cert_reqs": ssl.CERT_OPTIONAL,
                                                                         "ssl_ca_data": ca_pem})


@pytest.mark.parametrize("env, words", [
    ({"REDIS_URL": TLS_URL + "?ssl_cert_reqs=maybe"}, "REDIS_URL ssl_cert_reqs='maybe' is not one of required"),
    ({"REDIS_SSL_CERT_REQS": "maybe", "REDIS_URL": TLS_URL}, "REDIS_SSL_CERT_REQS='maybe'"),
    ({"REDIS_URL": "redis://cache:6379/0?ssl_cert_reqs=none"}, "REDIS_URL has ssl_cert_reqs but is not a rediss"),
    ({"REDIS_URL": TLS_URL + "?ssl_certfile=/c.pem"}, "REDIS_URL has ssl_certfile: Herald takes only"),
    ({"REDIS_URL": TLS_URL + "?ssl_ca_certs=/nowhere.pem"}, "REDIS_URL ssl_ca_certs='/nowhere.pem' is not a file"),
    ({"REDIS_URL": f"{TLS_URL}?ssl_ca_certs={__file__}"}, "is not a PEM CA file"),
    ({"REDIS_URL": TLS_URL, "REDIS_TLS_CA": "not a certificate"}, "REDIS_TLS_CA is not PEM certificate text"),
    ({"REDIS_URL": TLS_URL, "REDIS_TLS_CA": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
     "REDIS_TLS_CA is not PEM"),
    ({"REDIS_URL": "redis://cache:6379/0", "REDIS_TLS_CA": "@ca"}, "neither REDIS_URL nor CELERY_BROKER_URL"),
    ({"CELERY_BROKER_URL": "redis://b:6379/0?ssl_cert_reqs=none"}, "CELERY_BROKER_URL has ssl_cert_reqs"),
])
def test_bad_values_name_the_variable(env, words, ca_pem):
    env = {k: ca_pem if v == "@ca" else v for k, v in env.items()}
    with pytest.raises(ConfigError, match=words) as caught:
        Settings.from_env({**BASE, **env})
    assert "\n" not in str(caught.value)


def test_a_ca_that_is_not_pem_stops_a_process_in_one_line():
    result = subprocess.run([sys.executable, "-m", "pipeline.bridge"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", **BASE, "REDIS_URL": TLS_URL, "REDIS_TLS_CA": "garbage"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "REDIS_TLS_CA is not PEM certificate text" in result.stderr
