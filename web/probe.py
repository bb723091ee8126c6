"""A probe of the services whose answer is kept a few seconds (HERALD_PROBE_TTL).

`/readyz` and the cluster gauges of `/metrics` ask Kafka, Redis and the
Celery broker. Asked on every call, anyone can turn a burst of calls into a
burst on those services. Here a call within the TTL of the last
probe gets its answer, and calls that find it stale wait for the one probe in
flight in this process instead of starting their own: N parallel calls cost
one probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.core.metrics import PROBES

T = TypeVar("T")


class CachedProbe(Generic[T]):
    """`probe()`'s last answer, kept `ttl` seconds; one probe in flight per process at a time.

    The probe must answer, not raise (a failure is an answer: "down"), and within its own
    deadline: callers wait for it. In a gevent web worker the lock is a gevent lock, so the
    waiting callers are greenlets, not threads.
    """

    def __init__(self, name: str, probe: Callable[[], T], ttl: float | Callable[[T], float]):
        self.name = name
        self._probe = probe
        # Seconds an answer is kept, or a function of the answer (a failure may be kept less).
        self._ttl = ttl if callable(ttl) else (lambda _answer: ttl)
        self._keep = 0.0
        self._lock = threading.Lock()
        self._answer: T | None = None
        self._at: float | None = None

    def get(self) -> T:
        """The answer of a probe no older than the TTL: the last one, or a new one."""
        answer = self._fresh()
        if answer is not None:
            return answer
        with self._lock:
            answer = self._fresh()  # made by the probe this call waited for
            if answer is not None:
                return answer
            PROBES.labels(self.name).inc()
            answer = self._probe()
            self._answer, self._at, self._keep = answer, time.monotonic(), self._ttl(answer)
            return answer

    def _fresh(self) -> T | None:
        if self._at is not None and time.monotonic() - self._at < self._keep:
            return self._answer
        return None
