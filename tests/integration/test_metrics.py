"""Metrics from every process (docs/operations.md: "Metrics"): real processes, real Prometheus text parses."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from devtools import embedded
from tests.harness import (
    AMQP_URL,
    ROOT,
    Stack,
    refused_start,
    start_environment,
    topic_size,
    wait_until,
)

TOKEN = "metrics-scrape-token"
MESSAGES = 20


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A stack whose every /metrics needs TOKEN: a worker and a bridge serving theirs on ports,
    and a web process of two gunicorn workers."""
    # Workers dead-letter any type but "message": a way to make a dead letter on purpose.
    # HERALD_PROBE_TTL=0: each scrape reads the cluster gauges afresh (one probe at a time still),
    # so a test sees a change at its next scrape (tests/integration/test_ops_guards.py tests the TTL).
    stack = Stack(tmp_path_factory.mktemp("metrics"), HERALD_METRICS_TOKEN=TOKEN, HERALD_MESSAGE_TYPES="message",
                  HERALD_PROBE_TTL=0)
    try:
        stack.worker_port, stack.bridge_port = embedded.free_port(), embedded.free_port()
        stack.worker(HERALD_METRICS_PORT=stack.worker_port)
        stack.bridge(HERALD_METRICS_PORT=stack.bridge_port)
        stack.web_proc = stack.web(WEB_CONCURRENCY=2)
        yield stack
    finally:
        stack.stop()


def get(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    """(status, body) of a GET, with the bearer token when given."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, parsed as Prometheus parses it: {(name, labels): value}."""
    status, text = get(url)
    assert status == 200, text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def urls(system) -> dict[str, str]:
    return {"web": f"{system.web_proc.base}/metrics", "bridge": f"http://127.0.0.1:{system.bridge_port}/metrics",
            "worker": f"http://127.0.0.1:{system.worker_port}/metrics"}


def publish(system, channel: str, count: int) -> list[str]:
    """Publish `count` messages over HTTP and wait until each is delivered; returns their ids."""
    web, token = system.web_proc, system.token()
    ids = []
    for n in range(count):
        status, _headers, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": n},
                                              token=token)
        assert status == 202, body
        ids.append(body["id"])
    for msg_id in ids:
        wait_until(lambda msg_id=msg_id: web.request("GET", f"/api/v1/messages/{msg_id}", token=token)[2].get("status")
                   == "delivered", 30, what=f"{msg_id} delivered")
    return ids


def test_bridge_and_worker_metrics_listen_on_loopback_only_by_default(system):
    # HERALD_METRICS_BIND is unset: 127.0.0.1 answers, another address of this machine
    # (127.0.0.2 is routed to it too) finds nothing listening.
    for port in (system.worker_port, system.bridge_port):
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_every_metrics_endpoint_refuses_a_scrape_without_the_token(system):
    for name, url in urls(system).items():
        assert get(url, token=None)[0] == 401, name
        assert get(url, token="not-" + TOKEN)[0] == 401, name
        status, text = get(url)
        assert status == 200, name
        assert list(text_string_to_metric_families(text)), name  # a real Prometheus text parse


def test_web_counts_are_merged_across_its_gunicorn_workers(system):
    before = scrape(urls(system)["web"])
    publish(system, f"metrics:{uuid.uuid4().hex[:8]}", MESSAGES)
    # Each scrape lands on either worker; each must show the whole process's count.
    seen = set()
    for _ in range(10):
        after = scrape(urls(system)["web"])
        seen.add(value(after, "herald_publishes_total", result="accepted")
                 - value(before, "herald_publishes_total", result="accepted"))
        assert value(after, "herald_produce_seconds_count") - value(before, "herald_produce_seconds_count") \
            >= MESSAGES
    assert seen == {MESSAGES}
    route = {"method": "POST", "route": "/api/v1/messages"}
    assert value(after, "herald_http_request_duration_seconds_count", **route) \
        - value(before, "herald_http_request_duration_seconds_count", **route) == MESSAGES
    assert not any(name.startswith("herald_http_request_seconds") for name, _labels in after)


def test_an_idempotent_retry_counts_as_a_duplicate(system):
    web, token = system.web_proc, system.token()
    before = scrape(urls(system)["web"])
    body = {"channel": f"metrics:{uuid.uuid4().hex[:8]}", "data": 1}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    for _ in range(2):
        assert web.request("POST", "/api/v1/messages", body, token=token, headers=key)[0] == 202
    after = scrape(urls(system)["web"])
    assert value(after, "herald_publishes_total", result="duplicate") \
        - value(before, "herald_publishes_total", result="duplicate") == 1


