"""Redis over TLS (`rediss://`) for every client: store, hub, bridge, Celery broker, hand-back, Flower."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from devtools import embedded
from pipeline.core.settings import Settings
from pipeline.store import check_at_start
from tests.harness import (
    PROCESSES,
    ROOT,
    SECRET,
    Stack,
    redis_server,
    refused_start,
    start_environment,
    tls_certificates,
    wait_until,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The server's CA and certificate, and a second CA that signed nothing of the server's."""
    base = tmp_path_factory.mktemp("tls")
    return {"server": tls_certificates(base / "server"), "other": tls_certificates(base / "other")}


# Verified against the CA given as PEM text (REDIS_TLS_CA), and Heroku's way:
# its self-signed certificates pass only with ssl_cert_reqs=none in the URL.
MODES = {"ca": {}, "none": {"redis_query": "ssl_cert_reqs=none"}}


@pytest.fixture(scope="module", params=sorted(MODES))
def tls_stack(request, certs, tmp_path_factory):
    """A whole stack whose Redis, and so Celery broker, speaks TLS only."""
    env = {"REDIS_TLS_CA": certs["server"]["ca"].read_text()} if request.param == "ca" else {}
    system = Stack(tmp_path_factory.mktemp(f"tls-{request.param}"), redis_tls=certs["server"],
                   **MODES[request.param], **env)
    try:
        system.worker()
        system.bridge()
        system.webs = [system.web()]
        yield system
    finally:
        system.stop()


def test_a_message_goes_through_the_whole_pipeline_over_tls(tls_stack):
    assert tls_stack.settings.redis_url.startswith("rediss://")
    assert tls_stack.settings.celery_broker_url == tls_stack.settings.redis_url
    web, token, channel = tls_stack.webs[0], tls_stack.token(), "tls:lobby"
    client = web.ws(token)
    client.recv()
    client.subscribe(channel, status=True)
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "over tls"},
                                    token=token)
    assert status == 202, answer
    frame = client.expect(lambda f: f["op"] == "message")
    assert frame["id"] == answer["id"] and frame["data"] == "over tls"
    client.expect(lambda f: f["op"] == "status" and f["status"] == "delivered")
    client.close()
    # The worker's hand-back talks to the broker through kombu's connection: its liveness key is there.
    store = tls_stack.store()
    assert wait_until(lambda: store.redis.smembers(store.keys.workers), 10, what="a registered worker")


def test_flower_reads_the_broker_over_tls(tls_stack):
    port = embedded.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks:celery_app", "flower",
                             f"--port={port}", "--address=127.0.0.1"],
                            env={**tls_stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: embedded.port_open("127.0.0.1", port), 30, what="flower")
        url = f"http://127.0.0.1:{port}/api/queues/length"
        with urllib.request.urlopen(url, timeout=10) as resp:
            queues = json.loads(resp.read())["active_queues"]
        # Flower opens its own Redis client from the app's broker_use_ssl; a
        # failure would be logged and leave the list empty.
        assert [q["name"] for q in queues] == [f"{tls_stack.settings.redis_prefix}.tasks"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert "Unable to get queues" not in output


@pytest.fixture(scope="module")
def tls_redis(certs, tmp_path_factory):
    """A Redis speaking TLS only, with the server certificate; yields its rediss:// URL."""
    port = embedded.free_port()
    server = redis_server(port, tmp_path_factory.mktemp("tls-redis") / "redis.log", tls=certs["server"]).start()
    try:
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        server.stop()


@pytest.mark.parametrize("command", sorted(PROCESSES))
def test_a_wrong_ca_is_one_line_at_start(tls_redis, certs, command):
    env = start_environment(REDIS_URL=tls_redis, REDIS_TLS_CA=certs["other"]["ca"].read_text())
    line = refused_start(env, command)
    assert line.startswith(f"herald {command}: cannot start: Redis at {tls_redis} does not answer")
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_the_right_ca_passes_the_start_check(tls_redis, certs):
    ca = certs["server"]["ca"].read_text()
    settings = Settings.from_env(start_environment(REDIS_URL=tls_redis, REDIS_TLS_CA=ca))
    assert check_at_start(settings) is None  # and noeviction, Redis' default


def test_the_celery_broker_connection_verifies_the_certificate(tls_redis, certs, monkeypatch):
    # kombu alone would fall back to no verification for a rediss:// URL
    # given no TLS options (it only warns).
    monkeypatch.setenv("HERALD_SECRET_KEY", SECRET)  # `tasks` reads this process's settings on import
    from pipeline.taskqueue import make_celery

    def broker(ca):
        app = make_celery(Settings.from_env(start_environment(REDIS_URL=tls_redis, REDIS_TLS_CA=ca.read_text())))
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            return connection.default_channel.client.ping()

    assert broker(certs["server"]["ca"]) is True
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        broker(certs["other"]["ca"])
