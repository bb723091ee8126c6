"""The release phase (`flask --app app release`) makes the topics and the archive schema;
web and bridge only check for the topics, and say in one line what to run when they are missing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from devtools import embedded
from tests.harness import ROOT, SECRET


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    """A Tansu of this module's own: no other test's topics."""
    server = embedded.kafka_server(embedded.free_port(), str(tmp_path_factory.mktemp("kafka") / "tansu.log")).start()
    yield f"127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def env(kafka, tmp_path, spare_redis_url):
    return {"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "HERALD_SECRET_KEY": SECRET,
            "KAFKA_BOOTSTRAP_SERVERS": kafka, "HERALD_TOPIC": f"release.{uuid.uuid4().hex[:8]}",
            "HERALD_TOPIC_PARTITIONS": "3", "DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
            "REDIS_URL": spare_redis_url}


def _run(argv, env):
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


RELEASE = [sys.executable, "-m", "flask", "--app", "app", "release"]


def _partitions(kafka, topic):
    topics = AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=10).topics
    return len(topics[topic].partitions) if topic in topics else None


def test_release_creates_topics_and_schema_then_finds_them(kafka, env, tmp_path):
    result, _ = _run(RELEASE, env)
    assert result.returncode == 0, result.stderr
    topic = env["HERALD_TOPIC"]
    assert f"topic {topic}: created (3 partitions, replication 1, min.insync.replicas 1)" in result.stdout
    assert f"topic {topic}.dlq: created (3 partitions" in result.stdout
    assert _partitions(kafka, topic) == 3 and _partitions(kafka, f"{topic}.dlq") == 3
    with sqlite3.connect(tmp_path / "archive.db") as db:
        assert db.execute("select name from sqlite_master where name = 'herald_messages'").fetchone()
    again, _ = _run(RELEASE, env)
    assert again.returncode == 0, again.stderr
    assert f"topic {topic}: exists (3 partitions, 1 replicas)" in again.stdout


def test_a_topic_with_fewer_partitions_is_one_line_and_left_alone(kafka, env):
    topic = env["HERALD_TOPIC"]
    admin = AdminClient({"bootstrap.servers": kafka})
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result(10)
    result, _ = _run(RELEASE, env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"topic {topic} has 2 partitions, fewer than HERALD_TOPIC_PARTITIONS=3" in lines[0]
    assert _partitions(kafka, topic) == 2


def test_more_replicas_than_brokers_is_one_line(env):
    result, _ = _run(RELEASE, {**env, "HERALD_TOPIC_REPLICATION": "3"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "HERALD_TOPIC_REPLICATION=3 but the cluster has 1 broker(s)" in lines[0]


def test_bridge_without_topics_names_the_release_command(kafka, env):
    result, took = _run([sys.executable, "-m", "pipeline.bridge"], env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"Kafka has no topic {env['HERALD_TOPIC']}" in lines[0] and "`flask --app app release`" in lines[0]
    assert took < 10, took
    assert _partitions(kafka, env["HERALD_TOPIC"]) is None  # and it made none


def test_web_without_topics_names_the_release_command(kafka, env):
    result, took = _run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                        {**env, "PORT": str(embedded.free_port())})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("herald web: cannot start: Kafka has no topic") and "flask --app app release" in lines[0]
    assert took < 10, took
    assert _partitions(kafka, env["HERALD_TOPIC"]) is None
