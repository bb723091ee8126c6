"""The archive read path (docs/guide.md: "The archive and its cache"): a message readable after its Redis status
expired, the Bloom filter, the single-flight lock, jittered and negative cache
entries, the bad cases; on real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid

import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import make_url

from devtools import embedded
from pipeline.archive import Archive, ArchiveReader, ArchiveUnavailable
from pipeline.archive import cache as cache_module
from pipeline.archive.bloom import Bloom, sizing
from pipeline.archive.cache import (
    ARCHIVE_QUERIES,
    CACHE_REQUESTS,
    SINGLEFLIGHT_WAITS,
    MessageCache,
    bloom_filter,
)
from pipeline.archive.migrations import current, upgrade
from pipeline.archive.tables import messages, metadata
from pipeline.core.messages import Envelope
from pipeline.core.settings import Settings
from pipeline.store.keys import Keys
from tests.harness import wait_until

# A PostgreSQL where the tests may create databases (.ci/run sets one up where none answers).
POSTGRES_ADMIN = os.environ.get("HERALD_TEST_DATABASE_URL", "postgresql://postgres@localhost:5432/test")


def _postgres_answers() -> str | None:
    engine = create_engine(POSTGRES_ADMIN)
    try:
        with engine.connect():
            return None
    except Exception as exc:  # any failure to reach it
        return f"no PostgreSQL answers at {POSTGRES_ADMIN} (HERALD_TEST_DATABASE_URL): {exc}"
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty archive database: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'archive.db'}"
        return
    reason = _postgres_answers()
    if reason:
        pytest.skip(reason)
    name = f"herald_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(POSTGRES_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def redis_url(spare_redis_url):
    """A Redis apart from the shared stack's; each test's keys have a prefix of their own."""
    return spare_redis_url


def _settings(redis_url, database_url, **extra) -> Settings:
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "HERALD_AUTH": "off", "HERALD_DEV": "1",
           "HERALD_REDIS_PREFIX": f"c{uuid.uuid4().hex[:8]}", "HERALD_BLOOM_CAPACITY": "100000",
           **{k: str(v) for k, v in extra.items()}}
    return Settings.from_env(env)


class Counting(ArchiveReader):
    """An ArchiveReader that counts its reads by id (threads of several 'processes' share it)."""

    def __init__(self, archive):
        super().__init__(archive)
        self.reads = 0
        self.delay = 0.0  # a read slow enough for others to pile up behind it, when set
        self._lock = threading.Lock()

    def get(self, msg_id):
        with self._lock:
            self.reads += 1
        time.sleep(self.delay)
        return super().get(msg_id)


@dataclasses.dataclass
class Rig:
    settings: Settings
    client: redis.Redis
    archive: Archive
    reader: Counting
    bloom: Bloom

    def cache(self, client=None) -> MessageCache:
        """A MessageCache as one web process has it."""
        client = client or self.client
        return MessageCache(self.settings, client, bloom_filter(self.settings, client), self.reader)


@pytest.fixture
def rig(redis_url, database_url):
    settings = _settings(redis_url, database_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    archive = Archive(database_url, bloom_filter(settings, client))
    archive.create_schema()
    rig = Rig(settings, client, archive, Counting(archive), bloom_filter(settings, client))
    rig.bloom.rebuild([])
    yield rig
    archive.dispose()
    client.close()


def _archive(rig, count=1, channel="chat:a") -> list[Envelope]:
    envelopes = [Envelope(f"m{uuid.uuid4().hex[:10]}", channel, "message", {"n": i}, "alice", 1_700_000_000_000 + i,
                          partition=0, offset=i) for i in range(count)]
    rig.archive.store(envelopes)
    return envelopes


def _count(metric, **labels) -> float:
    return (metric.labels(**labels) if labels else metric)._value.get()


def test_an_archived_message_is_read_once_from_the_archive_then_from_the_cache(rig):
    envelope, = _archive(rig)
    rig.archive.record_offsets([(envelope.id, "1700000000000-3")])
    cache = rig.cache()
    hits, queries = _count(CACHE_REQUESTS, result="hit"), _count(ARCHIVE_QUERIES)
    first = cache.get(envelope.id)
    assert first == {"id": envelope.id, "channel": "chat:a", "type": "message", "sender": "alice",
                     "status": "delivered", "error": None, "ts": envelope.ts, "attempts": 0, "partition": 0,
                     "offset": 0, "data": {"n": 0}, "stream_id": "1700000000000-3"}
    assert cache.get(envelope.id) == first
    assert rig.reader.reads == 1 and _count(ARCHIVE_QUERIES) == queries + 1
    assert _count(CACHE_REQUESTS, result="hit") == hits + 1


def test_ids_never_archived_are_turned_away_by_the_bloom_filter_without_a_query(rig):
    _archive(rig, 50)
    cache = rig.cache()
    rejects = _count(CACHE_REQUESTS, result="bloom_reject")
    answers = [cache.get(f"never-{i}") for i in range(500)]
    assert answers == [None] * 500
    # 0.1% false positives: a few at most reach the archive (as negative entries).
    assert rig.reader.reads <= 5
    assert _count(CACHE_REQUESTS, result="bloom_reject") >= rejects + 495


def test_an_absent_id_past_the_filter_is_cached_as_absent_for_the_negative_ttl(rig):
    rig.client.delete(rig.bloom.key)  # no filter built: every id is a "maybe"
    cache = rig.cache()
    negatives = _count(CACHE_REQUESTS, result="negative")
    assert cache.get("ghost-1") is None and cache.get("ghost-1") is None
    assert rig.reader.reads == 1
    assert _count(CACHE_REQUESTS, result="negative") == negatives + 1
    ttl = rig.client.ttl(Keys(rig.settings.redis_prefix).cached("ghost-1"))
    assert 55 <= ttl <= rig.settings.cache_negative_ttl


def test_entries_filled_together_expire_spread_over_the_jitter(rig):
    envelopes = _archive(rig, 200)
    cache = rig.cache()
    for envelope in envelopes:
        cache.get(envelope.id)
    keys = Keys(rig.settings.redis_prefix)
    ttls = [rig.client.pttl(keys.cached(e.id)) for e in envelopes]
    base = rig.settings.cache_ttl * 1000
    assert all(0.9 * base - 5000 <= ttl <= 1.1 * base for ttl in ttls)
    assert max(ttls) - min(ttls) > 0.1 * base  # not one moment for all


def test_a_cold_id_read_by_many_at_once_in_two_processes_queries_the_archive_once(rig):
    envelope, = _archive(rig)
    rig.reader.delay = 0.5  # every thread arrives while the one read is under way, even on a loaded machine
    caches = [rig.cache(redis.Redis.from_url(rig.settings.redis_url, decode_responses=True)) for _ in range(2)]
    waits = _count(SINGLEFLIGHT_WAITS)
    answers, start = [], threading.Barrier(60)

    def read(cache):
        start.wait()
        answers.append(cache.get(envelope.id))

    threads = [threading.Thread(target=read, args=(caches[i % 2],)) for i in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 60 and all(a and a["id"] == envelope.id for a in answers)
    assert rig.reader.reads == 1
    assert _count(SINGLEFLIGHT_WAITS) >= waits + 59


def test_a_hung_archive_read_holds_later_reads_of_its_id_no_longer_than_its_deadline(rig, monkeypatch):
    # The first read of an id never returns (a query the database never
    # answers). Past its flight's deadline (HERALD_CACHE_FILL_WAIT plus the
    # followers' grace, shortened here), the next read of the id reads on its
    # own instead of waiting for it, or failing, for ever.
    monkeypatch.setattr(cache_module, "FOLLOWER_GRACE", 0.4)
    settings = dataclasses.replace(rig.settings, cache_fill_wait=0.1)
    envelope, = _archive(rig)
    release = threading.Event()

    class Hanging(Counting):
        def get(self, msg_id):
            if self.reads == 0:
                self.reads += 1
                release.wait(30)
            return super().get(msg_id)

    cache = MessageCache(settings, rig.client, rig.bloom, Hanging(rig.archive))
    hung = []
    first = threading.Thread(target=lambda: hung.append(cache.get(envelope.id)))
    first.start()
    try:
        wait_until(lambda: cache.reader.reads == 1, 5, what="the first read to be under way")
        with pytest.raises(ArchiveUnavailable):  # within the deadline: it waits for that read, then gives up
            cache.get(envelope.id)
        time.sleep(0.6)  # past the flight's deadline (0.1 + 0.4 s from its start)
        assert cache.get(envelope.id)["id"] == envelope.id
    finally:
        release.set()
        first.join(10)
    assert hung and hung[0]["id"] == envelope.id
    assert cache._flights == {}


def test_a_database_that_is_down_is_unavailable_for_archive_reads_while_cached_reads_go_on(rig, database_url):
    cached, cold = _archive(rig, 2)
    rig.cache().get(cached.id)
    down = "sqlite:////nonexistent-dir/archive.db" if database_url.startswith("sqlite") \
        else "postgresql://postgres@127.0.0.1:1/test"
    cache = MessageCache(rig.settings, rig.client, rig.bloom, ArchiveReader(Archive(down)))
    assert cache.get(cached.id)["id"] == cached.id
    with pytest.raises(ArchiveUnavailable):
        cache.get(cold.id)
    with pytest.raises(ArchiveUnavailable):  # at once, from the marker the failed read left
        cache.get(cold.id)


def test_a_cache_redis_that_is_down_degrades_to_one_archive_read_per_process(rig):
    envelope, = _archive(rig)
    # Long enough that all 30 readers, released together, arrive while the one read
    # is under way, however loaded the machine (0.05 s saw a second read then).
    rig.reader.delay = 0.5
    dead = redis.Redis(host="127.0.0.1", port=embedded.free_port(), decode_responses=True,
                       socket_connect_timeout=0.5)
    cache = MessageCache(rig.settings, dead, Bloom(dead, Keys(rig.settings.redis_prefix), 1000, 0.01), rig.reader)
    answers, start = [], threading.Barrier(30)

    def read():
        start.wait()
        answers.append(cache.get(envelope.id))

    threads = [threading.Thread(target=read) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 30 and all(a["id"] == envelope.id for a in answers)
    assert rig.reader.reads == 1


def test_ids_archived_while_the_filter_is_rebuilt_are_in_the_rebuilt_filter(rig):
    before = _archive(rig, 20)
    late = []

    def ids():
        yield from ArchiveReader(rig.archive).ids()
        late.extend(_archive(rig, 5))  # archived after the rebuild read its ids

    assert rig.bloom.rebuild(ids()) == 20
    assert rig.bloom.built()
    assert all(rig.bloom.might_contain(e.id) for e in before + late)


def test_the_filter_is_sized_from_capacity_and_error_rate():
    assert sizing(10_000_000, 0.001) == (143775876, 10)


def test_history_offsets_order_numerically_and_pruning_goes_by_age(rig):
    envelopes = _archive(rig, 3, channel="chat:h")
    rig.archive.record_offsets([(envelopes[0].id, "999-5"), (envelopes[1].id, "1000-0"),
                                (envelopes[2].id, "1000-12")])
    reader = ArchiveReader(rig.archive)
    assert [m["offset"] for m in reader.after("chat:h", "999-5", 10)] == ["1000-0", "1000-12"]
    assert [m["id"] for m in reader.after("chat:h", "0-0", 2)] == [e.id for e in envelopes[:2]]
    assert reader.holds("chat:h", "999-5") and not reader.holds("chat:h", "999-4")
    assert rig.archive.prune(1, envelopes[1].ts + 1000) == 1  # the one older than 1 s before that moment
    assert not reader.holds("chat:h", "999-5")


def test_migrations_bring_an_archive_made_before_them_up_to_date(database_url):
    engine = create_engine(database_url)
    old = MetaData()
    table = Table("herald_messages", old, Column("id", String(128), primary_key=True),
                  Column("channel", String(200), nullable=False, index=True),
                  Column("type", String(64), nullable=False),
                  Column("data", Text, nullable=False), Column("sender", String(200), nullable=False),
                  Column("ts", BigInteger, nullable=False), Column("partition", Integer), Column("offset", BigInteger))
    old.create_all(engine)  # as Herald made it before migrations
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": "old-1", "channel": "c", "type": "message", "data": "1", "sender": "",
                                       "ts": 1}])
    upgrade(engine)
    upgrade(engine)  # a second release changes nothing
    assert current(engine) == "0002"
    with engine.connect() as conn:
        assert conn.execute(messages.select()).mappings().one()["stream_ms"] is None
    indexes = {index["name"] for index in inspect(engine).get_indexes("herald_messages")}
    assert {"ix_herald_messages_channel_stream", "ix_herald_messages_ts"} <= indexes
    engine.dispose()


def test_migrations_make_the_whole_schema_on_an_empty_database(database_url):
    engine = create_engine(database_url)
    upgrade(engine)
    columns = {column["name"] for column in inspect(engine).get_columns("herald_messages")}
    assert columns == {column.name for column in messages.columns}
    # The table the queries use is the one the migrations make: columns, types, indexes.
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


@pytest.mark.parametrize("since, later", [("9850190127006006806-9608", False), ("28-9340518410694389148", True),
                                          ("18446744073709551615-18446744073709551615", False)])
def test_offsets_past_the_columns_integers_order_as_they_would(rig, since, later):
    # Redis takes stream id parts up to 2**64 - 1, the columns are signed 64-bit:
    # SQLite refuses such a value.
    envelope, = _archive(rig, channel="chat:far")
    rig.archive.record_offsets([(envelope.id, "1700000000000-3")])
    assert [m["id"] for m in rig.reader.after("chat:far", since, 10)] == ([envelope.id] if later else [])
    assert rig.reader.holds("chat:far", since) is not later
