"""Pruning the archive by age (HERALD_ARCHIVE_MAX_AGE), from the web processes."""

from __future__ import annotations

import random
import threading
import time

import redis

from pipeline.core.errors import TransientError


def prune_periodically(settings, store, archive, stop: threading.Event, log) -> None:
    """Every HERALD_ARCHIVE_PRUNE_INTERVAL, one web process (a lock in Redis) deletes
    messages older than HERALD_ARCHIVE_MAX_AGE from `archive` (an Archive); runs until
    `stop` is set."""
    interval = settings.archive_prune_interval
    while not stop.wait(random.uniform(0.5, 1.0) * interval):
        try:
            if not store.redis.set(store.keys.archive_pruner, settings.node_id, nx=True, ex=interval):
                continue
            removed = archive.prune(settings.archive_max_age, int(time.time() * 1000))
            log.info("archive pruned", extra={"count": removed})
        except (redis.RedisError, TransientError) as exc:
            log.warning("archive not pruned", extra={"error": str(exc)})
