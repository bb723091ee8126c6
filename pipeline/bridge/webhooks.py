"""Who starts webhook delivery: the bridge, every CHECK_INTERVAL (docs/webhooks.md).

For each receiver whose cursor is behind the event stream's last entry and
whose lease is free, the bridge takes the lease and sends a delivery task
with its token; the task holds it from there (tasks/webhooks.py). Several
bridges may look at once: the lease (SET NX) lets one task a receiver run.
One round trip a look while nothing is due.
"""

from __future__ import annotations

import logging
import time
import uuid

from pipeline.core.metrics import WEBHOOK_LAG
from pipeline.store.webhooks import START
from pipeline.taskqueue import WEBHOOK_TASK_NAME
from pipeline.webhooks.delivery import lease_seconds, position

log = logging.getLogger("herald.bridge")
CHECK_INTERVAL = 0.2  # seconds between looks: how soon an event starts on its way
QUEUE_WAIT = 30.0  # seconds a new task may wait in its queue before its lease lapses and another is sent


class WebhookStarter:
    """Starts a delivery task for each receiver with events waiting and no task running."""

    def __init__(self, settings, store, celery_app):
        self.settings = settings
        self.store = store
        self.celery = celery_app
        self.receivers = settings.webhooks
        # No receiver, no look at all.
        self.next_check = time.monotonic() if self.receivers else float("inf")

    def check(self) -> None:
        """Look once; a Redis or broker failure skips this look (logged), the next tries again."""
        self.next_check = time.monotonic() + CHECK_INTERVAL
        try:
            for receiver in self._due():
                self._start(receiver)
        except Exception as exc:
            log.warning("webhook look skipped", extra={"error": str(exc)})

    def _due(self) -> list:
        keys = self.store.keys
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.xrevrange(keys.events, "+", "-", count=1)
        pipe.mget([keys.webhook_cursor(r.name) for r in self.receivers])
        pipe.mget([keys.webhook_lease(r.name) for r in self.receivers])
        newest, cursors, leases = pipe.execute()
        if not newest:
            return []
        last = position(newest[0][0])
        due = []
        for receiver, cursor, lease in zip(self.receivers, cursors, leases):
            at = position(cursor or START)
            WEBHOOK_LAG.labels(receiver.name).set(max(0, last[0] - at[0]) / 1000 if cursor else 0)
            if at < last and lease is None:
                due.append(receiver)
        return due

    def _start(self, receiver) -> None:
        token = uuid.uuid4().hex
        if not self.store.webhooks.take_lease(receiver.name, token, lease_seconds(self.settings) + QUEUE_WAIT):
            return  # another bridge took it
        try:
            self.celery.send_task(WEBHOOK_TASK_NAME, args=(receiver.name, token))
        except Exception:
            self.store.webhooks.release_lease(receiver.name, token)
            raise
        log.info("webhook delivery started", extra={"receiver": receiver.name})