def test_websocket_connections_and_frames_sent(system):
    web, token = system.web_proc, system.token()
    channel = f"metrics:{uuid.uuid4().hex[:8]}"
    before = scrape(urls(system)["web"])
    clients = [web.ws(token) for _ in range(4)]
    for client in clients:
        client.recv()
        client.subscribe(channel)
    # A gauge summed over the live workers, whichever of them holds each connection.
    assert value(scrape(urls(system)["web"]), "herald_ws_connections") \
        == value(before, "herald_ws_connections") + 4
    publish(system, channel, 3)
    for client in clients:
        for _ in range(3):
            client.expect(lambda f: f["op"] == "message")
    after = scrape(urls(system)["web"])
    assert value(after, "herald_ws_frames_sent_total") - value(before, "herald_ws_frames_sent_total") >= 12
    for client in clients:
        client.close()
    wait_until(lambda: value(scrape(urls(system)["web"]), "herald_ws_connections")
               == value(before, "herald_ws_connections"), 10, what="the connections gauge to go down")


def test_bridge_and_worker_serve_their_counts_and_they_move(system):
    bridge, worker = urls(system)["bridge"], urls(system)["worker"]
    before = {"bridge": scrape(bridge), "worker": scrape(worker)}
    publish(system, f"metrics:{uuid.uuid4().hex[:8]}", MESSAGES)
    after_bridge = scrape(bridge)
    assert value(after_bridge, "herald_bridge_records_consumed_total") \
        - value(before["bridge"], "herald_bridge_records_consumed_total") >= MESSAGES
    assert value(after_bridge, "herald_bridge_dispatch_batches_total") \
        > value(before["bridge"], "herald_bridge_dispatch_batches_total")
    # Lag per partition it consumed from (one channel: one partition), caught up by now.
    def lags():
        return {dict(labels)["partition"]: v for (name, labels), v in scrape(bridge).items()
                if name == "herald_bridge_consumer_lag"}

    seen = wait_until(lambda: (lambda found: found if found and not any(found.values()) else None)(lags()),
                      10, what="the bridge's lag gauge at 0")
    assert set(seen) <= {"0", "1", "2", "3"}
    # The worker's pool processes' counts, merged by its main process.
    after_worker = scrape(worker)
    assert value(after_worker, "herald_worker_messages_total", outcome="delivered") \
        - value(before["worker"], "herald_worker_messages_total", outcome="delivered") == MESSAGES
    assert value(after_worker, "herald_delivery_latency_seconds_count") \
        - value(before["worker"], "herald_delivery_latency_seconds_count") == MESSAGES
    latency = value(after_worker, "herald_delivery_latency_seconds_sum") \
        - value(before["worker"], "herald_delivery_latency_seconds_sum")
    assert 0 < latency < 30 * MESSAGES
    for name in ("herald_forced_out_of_order_total", "herald_worker_retries_total", "herald_dead_letters_total",
                 "herald_worker_parked_total"):
        assert (name, ()) in after_worker, name


def test_a_message_the_worker_dead_letters_is_counted_by_it_and_in_the_dlq_size(system):
    web, token = system.web_proc, system.token()
    worker_url = urls(system)["worker"]
    before = {"worker": scrape(worker_url), "web": scrape(urls(system)["web"])}
    status, _headers, body = web.request("POST", "/api/v1/messages", {"channel": f"metrics:{uuid.uuid4().hex[:8]}",
                                                                      "type": "unknown", "data": 1}, token=token)
    assert status == 202, body
    wait_until(lambda: web.request("GET", f"/api/v1/messages/{body['id']}", token=token)[2].get("status")
               == "failed", 30, what="the message to be dead-lettered")
    after = scrape(worker_url)
    assert value(after, "herald_dead_letters_total") - value(before["worker"], "herald_dead_letters_total") == 1
    assert value(after, "herald_worker_messages_total", outcome="dead") \
        - value(before["worker"], "herald_worker_messages_total", outcome="dead") == 1
    assert value(scrape(urls(system)["web"]), "herald_dlq_size") == value(before["web"], "herald_dlq_size") + 1


def test_cluster_gauges_on_web(system):
    web_url = urls(system)["web"]
    before = scrape(web_url)
    for source in ("kafka", "redis", "celery"):
        assert value(before, "herald_cluster_source_up", source=source) == 1, source
    assert value(before, "herald_web_nodes") == 2  # its two gunicorn workers are two hub nodes
    assert ("herald_celery_queue_depth", ()) in before
    assert value(before, "herald_in_flight_messages") >= 0
    # A record no one can decode: the bridge dead-letters it.
    producer = Producer({"bootstrap.servers": system.bootstrap})
    producer.produce(system.settings.topic, key=b"k", value=b"not json")
    assert producer.flush(10) == 0
    dlq = wait_until(lambda: (lambda s: s if value(s, "herald_dlq_size") == value(before, "herald_dlq_size") + 1
                              else None)(scrape(web_url)), 30, what="the DLQ size to grow")
    assert value(dlq, "herald_cluster_source_up", source="redis") == 1
    assert value(scrape(urls(system)["bridge"]), "herald_dead_letters_total") >= 1
    # The group's committed offsets catch up with the high watermarks (commits every second).
    publish(system, f"metrics:{uuid.uuid4().hex[:8]}", 4)

    def caught_up():
        samples = scrape(web_url)
        lags = {dict(labels)["partition"]: v for (name, labels), v in samples.items()
                if name == "herald_consumer_group_lag"}
        return lags if set(lags) == {"0", "1", "2", "3"} and not any(lags.values()) else None

    wait_until(caught_up, 30, 0.5, "the consumer group's lag to be 0 on every partition")


