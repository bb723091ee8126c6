"""What a worker does with messages, as plain functions of their collaborators.

The Celery task in `tasks/` only adds transport concerns (retries, acks);
everything here runs, and is tested, without a worker.
"""

from __future__ import annotations

import logging
import random
import time

import redis
from prometheus_client import Counter

from pipeline.errors import PermanentError, TransientError

log = logging.getLogger("herald.processing")

TERMINAL = {"delivered", "failed", "rejected"}
ORDER_SPIN = 0.05  # seconds a worker waits in place for a channel's previous message
# Errors worth retrying: the services a message passes through were unreachable.
RETRYABLE = (TransientError, redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
FORCED_ORDER = Counter("herald_forced_out_of_order_total",
                       "Records let past their channel's order gate after HERALD_ORDER_WAIT")


class RetryLater(Exception):
    """A transient failure at `remaining[0]`; the rest must wait behind it to keep order."""

    def __init__(self, remaining: list[dict], cause: BaseException):
        super().__init__(str(cause))
        self.remaining = remaining
        self.cause = cause


def backoff_delay(retries: int, base: float, cap: float, rand=random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retries)]."""
    return rand() * min(cap, base * (2 ** retries))


def check_type(envelope: dict, allowed: tuple[str, ...]) -> None:
    """Reject message types no handler knows (when the deployment lists its types)."""
    if allowed and envelope["type"] not in allowed:
        raise PermanentError(f"unknown message type {envelope['type']!r}")


class Processor:
    """Takes a batch of envelopes of one partition, in offset order, through to delivery.

    Each step is one Redis round trip or one SQL transaction for the whole
    batch; every step is idempotent, so a batch that fails half-way is simply
    run again.
    """

    def __init__(self, settings, store, archive, dead_letters):
        self.settings = settings
        self.store = store
        self.archive = archive
        self.dead_letters = dead_letters

    def run(self, envelopes: list[dict], *, final_attempt: bool) -> dict:
        """Process the batch once; raises RetryLater when a transient failure stops it.

        Every record passes its channel's order gate, whatever becomes of it
        (README: "Order"): duplicates and dead-lettered messages move the gate
        on without being delivered. Records whose predecessor in the channel is
        not handled yet come back in `counts["waiting"]`, to be run again
        shortly; once they have waited `order_wait` seconds they pass anyway
        (the predecessor may sit with a dead worker until the broker's
        visibility timeout), which is logged and counted.
        """
        counts = {"delivered": 0, "duplicate": 0, "skipped": 0, "dead": 0, "waiting": []}
        now = time.time()
        for envelope in envelopes:
            if now - envelope.get("waiting_since", now) >= self.settings.order_wait:
                envelope["force_order"] = True
        try:
            # A message back from waiting was marked already; it is not a new attempt.
            fresh = [e for e in envelopes if "waiting_since" not in e]
            marked = iter(self.store.mark_processing(fresh))
            statuses = ["processing" if "waiting_since" in e else next(marked) for e in envelopes]
            for envelope, status in zip(envelopes, statuses):
                if status in TERMINAL:
                    envelope["skip"] = True  # handled before: it only passes the gate
                elif not envelope.get("skip"):
                    try:
                        check_type(envelope, self.settings.message_types)
                    except PermanentError as exc:
                        self._dead_letter(envelope, str(exc), attempts=1)
                        counts["dead"] += 1
                        envelope["skip"] = True
            skip = [bool(e.get("skip")) for e in envelopes]
            self.archive.store([e for e, skipped in zip(envelopes, skip) if not skipped])
            outcomes = self.store.deliver(envelopes, force=final_attempt, skip=skip)
        except RETRYABLE as exc:
            raise RetryLater(envelopes, exc) from exc
        blocked = set()  # channels whose earlier record still waits: the later ones cannot pass
        for index, (envelope, (outcome, _sid, forced)) in enumerate(zip(envelopes, outcomes)):
            if outcome == "wait" and envelope["channel"] not in blocked:
                try:
                    outcome, forced = self._deliver_in_turn(envelope, force=final_attempt)
                except RETRYABLE as exc:
                    raise RetryLater(envelopes[index:], exc) from exc
            if outcome == "wait":
                blocked.add(envelope["channel"])
                envelope.setdefault("waiting_since", now)
                counts["waiting"].append(envelope)
                continue
            if forced == "1":
                FORCED_ORDER.inc()
                log.warning("passed out of order: its predecessor is still not handled",
                            extra={"message_id": envelope["id"], "channel": envelope["channel"],
                                   "offset": envelope.get("offset"), "prev": envelope.get("prev"),
                                   "request_id": envelope.get("request_id")})
            counts[outcome] += 1
            log.info("message %s", outcome, extra={"message_id": envelope["id"], "channel": envelope["channel"],
                                                   "offset": envelope.get("offset"),
                                                   "request_id": envelope.get("request_id")})
        return counts

    def dead_letter_first(self, envelopes: list[dict], error: str, attempts: int) -> None:
        """Retries are used up: dead-letter the message that kept failing."""
        self._dead_letter(envelopes[0], error, attempts=attempts)

    def _deliver_in_turn(self, envelope: dict, *, force: bool) -> tuple[str, str]:
        # The predecessor is usually being processed by another worker right
        # now: a few milliseconds of waiting here beat a round trip through
        # the broker, but a worker slot must not be held for long.
        deadline = time.monotonic() + ORDER_SPIN
        delay = 0.002
        skip = [bool(envelope.get("skip"))]
        while True:
            (outcome, _sid, forced), = self.store.deliver([envelope], force=force, skip=skip)
            if outcome != "wait" or time.monotonic() >= deadline:
                return outcome, forced
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _dead_letter(self, envelope: dict, error: str, *, attempts: int) -> None:
        self.dead_letters.send(reason=error, partition=envelope.get("partition", -1),
                               offset=envelope.get("offset", -1), attempts=attempts, envelope=envelope)
        self.store.mark_failed(envelope, error)
