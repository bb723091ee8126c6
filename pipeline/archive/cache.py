"""Reads of the SQL archive behind a Redis cache (docs/guide.md: "The archive and its cache").

A message whose Redis status expired is read here: its cache entry, then the
Bloom filter of archived ids ("no" is an answer without a database query:
cache penetration), then one read of the archive per id at a time (a
single-flight lock, in the process and across processes through `SET NX PX`:
cache stampede), which fills the cache for those waiting. Entries live
HERALD_CACHE_TTL plus or minus HERALD_CACHE_TTL_JITTER, so entries filled
together do not expire together (cache avalanche); ids the archive does not
have are cached as absent for HERALD_CACHE_NEGATIVE_TTL.
"""

from __future__ import annotations

import enum
import json
import random
import threading
import time
import uuid
from typing import Final

import redis
from prometheus_client import Counter

from pipeline.archive import ArchiveUnavailable
from pipeline.archive.bloom import Bloom
from pipeline.store.client import connect
from pipeline.store.keys import Keys
from pipeline.store.locks import release_owned
from pipeline.store.scripts import Runner
from pipeline.store.statuses import message_from

ARCHIVE_QUERIES = Counter("herald_archive_queries_total", "Reads of the SQL archive (messages by id and history)")
CACHE_REQUESTS = Counter("herald_cache_requests_total",
                         "Message reads past the Redis status, by how the cache answered", ["result"])
SINGLEFLIGHT_WAITS = Counter("herald_singleflight_waits_total",
                             "Message reads that waited for another's archive read instead of querying")
for _result in ("hit", "miss", "negative", "bloom_reject"):
    CACHE_REQUESTS.labels(_result)


class _Unread(enum.Enum):
    """The type of `_UNREAD`, a sentinel mypy can tell from a cache entry."""

    UNREAD = enum.auto()


ABSENT = "-"  # a negative entry: the archive does not have the id
DOWN = "!"  # the archive did not answer a moment ago: waiters answer 503 at once
DOWN_TTL_MS = 1000
_UNREAD: Final = _Unread.UNREAD  # `get` was not handed the cache entry: it reads it
# Beyond HERALD_CACHE_FILL_WAIT, how long requests of this process wait for the
# one read they share: that read's Redis and database calls fail within
# their own connect and socket timeouts.
FOLLOWER_GRACE = 30.0

def cache_client(settings, pool_size: int = 4):
    """A client of the cache's Redis (HERALD_CACHE_URL, else the main Redis)."""
    return connect(settings, pool_size, url=settings.cache_url)


def bloom_filter(settings, client=None) -> Bloom:
    """The Bloom filter of archived ids, on the cache's Redis."""
    client = client if client is not None else cache_client(settings)
    keys = Keys(settings.redis_prefix, isinstance(client, redis.RedisCluster))
    return Bloom(client, keys, settings.bloom_capacity, settings.bloom_error_rate)


class _Flight:
    """One archive read in this process, and those waiting for it until `deadline`
    (time.monotonic()): past it the read is taken for hung, and the next read of
    the id starts a flight of its own."""

    def __init__(self, deadline: float):
        self.done = threading.Event()
        self.deadline = deadline
        self.result: dict | None = None
        self.error: BaseException | None = None