def test_consumer_lag_counts_records_not_consumed_yet(system):
    # With the bridge stopped, what is produced meanwhile is lag: the records the
    # topic grew by (its high watermarks), the group having committed all before.
    web_url = urls(system)["web"]

    def lag():
        return sum(v for (name, _labels), v in scrape(web_url).items() if name == "herald_consumer_group_lag")

    wait_until(lambda: lag() == 0, 30, 0.5, "no lag to start with")
    bridge = next(proc for proc in system.procs if proc.name == "bridge")
    bridge.stop()
    try:
        size = topic_size(system)
        producer = Producer({"bootstrap.servers": system.bootstrap})
        for n in range(6):
            producer.produce(system.settings.topic, key=f"k{n}".encode(), value=b"not json either")
            assert producer.flush(10) == 0
        grown = topic_size(system) - size
        assert grown > 0
        wait_until(lambda: lag() == grown, 10, what=f"a lag of the {grown} records produced")
    finally:
        bridge.start()
        bridge.wait_for_log("partitions assigned", 60)
    wait_until(lambda: lag() == 0, 30, 0.5, "the lag to be consumed")


SILENT_SCRAPE = """
import json, sys
from gevent import monkey
monkey.patch_all()  # as gunicorn's gevent workers run it
from pipeline.core.settings import Settings
from web.metrics import ClusterCollector
from web.services import Services

address = sys.argv[1]
settings = Settings.from_env({"HERALD_AUTH": "off", "HERALD_DEV": "1", "REDIS_URL": f"redis://{address}/0",
                              "KAFKA_BOOTSTRAP_SERVERS": address})
families = list(ClusterCollector(Services(settings)).collect())
print(json.dumps({"names": [f.name for f in families],
                  "up": {s.labels["source"]: s.value for f in families for s in f.samples
                         if s.name == "herald_cluster_source_up"}}))
"""


def test_a_scrape_with_every_source_silent_still_answers_and_says_which_failed():
    # A listener that accepts and never answers stands for Kafka, Redis and the
    # broker: each source is given up at the budget and reported down.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        result = subprocess.run([sys.executable, "-c", SILENT_SCRAPE, f"127.0.0.1:{silent.getsockname()[1]}"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        silent.close()
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"names": ["herald_cluster_source_up"], "up": {"kafka": 0, "redis": 0, "celery": 0}}


def test_a_worker_whose_metrics_port_is_taken_refuses_to_start_in_one_line(spare_redis_url):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen(1)
    try:
        line = refused_start(start_environment(REDIS_URL=spare_redis_url,
                                               HERALD_METRICS_PORT=str(taken.getsockname()[1])), "worker")
    finally:
        taken.close()
    assert "HERALD_METRICS_PORT" in line and "in use" in line, line


def test_celery_queue_depth_with_rabbitmq_is_read_by_a_passive_declare(tmp_path):
    stack = Stack(tmp_path / "amqp", broker="amqp", HERALD_METRICS_TOKEN=TOKEN)
    try:
        stack.worker()  # declares the queue
        web = stack.web()
        samples = scrape(f"{web.base}/metrics")
        assert value(samples, "herald_cluster_source_up", source="celery") == 1
        assert ("herald_celery_queue_depth", ()) in samples
    finally:
        stack.stop()


AMQP_SCRAPES = """
import json, sys
from gevent import monkey
monkey.patch_all()  # as gunicorn's gevent workers run it
import kombu
from pipeline.core.settings import Settings
from web.metrics import ClusterCollector
from web.services import Services

opened = []
establish = kombu.Connection._establish_connection  # each AMQP handshake goes through it
kombu.Connection._establish_connection = lambda self: (opened.append(1), establish(self))[1]
settings = Settings.from_env({"HERALD_SECRET_KEY": "s" * 32, "HERALD_PROBE_TTL": "0",
                              "REDIS_URL": sys.argv[1], "CELERY_BROKER_URL": sys.argv[2],
                              "HERALD_REDIS_PREFIX": sys.argv[3], "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
collector = ClusterCollector(Services(settings))
up = []
for _ in range(5):
    up.append({s.labels["source"]: s.value for f in collector.collect() for s in f.samples
               if s.name == "herald_cluster_source_up"}["celery"])
print(json.dumps({"up": up, "connections": collector._amqp.connection is not None, "opened": len(opened)}))
"""


def test_queue_depth_probes_share_one_rabbitmq_connection(spare_redis_url):
    # Five probes (no cache: HERALD_PROBE_TTL=0), one AMQP connection, not one per scrape.
    import kombu

    prefix = f"amqp{uuid.uuid4().hex[:8]}"
    with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
        connection.default_channel.queue_declare(f"{prefix}.tasks", durable=False, auto_delete=False)
    try:
        result = subprocess.run([sys.executable, "-c", AMQP_SCRAPES, spare_redis_url, AMQP_URL, prefix],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
            connection.default_channel.queue_delete(f"{prefix}.tasks")
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"up": [1] * 5, "connections": True, "opened": 1}, answer
