"""The webhook delivery task: a shell of lease, hand-on and backoff over
`pipeline.webhooks.delivery.Delivery` (docs/webhooks.md).

The bridge takes a receiver's lease and sends this task with its token; the
task sends the receiver's batches for a slice (SLICE), then sends itself on
with the same token while events remain, or lets go of the lease once none
does. A failed batch comes back after an exponential backoff with full
jitter (BACKOFF_BASE, doubling, capped at HERALD_WEBHOOK_MAX_DELAY), the
lease held meanwhile, so nothing after it is sent first. A task whose lease
lapsed (its worker was killed mid-POST, say) stops at once: another took it,
and sends the batch again with the same event ids.

Its queue is its own (pipeline.taskqueue.webhook_queue), consumed by the same
workers: with one task a receiver at a time, a slow receiver holds one worker
slot at most, and message tasks never wait behind webhook tasks.
"""

from __future__ import annotations

import logging

import redis

from pipeline.taskqueue import WEBHOOK_TASK_NAME
from pipeline.webhooks.delivery import FAILED, IDLE, MORE, Delivery, lease_seconds
from tasks.processor import backoff_delay

log = logging.getLogger("herald.webhooks")
BACKOFF_BASE = 0.5  # seconds: the first retry's ceiling, doubled at each failure after


class _Process:
    """This worker process's Redis store and HTTP pools, made after the fork at first use."""

    def __init__(self, settings):
        self.settings = settings
        self._store = self._sender = None

    @property
    def store(self):
        if self._store is None:
            from pipeline.store import Store, connect

            self._store = Store(connect(self.settings, 4), self.settings)
        return self._store

    @property
    def sender(self):
        if self._sender is None:
            from pipeline.webhooks.sender import Sender

            self._sender = Sender(self.settings)
        return self._sender


def register(app, settings):
    """Declare the webhook delivery task on the Celery `app`; returns it."""
    receivers = {r.name: r for r in settings.webhooks}
    here = _Process(settings)

    # Acked as it starts: a task lost with its worker is started again by the
    # bridge once its lease lapsed, not by the broker.
    @app.task(name=WEBHOOK_TASK_NAME, bind=True, acks_late=False, ignore_result=True)
    def deliver_webhooks(self, receiver: str, token: str, failing_since: float | None = None,
                         attempt: int = 0) -> str:
        """Send the receiver's events while this task holds its lease (`token`)."""
        if receiver not in receivers:  # configured no more
            return "unknown"
        delivery = Delivery(settings, here.store, here.sender, receivers[receiver], token)
        try:
            outcome = delivery.run(failing_since)
            if outcome is IDLE:
                here.store.webhooks.release_lease(receiver, token)
            elif outcome is MORE:
                here.store.webhooks.renew_lease(receiver, token, lease_seconds(settings))
                self.apply_async((receiver, token))
            elif outcome is FAILED:
                # The same batch failing again backs off further; a new one starts over.
                attempt = attempt + 1 if delivery.failing_since == failing_since else 0
                delay = backoff_delay(attempt, BACKOFF_BASE, settings.webhook_max_delay)
                # The lease outlives the wait: no other task sends anything meanwhile.
                here.store.webhooks.renew_lease(receiver, token, delay + lease_seconds(settings))
                self.apply_async((receiver, token, delivery.failing_since, attempt), countdown=delay)
        except redis.RedisError as exc:
            # The lease lapses; the bridge starts the receiver's delivery again.
            log.warning("webhook delivery stopped: Redis failed", extra={"receiver": receiver, "error": str(exc)})
            return "error"
        return outcome.value
    return deliver_webhooks