class MessageCache:
    """Archived messages by id, through the cache; one web process's instance."""

    def __init__(self, settings, client, bloom: Bloom, reader):
        self.settings = settings
        self.redis = client
        self.bloom = bloom
        self.reader = reader
        self.keys = Keys(settings.redis_prefix, isinstance(client, redis.RedisCluster))
        self._runner = Runner(client)
        self._flights: dict[str, _Flight] = {}
        self._guard = threading.Lock()

    def ttl_ms(self) -> int:
        """A positive entry's lifetime: HERALD_CACHE_TTL, jittered."""
        jitter = self.settings.cache_ttl_jitter
        return max(1, int(self.settings.cache_ttl * 1000 * random.uniform(1 - jitter, 1 + jitter)))

    def read(self, store, msg_id: str) -> dict | None:
        """A message by id: its status in the main Redis while it lasts
        (HERALD_STATUS_TTL), else the archive through the cache (`get`).

        When the cache is on the main Redis, the status and the cache entry
        are read in one round trip. Raises redis errors of the main Redis.
        """
        if self.redis is not store.redis or store.cluster:
            return store.get_message(msg_id) or self.get(msg_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(store.keys.message(msg_id))
        pipe.get(self.keys.cached(msg_id))
        status, cached = pipe.execute()
        return message_from(msg_id, status) or self.get(msg_id, cached)

    def get(self, msg_id: str, cached: str | None | _Unread = _UNREAD) -> dict | None:
        """The archived message, or None when the archive does not have it;
        `cached` is its cache entry when the caller read it already.

        Raises ArchiveUnavailable when the archive had to be read and did not
        answer. A cache Redis that does not answer is skipped: the read goes
        to the archive, still one at a time per id in this process.
        """
        try:
            raw = self.redis.get(self.keys.cached(msg_id)) if cached is _UNREAD else cached
        except redis.RedisError:
            CACHE_REQUESTS.labels("miss").inc()
            return self._fill(msg_id)
        if raw is not None and raw != DOWN:
            CACHE_REQUESTS.labels("negative" if raw == ABSENT else "hit").inc()
            return _decode(raw)
        if raw == DOWN:
            raise ArchiveUnavailable("the archive did not answer a moment ago")
        try:
            maybe = self.bloom.might_contain(msg_id)
        except redis.RedisError:
            maybe = True
        if not maybe:
            CACHE_REQUESTS.labels("bloom_reject").inc()
            return None
        CACHE_REQUESTS.labels("miss").inc()
        return self._fill(msg_id)

    def _fill(self, msg_id: str) -> dict | None:
        # In-process single flight first: requests of this process share one
        # read even when the cache's Redis (and so the lock) is down.
        now = time.monotonic()
        with self._guard:
            flight = self._flights.get(msg_id)
            leading = flight is None or flight.deadline <= now
            if leading:
                flight = self._flights[msg_id] = _Flight(now + self.settings.cache_fill_wait + FOLLOWER_GRACE)
        assert flight is not None  # another's, or made just now
        if not leading:
            SINGLEFLIGHT_WAITS.inc()
            if not flight.done.wait(max(0.0, flight.deadline - now)):
                raise ArchiveUnavailable("the archive read of this message is taking too long")
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            flight.result = self._fill_across(msg_id)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            flight.done.set()
            with self._guard:
                if self._flights.get(msg_id) is flight:  # a hung read replaced meanwhile is not ours to drop
                    del self._flights[msg_id]

    def _fill_across(self, msg_id: str) -> dict | None:
        # One reader per id across processes: the lock's holder reads the
        # archive and fills the cache; the others poll the cache entry. A
        # holder that died lets its lock lapse after HERALD_CACHE_FILL_WAIT.
        lock, key = self.keys.fill_lock(msg_id), self.keys.cached(msg_id)
        token = uuid.uuid4().hex
        wait_ms = int(self.settings.cache_fill_wait * 1000)
        deadline = time.monotonic() + self.settings.cache_fill_wait
        delay, waited = 0.002, False
        while True:
            try:
                locked = self.redis.set(lock, token, nx=True, px=wait_ms)
            except redis.RedisError:
                return self._read(msg_id, key, fill=False)  # the in-process flight is the only guard left
            if locked:
                try:
                    raw = self.redis.get(key)  # filled between our miss and our lock
                    if raw is not None:
                        return _decode(raw)
                    return self._read(msg_id, key)
                finally:
                    self._release(lock, token)
            if not waited:
                SINGLEFLIGHT_WAITS.inc()
                waited = True
            if time.monotonic() >= deadline:
                raise ArchiveUnavailable("the archive read of this message is taking too long")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                raw = self.redis.get(key)
            except redis.RedisError:
                continue
            if raw is not None:
                return _decode(raw)

    def _read(self, msg_id: str, key: str, fill: bool = True) -> dict | None:
        ARCHIVE_QUERIES.inc()
        try:
            message = self.reader.get(msg_id)
        except ArchiveUnavailable:
            if not fill:
                raise
            try:
                self.redis.set(key, DOWN, nx=True, px=DOWN_TTL_MS)
            except redis.RedisError:
                pass
            raise
        if not fill:
            return message
        try:
            if message is None:
                self.redis.set(key, ABSENT, ex=self.settings.cache_negative_ttl)
            else:
                self.redis.set(key, json.dumps(message, separators=(",", ":"), ensure_ascii=False),
                               px=self.ttl_ms())
        except redis.RedisError:
            pass  # answered all the same; the next read tries again
        return message

    def _release(self, lock: str, token: str) -> None:
        try:
            release_owned(self._runner, lock, token)  # only the owner lets go
        except redis.RedisError:
            pass  # it lapses


def _decode(raw: str) -> dict | None:
    if raw == ABSENT:
        return None
    if raw == DOWN:
        raise ArchiveUnavailable("the archive did not answer a moment ago")
    return json.loads(raw)
