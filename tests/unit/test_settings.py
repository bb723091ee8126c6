"""Settings: defaults, parsing, and one clear sentence for each bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.settings import AMQP_HEARTBEAT, Settings

ROOT = Path(__file__).resolve().parents[2]

BASE = {"HERALD_SECRET_KEY": "s" * 32}


def test_defaults_follow_the_spec():
    settings = Settings.from_env(BASE)
    assert settings.port == 8000
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.celery_broker_url == settings.redis_url
    assert settings.kafka_bootstrap_servers == "localhost:9092"
    assert settings.database_url == "sqlite:///herald.db"
    assert settings.topic == "herald.messages" and settings.dlq_topic == "herald.messages.dlq"
    assert settings.auth is True and settings.cors_origins == ()
    assert settings.max_message_bytes == 65536


def test_metrics_are_served_on_a_port_and_behind_a_token_only_when_asked():
    settings = Settings.from_env(BASE)
    assert settings.metrics_port is None and settings.metrics_token is None
    assert settings.metrics_bind == "127.0.0.1" and settings.metrics_public is False
    assert settings.probe_ttl == 2.0
    settings = Settings.from_env({**BASE, "HERALD_METRICS_PORT": "9102", "HERALD_METRICS_TOKEN": "t0ken"})
    assert settings.metrics_port == 9102 and settings.metrics_token == "t0ken"


@pytest.mark.parametrize("env", [{"HERALD_METRICS_TOKEN": "t0ken"}, {"HERALD_METRICS_PUBLIC": "1"},
                                 {"HERALD_DEV": "1"}])
def test_metrics_beyond_this_host_need_a_token_or_an_explicit_opt_out(env):
    wide = {**BASE, "HERALD_METRICS_PORT": "9102", "HERALD_METRICS_BIND": "0.0.0.0"}
    with pytest.raises(ConfigError, match="HERALD_METRICS_BIND=0.0.0.0 serves metrics beyond this host"):
        Settings.from_env(wide)
    assert Settings.from_env({**wide, **env}).metrics_bind == "0.0.0.0"
    # Loopback (the default), IPv4 or IPv6, needs neither.
    for address in ("127.0.0.1", "::1", "127.0.0.5"):
        assert Settings.from_env({**wide, "HERALD_METRICS_BIND": address}).metrics_bind == address


def test_auth_off_is_for_development_only():
    with pytest.raises(ConfigError, match="HERALD_AUTH=off lets anyone in as an admin: it is for development only"):
        Settings.from_env({"HERALD_AUTH": "off"})
    with pytest.raises(ConfigError, match="HERALD_AUTH=off"):
        Settings.from_env({**BASE, "HERALD_AUTH": "off"})


def test_broker_defaults_to_redis_url():
    settings = Settings.from_env({**BASE, "REDIS_URL": "redis://cache:6380/2"})
    assert settings.celery_broker_url == "redis://cache:6380/2"


def test_heroku_kafka_url_is_accepted():
    settings = Settings.from_env({**BASE, "KAFKA_URL": "kafka://h1:9092,kafka://h2:9093"})
    assert settings.kafka_bootstrap_servers == "h1:9092,h2:9093"


def test_heroku_postgres_scheme_is_rewritten():
    settings = Settings.from_env({**BASE, "DATABASE_URL": "postgres://u:p@db:5432/x"})
    assert settings.database_url == "postgresql://u:p@db:5432/x"


def test_auth_off_needs_no_secret_in_development():
    assert Settings.from_env({"HERALD_AUTH": "off", "HERALD_DEV": "1"}).auth is False


def test_cors_origins_are_split():
    settings = Settings.from_env({**BASE, "HERALD_CORS_ORIGINS": "https://a.example, https://b.example/"})
    assert settings.cors_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize("env, words", [
    ({}, "HERALD_SECRET_KEY"),
    ({"HERALD_SECRET_KEY": "s" * 31}, "HERALD_SECRET_KEY is 31 bytes"),
    ({"HERALD_SECRET_KEY": "\u00e9" * 15}, "HERALD_SECRET_KEY is 30 bytes"),
    ({**BASE, "PORT": "eighty"}, "PORT"),
    ({**BASE, "PORT": "70000"}, "PORT"),
    ({**BASE, "HERALD_METRICS_PORT": "0"}, "HERALD_METRICS_PORT"),
    ({**BASE, "HERALD_METRICS_PORT": "metrics"}, "HERALD_METRICS_PORT"),
    ({**BASE, "HERALD_METRICS_BIND": "metrics.local"}, "HERALD_METRICS_BIND='metrics.local' is not an IP address"),
    ({**BASE, "HERALD_METRICS_PUBLIC": "sure"}, "HERALD_METRICS_PUBLIC"),
    ({**BASE, "HERALD_PROBE_TTL": "-1"}, "HERALD_PROBE_TTL"),
    ({**BASE, "REDIS_URL": "http://x"}, "REDIS_URL"),
    ({**BASE, "REDIS_URL": "redis://"}, "names no host"),
    ({**BASE, "KAFKA_BOOTSTRAP_SERVERS": "nohostport"}, "host:port"),
    ({**BASE, "DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
    ({**BASE, "HERALD_AUTH": "maybe"}, "HERALD_AUTH"),
    ({**BASE, "HERALD_CORS_ORIGINS": "*"}, "HERALD_CORS_ORIGINS"),
    ({**BASE, "HERALD_MAX_MESSAGE_BYTES": "-1"}, "HERALD_MAX_MESSAGE_BYTES"),
    ({**BASE, "HERALD_TOPIC": "bad topic!"}, "HERALD_TOPIC"),
    ({**BASE, "HERALD_TRUSTED_PROXIES": "-1"}, "HERALD_TRUSTED_PROXIES"),
    ({**BASE, "HERALD_WS_MAX_SUBSCRIPTIONS": "0"}, "HERALD_WS_MAX_SUBSCRIPTIONS"),
    ({**BASE, "HERALD_ALLOW_EVICTION": "perhaps"}, "HERALD_ALLOW_EVICTION"),
    ({**BASE, "HERALD_RETRY_MAX_DELAY": "3000", "HERALD_VISIBILITY_TIMEOUT": "3600"}, "VISIBILITY_TIMEOUT"),
    ({**BASE, "WEB_CONCURRENCY": "many"}, "WEB_CONCURRENCY='many' is not a whole number"),
    ({**BASE, "HERALD_WORKER_CONNECTIONS": "0"}, r"HERALD_WORKER_CONNECTIONS=0 is outside 1\.\.1e\+08"),
])
def test_bad_values_name_the_variable(env, words):
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env)


def test_gunicorn_sizes_the_web_process_from_settings():
    settings = Settings.from_env(BASE)
    assert (settings.web_concurrency, settings.worker_connections) == (1, 20000)
    settings = Settings.from_env({**BASE, "WEB_CONCURRENCY": "3", "HERALD_WORKER_CONNECTIONS": "500"})
    assert (settings.web_concurrency, settings.worker_connections) == (3, 500)


def test_gunicorn_conf_takes_its_worker_counts_from_settings(tmp_path):
    env = {"PATH": "/usr/bin:/bin", **BASE, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "WEB_CONCURRENCY": "3", "HERALD_WORKER_CONNECTIONS": "77"}
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app", "--print-config"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    config = dict(map(str.strip, line.split(" = ", 1)) for line in done.stdout.splitlines() if " = " in line)
    assert config["workers"] == "3" and config["worker_connections"] == "77", done.stderr
    bad = subprocess.run(command, cwd=ROOT, env={**env, "HERALD_WORKER_CONNECTIONS": "lots"}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        "herald: configuration error: HERALD_WORKER_CONNECTIONS='lots' is not a whole number"]


def test_the_celery_queue_is_named_after_the_redis_prefix():
    assert Settings.from_env(BASE).task_queue == "herald.tasks"
    assert Settings.from_env({**BASE, "HERALD_REDIS_PREFIX": "blue"}).task_queue == "blue.tasks"


def test_misconfigured_process_prints_one_line_and_exits_1():
    result = subprocess.run([sys.executable, "-m", "pipeline.bridge"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "REDIS_URL": "ftp://nope"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "REDIS_URL" in lines[0] and "Traceback" not in result.stderr


def test_retention_per_namespace():
    settings = Settings.from_env({**BASE, "HERALD_HISTORY_RETENTION": "chat=500/3600, alerts=10/0",
                                  "HERALD_HISTORY_MAXLEN": "99"})
    assert settings.retention("chat:lobby") == (500, 3600)
    assert settings.retention("alerts:x") == (10, 0)
    assert settings.retention("other:x") == (99, 86400)
    for bad in ("chat=many", "chat=\u00b2/10", "chat=5/\u0663", "chat=0/10", "=5/10"):
        with pytest.raises(ConfigError, match="HERALD_HISTORY_RETENTION"):
            Settings.from_env({**BASE, "HERALD_HISTORY_RETENTION": bad})


def test_order_wait_outlasts_the_redis_brokers_hand_back_unless_set():
    # A predecessor the Redis broker lost is sent again by the bridge's sweep, after twice
    # the visibility timeout, found up to a sweep (a tenth of that) late, and given
    # another sweep's time to run: waiting that long keeps order (docs/design.md: "Order").
    settings = Settings.from_env({**BASE, "HERALD_VISIBILITY_TIMEOUT": "200"})
    assert settings.order_wait == 400 + 2 * 40 + 5
    assert Settings.from_env({**BASE, "HERALD_VISIBILITY_TIMEOUT": "200", "HERALD_ORDER_WAIT": "2"}).order_wait == 2
    # RabbitMQ hands a killed consumer's messages back at once, a vanished machine's once its heartbeat lapses.
    amqp = Settings.from_env({**BASE, "CELERY_BROKER_URL": "amqp://guest@localhost//"})
    assert amqp.amqp_broker and not amqp.redis_broker
    assert amqp.order_wait == AMQP_HEARTBEAT + 5


def test_the_visibility_timeout_bounds_retry_delays_only_on_the_redis_broker():
    # RabbitMQ has no visibility timeout: a long retry delay never hands a task to a second worker.
    settings = Settings.from_env({**BASE, "CELERY_BROKER_URL": "amqps://u:p@rabbit.example/vh",
                                  "HERALD_RETRY_MAX_DELAY": "3000"})
    assert settings.retry_max_delay == 3000 and settings.amqp_broker


@pytest.mark.parametrize("env, problem", [
    ({}, "set CELERY_BROKER_URL"),
    ({"CELERY_BROKER_URL": "redis://cluster:7000/0"}, "set CELERY_BROKER_URL"),
    ({"CELERY_BROKER_URL": "redis://broker:6379/0", "HERALD_REDIS_PREFIX": "h{x}"}, "may not contain"),
    ({"CELERY_BROKER_URL": "redis://broker:6379/0", "REDIS_URL": "unix:///tmp/r.sock"}, "redis:// or rediss://"),
])
def test_a_redis_cluster_needs_a_broker_of_its_own_and_a_prefix_without_braces(env, problem):
    with pytest.raises(ConfigError, match=problem):
        Settings.from_env({**BASE, "REDIS_URL": "redis://cluster:7000/0", "REDIS_CLUSTER": "1", **env})


def test_a_redis_cluster_with_a_broker_apart_is_accepted():
    settings = Settings.from_env({**BASE, "REDIS_URL": "redis://cluster:7000/0", "REDIS_CLUSTER": "on",
                                  "CELERY_BROKER_URL": "amqp://guest:guest@mq//"})
    assert settings.redis_cluster and settings.amqp_broker
    assert not Settings.from_env(BASE).redis_cluster


def test_development_mode_is_off_unless_asked_for():
    assert Settings.from_env(BASE).dev is False
    assert Settings.from_env({**BASE, "HERALD_DEV": "1"}).dev is True
    with pytest.raises(ConfigError, match="HERALD_DEV"):
        Settings.from_env({**BASE, "HERALD_DEV": "maybe"})


def test_rate_limits_default_high_and_are_set_per_group_token_and_address():
    settings = Settings.from_env(BASE)
    assert settings.rate_limit("publish") == ("10000/second", "20000/second")
    settings = Settings.from_env({**BASE, "HERALD_RATE_LIMITS":
                                  "publish=100/second; batch.address = 20 per minute;read=off;"
                                  "admin=10/second,600/hour;admin.token=5/second"})
    assert settings.rate_limit("publish") == ("100/second", "100/second")
    assert settings.rate_limit("batch") == ("1000/second", "20 per minute")
    assert settings.rate_limit("read") == (None, None)
    assert settings.rate_limit("admin") == ("5/second", "10/second,600/hour")
    assert settings.rate_limit("default") == ("200/second", "1000/second")


def test_rate_limits_off_turns_every_limit_off():
    settings = Settings.from_env({**BASE, "HERALD_RATE_LIMITS": "OFF"})
    assert all(token is None and address is None for _, token, address in settings.rate_limits)


@pytest.mark.parametrize("value, words", [
    ("publish", "is not GROUP=LIMIT"),
    ("publish=", "is not GROUP=LIMIT"),
    ("pubish=1/second", "'pubish' is not a route group"),
    ("publish.user=1/second", "token or address"),
    ("publish=10/sec", "'10/sec' is not a rate limit"),
    ("publish=1.5/second", "is not a rate limit"),
    ("publish=10/second;600/hour", "'600/hour' is not GROUP=LIMIT"),
    ("publish=0/second", "a limit of 0 refuses everything"),
])
def test_bad_rate_limits_are_refused_with_the_item_at_fault(value, words):
    with pytest.raises(ConfigError, match=f"HERALD_RATE_LIMITS item .*{words}"):
        Settings.from_env({**BASE, "HERALD_RATE_LIMITS": value})


def test_webhook_settings_are_checked_only_with_a_receiver():
    # A short visibility timeout (the fault tests' 4 s) is fine without webhooks...
    base = {"HERALD_SECRET_KEY": "k" * 40, "HERALD_VISIBILITY_TIMEOUT": "4", "HERALD_RETRY_MAX_DELAY": "1"}
    assert Settings.from_env(base).webhooks == ()
    hooked = {**base, "HERALD_WEBHOOK_URL": "https://app.example/hooks presence.*,channel.*; http://b:9/h"}
    # ...but a receiver needs its secret, and retries held under half the visibility timeout.
    with pytest.raises(ConfigError, match="HERALD_WEBHOOK_SECRET"):
        Settings.from_env(hooked)
    with pytest.raises(ConfigError, match="HERALD_WEBHOOK_MAX_DELAY"):
        Settings.from_env({**hooked, "HERALD_WEBHOOK_SECRET": "s" * 40})
    settings = Settings.from_env({**hooked, "HERALD_WEBHOOK_SECRET": "s" * 40, "HERALD_WEBHOOK_MAX_DELAY": "1"})
    first, second = settings.webhooks
    assert first.wants("presence.join") and first.wants("channel.vacated") and not first.wants("message.delivered")
    assert second.wants("message.delivered") and first.name != second.name


@pytest.mark.parametrize("raw", ["ftp://x/h", "https://a/h nosuch.event", "https://a/h; https://a/h", "/relative"])
def test_bad_webhook_receivers_name_the_variable(raw):
    with pytest.raises(ConfigError, match="HERALD_WEBHOOK_URL"):
        Settings.from_env({"HERALD_SECRET_KEY": "k" * 40, "HERALD_WEBHOOK_URL": raw})
