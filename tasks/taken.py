"""Recording the bridge's tasks a worker took off the broker, for the bridge to notice lost ones.

The bridge stamps each task it sends with its dispatch time
(`DISPATCHED_HEADER`) and marks its messages queued; the worker's main process,
as it takes such a task, unmarks them and raises the store's `taken` mark,
one round trip (docs/design.md: "Under faults"). Tasks a worker sent (splits,
a line's parked records handed on) carry no stamp, and a retry carries its first
run's: neither is recorded.
"""

from __future__ import annotations

import logging
import time

from pipeline.store import Store, connect
from pipeline.taskqueue import DISPATCHED_HEADER

log = logging.getLogger("herald.tasks")
PAUSE = 1.0  # seconds without recording after a failure: a Redis that hangs must not stall taking tasks


class Taken:
    """The worker main process's record of what it took, on Herald's Redis."""

    def __init__(self, settings):
        self.settings = settings
        self._store = None
        self._paused_until = 0.0

    def record(self, request) -> None:
        """Record a task just taken (a Celery worker Request), if the bridge sent it.

        A task not recorded looks lost to the bridge, which sends it again: a
        duplicate, which delivery deduplicates, never a message lost.
        """
        headers = request.request_dict
        dispatched = headers.get(DISPATCHED_HEADER)
        if dispatched is None or headers.get("retries") or time.monotonic() < self._paused_until:
            return
        try:
            if self._store is None:
                self._store = Store(connect(self.settings, 1), self.settings)
            self._store.mark_taken([wire["id"] for wire in request.args[0]], float(dispatched))
        except Exception as exc:
            self._paused_until = time.monotonic() + PAUSE
            log.warning("taken task not recorded", extra={"error": str(exc), "task_id": request.id})
