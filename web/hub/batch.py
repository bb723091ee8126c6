"""One Redis round trip for many connections' calls: a burst of connects and subscribes
costs a pipeline per loop pass instead of a round trip per client.

In a burst of 10,000 WebSocket connects, redis-py's per-command overhead and
the syscalls of three round trips per client were most of a connect's CPU
(docs/benchmarks.md: "The hub beside Flask-SocketIO"). A `Batcher` collects the
calls that greenlets make while its previous batch runs and hands them to one
function that does them all in one pipeline.
"""

from __future__ import annotations

import gevent
from gevent.event import AsyncResult

MAX_BATCH = 500


class Batcher:
    """Calls `run(list_of_args)` -> list of results once for many callers' `batcher(*args)`.

    A caller blocks its greenlet until its result is in; an exception from
    `run` is raised to every caller of that batch.
    """

    def __init__(self, run):
        self._run = run
        self._pending: list[tuple[tuple, AsyncResult]] = []
        self._flushing = False

    def __call__(self, *args):
        """Queue `args` for the next batch and wait for its result."""
        result = AsyncResult()
        self._pending.append((args, result))
        if not self._flushing:
            # Spawned, not run here: the callers arriving in this loop pass join the batch.
            self._flushing = True
            gevent.spawn(self._flush)
        return result.get()

    def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    results = self._run([args for args, _ in batch])
                except Exception as exc:  # every caller of the batch sees what went wrong
                    for _, result in batch:
                        result.set_exception(exc)
                    continue
                for (_, result), value in zip(batch, results):
                    result.set(value)
        finally:
            self._flushing = False
