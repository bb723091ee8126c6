"""The connections one web process holds: Redis, the Kafka producer and the hub.

Made lazily so the app can be built before a fork; `start()` connects them
in the worker process (gunicorn's post_worker_init).
"""

from __future__ import annotations

import functools
import logging
import threading

import redis

from pipeline.archive import Archive, ArchiveReader

# Imported here, not at first use: its metrics are on /metrics from the start.
from pipeline.archive.cache import MessageCache, bloom_filter, cache_client
from pipeline.archive.history import history
from pipeline.archive.prune import prune_periodically
from pipeline.dlq import DeadLetters
from pipeline.ingest import Ingest
from pipeline.kafka import Publisher
from pipeline.store import Store, connect
from pipeline.webhooks import Outbox
from web.authorize import Permissions
from web.probe import CachedProbe
from web.revocations import Revocations

log = logging.getLogger("herald.web")


class Services:
    """Per-process collaborators of the web app."""

    def __init__(self, settings):
        self.settings = settings
        self.hub = None  # set by web.hub.init_app
        self._stopping = threading.Lock()
        self._stopped = False
        self._pruner_stop = threading.Event()

    @functools.cached_property
    def store(self) -> Store:
        """Redis access under the configured prefix."""
        return Store(connect(self.settings, self.settings.redis_pool_size), self.settings)

    @functools.cached_property
    def archive_writer(self) -> Archive:
        """The SQL archive (DATABASE_URL); the web only prunes it."""
        return Archive(self.settings.database_url)

    @functools.cached_property
    def archive(self) -> ArchiveReader:
        """Reads of the SQL archive."""
        return ArchiveReader(self.archive_writer)

    @functools.cached_property
    def cache(self):
        """Archived messages through the cache (HERALD_CACHE_URL, else the main Redis)."""
        client = cache_client(self.settings, self.settings.redis_pool_size) if self.settings.cache_url \
            else self.store.redis
        return MessageCache(self.settings, client, bloom_filter(self.settings, client), self.archive)

    def history(self, channel: str, since: str | None, limit: int) -> dict:
        """A channel's history after `since`, from Redis and then the archive (pipeline/archive/history.py)."""
        return history(self.store, self.archive, channel, since, limit)

    @functools.cached_property
    def publisher(self) -> Publisher:
        """This process's Kafka producer."""
        return Publisher(self.settings, client_id=f"herald-web-{self.settings.node_id}")

    @functools.cached_property
    def ingest(self) -> Ingest:
        """The publish path shared by HTTP and WebSocket."""
        return Ingest(self.settings, self.store, self.publisher)

    @functools.cached_property
    def permissions(self) -> Permissions:
        """Who may subscribe and publish where: token globs, then HERALD_AUTHORIZE_URL."""
        return Permissions(self.settings)

    @functools.cached_property
    def revocations(self) -> Revocations:
        """This process's copy of the token revocations (web/revocations.py)."""
        return Revocations(self)

    @functools.cached_property
    def outbox(self) -> Outbox:
        """Webhook events this process appends (docs/webhooks.md)."""
        return Outbox(self.store, self.settings)

    @functools.cached_property
    def dead_letters(self) -> DeadLetters:
        """Listing and replay of dead letters."""
        return DeadLetters(self.publisher, self.store, self.settings)

    def start(self) -> None:
        """Connect everything now, so the first request pays for nothing.

        The topics were checked by gunicorn's on_starting; the release phase made them.
        """
        self.publisher.warm_up()
        self.store.redis.ping()
        if not (self.settings.metrics_token or self.settings.metrics_public or self.settings.dev):
            log.warning("HERALD_METRICS_TOKEN is not set: /metrics refuses every scrape (docs/operations.md: Metrics)")
        if self.settings.rules_file:
            from pipeline.rules.repository import RulesStore

            # A bad file stops the process (RulesError): better than running without the policy.
            RulesStore(self.store, self.settings).load_file()
        if self.hub is not None:
            self.hub.start()
        if self.settings.archive_max_age:
            threading.Thread(target=prune_periodically, name="archive-pruner", daemon=True,
                             args=(self.settings, self.store, self.archive_writer, self._pruner_stop, log)).start()

    def stop(self) -> None:
        """Close WebSockets with 1001, then deliver what the producer still holds.

        Called when gunicorn flips the worker's `alive` and again at the
        worker's exit: a second call waits for the first to finish.
        """
        with self._stopping:
            if self._stopped:
                return
            self._stopped = True
            self._pruner_stop.set()
            if self.hub is not None:
                self.hub.shutdown()
            if "publisher" in self.__dict__:
                left = self.publisher.close(10)
                if left:
                    log.error("records not delivered at shutdown", extra={"count": left})

    @functools.cached_property
    def readiness(self) -> CachedProbe[list[str]]:
        """`down()`'s answer, kept HERALD_PROBE_TTL seconds (web/probe.py): /readyz reads this.
        "Down" is kept a second at most, so a process is ready again soon after its services are."""
        ttl = self.settings.probe_ttl
        return CachedProbe("ready", self.down, lambda down: min(ttl, 1.0) if down else ttl)

    def down(self) -> list[str]:
        """Names of the services that do not answer now (a probe; /readyz reads `readiness`)."""
        down = []
        try:
            self.store.redis.ping()
        except redis.RedisError:
            down.append("redis")
        if not self.publisher.reachable():
            down.append("kafka")
        return down
