"""Kafka connection settings: Heroku's KAFKA_URL, TLS material as PEM text, SASL, the prefix,
and the one librdkafka configuration every client starts from."""

from __future__ import annotations

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.settings import Settings
from pipeline.kafka import client_config
from tests.tls import make_pki

BASE = {"HERALD_AUTH": "off", "HERALD_DEV": "1"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_heroku_kafka_ssl_url_with_certificates_gives_an_ssl_client(pki):
    settings = Settings.from_env({**BASE, "KAFKA_URL": "kafka+ssl://h1:9096, kafka+ssl://h2:9096",
                                  "KAFKA_TRUSTED_CERT": pki.text("ca.pem"),
                                  "KAFKA_CLIENT_CERT": pki.text("client.pem"),
                                  "KAFKA_CLIENT_CERT_KEY": pki.text("client.key")})
    conf = client_config(settings, **{"client.id": "x"})
    assert conf["bootstrap.servers"] == "h1:9096,h2:9096"
    assert conf["security.protocol"] == "SSL"
    assert conf["ssl.ca.pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert "BEGIN CERTIFICATE" in conf["ssl.certificate.pem"] and "PRIVATE KEY" in conf["ssl.key.pem"]
    assert conf["client.id"] == "x" and "sasl.mechanism" not in conf
    assert conf["allow.auto.create.topics"] is False  # only the release phase makes topics


def test_plain_url_gives_a_plaintext_client_without_tls_or_sasl_keys():
    conf = client_config(Settings.from_env({**BASE, "KAFKA_URL": "kafka://h1:9092"}))
    assert conf["security.protocol"] == "PLAINTEXT"
    assert not [key for key in conf if key.startswith(("ssl.", "sasl."))]


@pytest.mark.parametrize("url, sasl, protocol", [
    ("kafka+ssl://h:9093", True, "SASL_SSL"),
    ("kafka://h:9092", True, "SASL_PLAINTEXT"),
    ("kafka+ssl://h:9093", False, "SSL"),
])
def test_protocol_is_inferred_from_the_url_and_sasl_variables(url, sasl, protocol):
    env = {**BASE, "KAFKA_URL": url}
    if sasl:
        env.update(KAFKA_SASL_MECHANISM="scram-sha-512", KAFKA_SASL_USERNAME="u", KAFKA_SASL_PASSWORD="p")
    conf = client_config(Settings.from_env(env))
    assert conf["security.protocol"] == protocol
    if sasl:
        assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == ("SCRAM-SHA-512", "u", "p")


def test_explicit_protocol_wins_over_inference():
    settings = Settings.from_env({**BASE, "KAFKA_BOOTSTRAP_SERVERS": "h:9092", "KAFKA_SECURITY_PROTOCOL": "ssl"})
    assert client_config(settings)["security.protocol"] == "SSL"


def test_pem_with_escaped_newlines_is_accepted(pki):
    escaped = pki.text("ca.pem").replace("\n", "\\n")
    settings = Settings.from_env({**BASE, "KAFKA_URL": "kafka+ssl://h:9093", "KAFKA_TRUSTED_CERT": escaped})
    assert settings.kafka_trusted_cert == pki.text("ca.pem")


def test_hostname_check_can_be_turned_off_for_tls_only():
    conf = client_config(Settings.from_env({**BASE, "KAFKA_URL": "kafka+ssl://h:9093",
                                            "KAFKA_SSL_CHECK_HOSTNAME": "off"}))
    assert conf["ssl.endpoint.identification.algorithm"] == "none"


def test_prefix_applies_to_topics_and_consumer_group():
    settings = Settings.from_env({**BASE, "KAFKA_PREFIX": "columbia-123.", "HERALD_TOPIC": "msgs"})
    assert (settings.topic, settings.dlq_topic, settings.consumer_group) == \
        ("columbia-123.msgs", "columbia-123.msgs.dlq", "columbia-123.herald-bridge")


def test_replication_is_left_to_the_release_step_unless_set():
    assert Settings.from_env(BASE).topic_replication is None
    assert Settings.from_env({**BASE, "HERALD_TOPIC_REPLICATION": "3"}).topic_replication == 3


@pytest.mark.parametrize("env, words", [
    ({"KAFKA_URL": "https://h:9092"}, "KAFKA_URL: https://h:9092 has an unsupported scheme"),
    ({"KAFKA_URL": "kafka://h:9092,kafka+ssl://h:9093"}, "KAFKA_URL mixes"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "h"}, "KAFKA_BOOTSTRAP_SERVERS: Kafka address 'h' is not host:port"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS' is not one of"),
    ({"KAFKA_URL": "kafka+ssl://h:1", "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, "contradicts the kafka\\+ssl://"),
    ({"KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
     "KAFKA_SASL_MECHANISM='GSSAPI' is not one of"),
    ({"KAFKA_SASL_MECHANISM": "PLAIN"}, "KAFKA_SASL_USERNAME is not set"),
    ({"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_PASSWORD is not set"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_MECHANISM is not set"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM is not set"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_MECHANISM": "PLAIN"}, "does not use SASL"),
    ({"KAFKA_TRUSTED_CERT": "/etc/ssl/ca.pem", "KAFKA_URL": "kafka+ssl://h:1"}, "KAFKA_TRUSTED_CERT is not PEM text"),
    ({"KAFKA_TRUSTED_CERT": "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----",
      "KAFKA_URL": "kafka+ssl://h:1"}, "KAFKA_TRUSTED_CERT does not parse"),
    ({"KAFKA_PREFIX": "bad prefix/"}, "KAFKA_PREFIX"),
    ({"HERALD_TOPIC_REPLICATION": "0"}, "HERALD_TOPIC_REPLICATION"),
    ({"HERALD_KAFKA_SESSION_TIMEOUT": "0.5"}, "HERALD_KAFKA_SESSION_TIMEOUT"),
])
def test_bad_kafka_values_are_one_line_naming_the_variable(env, words):
    with pytest.raises(ConfigError, match=words) as caught:
        Settings.from_env({**BASE, **env})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("cert, key, words", [
    ("client.pem", None, "KAFKA_CLIENT_CERT and KAFKA_CLIENT_CERT_KEY go together"),
    ("client.pem", "rogue-client.key", "KAFKA_CLIENT_CERT_KEY is not the key of KAFKA_CLIENT_CERT"),
    ("client.key", "client.key", "KAFKA_CLIENT_CERT does not parse"),
])
def test_bad_client_certificates_name_the_variable(pki, cert, key, words):
    env = {**BASE, "KAFKA_URL": "kafka+ssl://h:9093", "KAFKA_CLIENT_CERT": pki.text(cert)}
    if key:
        env["KAFKA_CLIENT_CERT_KEY"] = pki.text(key)
    with pytest.raises(ConfigError, match=words) as caught:
        Settings.from_env(env)
    assert "\n" not in str(caught.value)


def test_certificates_without_tls_are_refused(pki):
    with pytest.raises(ConfigError, match="KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"):
        Settings.from_env({**BASE, "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "KAFKA_TRUSTED_CERT": pki.text("ca.pem")})


def test_bridge_session_is_the_least_a_kafka_accepts_by_default_and_can_be_shorter():
    # Tansu answers a new group's first join after half the session timeout:
    # the bridge's 10 s made every start wait 5 s for its first record.
    from pipeline.bridge import consumer_config

    conf = consumer_config(Settings.from_env(BASE))
    assert conf["session.timeout.ms"] == 6000 and conf["heartbeat.interval.ms"] == 1000
    conf = consumer_config(Settings.from_env({**BASE, "HERALD_KAFKA_SESSION_TIMEOUT": "2"}))
    assert conf["session.timeout.ms"] == 2000 and conf["heartbeat.interval.ms"] == 666


def test_dev_on_its_own_tansu_asks_for_a_short_session_unless_told_otherwise():
    from web.cli import use_embedded_kafka

    env = {"KAFKA_URL": "kafka://elsewhere:9092"}
    use_embedded_kafka(env, 9092)
    assert env == {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "HERALD_KAFKA_SESSION_TIMEOUT": "2"}
    env = {"HERALD_KAFKA_SESSION_TIMEOUT": "10"}
    use_embedded_kafka(env, 9092)
    assert env["HERALD_KAFKA_SESSION_TIMEOUT"] == "10"
