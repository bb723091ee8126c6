"""Tasks the Celery broker lost, noticed within seconds (docs/design.md: "Under faults").

The bridge marks what it dispatches as queued, with the dispatch time in
each task's headers; a worker's main process, as it takes a task off the
broker, removes the task's messages from the queued set and raises the
`taken` mark to the task's dispatch time (pipeline/store/inflight.py). A
worker killed between taking a task and recording it (Redis), or a queue
purged (RabbitMQ), leaves messages queued that no worker will ever take.

What was taken is known by a *bound*: every task dispatched before it had
left the broker's queue when the bound was seen. The queue is first in,
first out, so the mark is one (what was dispatched before a task already
taken left the queue first); an empty queue is another, for the last task
dispatched before the bridge went quiet, after which nothing is taken to
raise the mark. Once a bound is `GRACE` old, the worker that took each task
it covers has had that long to record it: what is still queued below it is
lost, and sent again. A long queue raises no bound past its head, so a task
that is merely slow is never sent twice.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from pipeline.core.messages import Envelope

# Seconds a bound must hold before what it covers counts as lost: a worker
# records a task it took within milliseconds of taking it.
GRACE = 2.0
# Seconds taken off each bound for what may come between a dispatch's time
# and its task reaching the broker's queue: a send's round trip, and the
# clocks of two bridges dispatching at once (two tasks stamped out of their
# queue order must not make the later one look lost).
SLACK = 0.5
SWEEP_INTERVAL = 1.0  # seconds between the bridge's looks for lost tasks


class TakenBound:
    """The bounds seen so far, each counting once it is `grace` seconds old."""

    def __init__(self, grace: float = GRACE, clock: Callable[[], float] = time.monotonic):
        self.grace = grace
        self.clock = clock
        self._pending: collections.deque[tuple[float, float]] = collections.deque()  # (seen at, bound)
        self.settled: float | None = None

    @property
    def highest(self) -> float | None:
        """The highest bound seen, settled or not."""
        return self._pending[-1][1] if self._pending else self.settled

    def see(self, bound: float) -> None:
        """Note a bound seen now (one no higher than a bound already seen adds nothing)."""
        highest = self.highest
        if highest is None or bound > highest:
            self._pending.append((self.clock(), bound))

    def settle(self) -> float | None:
        """The highest bound seen at least `grace` seconds ago, or None."""
        now = self.clock()
        while self._pending and self._pending[0][0] <= now - self.grace:
            self.settled = self._pending.popleft()[1]
        return self.settled


class LostTasks:
    """Finds queued messages no worker will take: one look per call of `sweep`."""

    def __init__(self, store, ready_tasks: Callable[[], int], bound: TakenBound | None = None,
                 wall: Callable[[], float] = time.time):
        self.store = store
        self.ready_tasks = ready_tasks
        self.bound = bound or TakenBound()
        self.wall = wall

    def sweep(self) -> list[Envelope]:
        """The lost messages, claimed for this bridge to send again, in (partition, offset) order.

        One store round trip when nothing is queued; the broker is asked how
        long its queue is only while the oldest queued message is older than
        every bound seen (a lost task, or a queue as long as that).
        """
        mark, oldest = self.store.queue_ends()
        if mark is not None:
            self.bound.see(mark - SLACK)
        if oldest is None:
            return []
        highest = self.bound.highest
        now = self.wall()
        if oldest < now - SLACK and (highest is None or oldest >= highest) and self.ready_tasks() == 0:
            self.bound.see(now - SLACK)
        settled = self.bound.settle()
        if settled is None or oldest >= settled:
            return []
        return self.store.claim_queued(settled)
