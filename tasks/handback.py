"""Handing back the tasks of a worker that died, within seconds (Redis broker only).

The Redis broker hands a dead worker's unacknowledged tasks back only after
the visibility timeout; meanwhile the messages behind them in their channels
wait at the order gate (docs/design.md: "Order"). So each worker records which
deliveries it took, next to kombu's own `unacked` hash, and keeps a liveness
key fresh; every worker sweeps for workers whose key lapsed and restores
their deliveries to the queue. A delivery finished meanwhile is gone from
`unacked`, and restoring it is a no-op; one restored while still running
(a worker that only seemed dead) runs twice, which delivery deduplicates.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline.store.keys import Keys

log = logging.getLogger("herald.handback")


class Handback:
    """One worker's registration, heartbeat and sweep, on the broker's Redis."""

    def __init__(self, settings, celery_app, hostname: str):
        self.settings = settings
        self.celery = celery_app
        self.hostname = hostname
        self.keys = Keys(settings.redis_prefix)
        self.stopped = threading.Event()
        self._last_beat: float | None = None  # monotonic time of this worker's last refresh
        self._connection = celery_app.connection_for_write()
        self._channel = self._connection.default_channel
        self.redis = self._channel.client

    def start(self) -> None:
        """Register this worker and sweep now (its predecessor may have died), then every period.

        Deliveries recorded under this worker's own name belong to an earlier
        worker of the same name (a restart on the same host): it is gone, and
        they go back first.
        """
        restored = self._restore(self.hostname)
        if restored:
            log.warning("handed back the tasks of this worker's previous run",
                        extra={"worker": self.hostname, "deliveries": restored})
        self.beat()
        threading.Thread(target=self._run, name="herald-handback", daemon=True).start()

    def took(self, delivery_tag: str) -> None:
        """Remember a delivery this worker received (called from `task_received`)."""
        self.redis.sadd(self.keys.worker_deliveries(self.hostname), delivery_tag)

    def beat(self) -> None:
        """Refresh this worker's liveness, forget its finished deliveries, sweep the dead;
        not the dead when this worker was itself silent for a lapse."""
        lapse = self.settings.worker_lapse
        pipe = self.redis.pipeline()
        pipe.sadd(self.keys.workers, self.hostname)
        pipe.set(self.keys.worker(self.hostname), "1", px=int(lapse * 1000))
        pipe.execute()
        now, last = time.monotonic(), self._last_beat
        self._last_beat = now
        self._forget_finished()
        if last is not None and now - last > lapse:
            # A stalled broker (or a paused process) silenced every worker
            # alike: the keys that lapsed meanwhile say no more than this
            # one's. Restoring the deliveries of live workers would run them
            # twice and count deaths (HERALD_MAX_REDELIVERIES) that never
            # happened; the others get a beat to come back first.
            log.warning("handback sweep deferred: this worker was silent for a lapse",
                        extra={"worker": self.hostname, "silent": round(now - last, 3)})
            return
        self.sweep()

    def sweep(self) -> int:
        """Restore the deliveries of every worker whose liveness lapsed; returns how many."""
        restored = 0
        others = [h for h in self.redis.smembers(self.keys.workers) if h != self.hostname.encode()]
        for name in others:
            hostname = name.decode()
            if self.redis.exists(self.keys.worker(hostname)):
                continue
            count = self._restore(hostname)
            self.redis.srem(self.keys.workers, hostname)
            log.warning("handed back the tasks of a worker that stopped answering",
                        extra={"worker": hostname, "deliveries": count})
            restored += count
        return restored

    def _restore(self, hostname: str) -> int:
        deliveries = self.keys.worker_deliveries(hostname)
        tags = self.redis.smembers(deliveries)
        for tag in tags:
            self._channel.qos.restore_by_tag(tag.decode(), client=self.redis)
        if tags:
            # Only what was restored: a delivery recorded meanwhile (by a worker
            # only taken for dead) stays, to be restored or forgotten later.
            self.redis.srem(deliveries, *tags)
        return len(tags)

    def stop(self) -> None:
        """Leave at a warm shutdown (kombu restores this worker's own unacked tasks then)."""
        self.stopped.set()
        pipe = self.redis.pipeline()
        pipe.delete(self.keys.worker(self.hostname), self.keys.worker_deliveries(self.hostname))
        pipe.srem(self.keys.workers, self.hostname)
        pipe.execute()
        self._connection.release()

    def _forget_finished(self) -> None:
        # An acknowledged delivery has left kombu's `unacked` hash.
        deliveries = self.keys.worker_deliveries(self.hostname)
        tags = list(self.redis.smembers(deliveries))
        if not tags:
            return
        pipe = self.redis.pipeline()
        for tag in tags:
            pipe.hexists(self._channel.unacked_key, tag)
        finished = [tag for tag, live in zip(tags, pipe.execute()) if not live]
        if finished:
            self.redis.srem(deliveries, *finished)

    def _run(self) -> None:
        period = self.settings.worker_lapse / 3
        while not self.stopped.wait(period):
            try:
                self.beat()
            except Exception as exc:  # the broker may be down: the next beat tries again
                log.warning("handback heartbeat failed", extra={"error": str(exc)})
