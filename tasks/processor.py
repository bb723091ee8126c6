"""What a worker does with messages: the Processor and the helpers of its steps.

The Celery task in `tasks/` only adds transport concerns (retries, acks);
everything here runs, and is tested, without a worker.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace

import redis
from confluent_kafka import KafkaException
from prometheus_client import Counter
from sqlalchemy.exc import SQLAlchemyError

from pipeline.core.errors import HeraldError, PermanentError, TransientError
from pipeline.core.messages import Envelope, offset_spans
from pipeline.core.metrics import DELIVERED, DELIVERY_LATENCY
from pipeline.rules.effects import emissions
from pipeline.store.gate import PassResult

log = logging.getLogger("herald.processing")

TERMINAL = {"delivered", "failed", "rejected"}
ORDER_SPIN = 0.05  # seconds a worker waits in place for a channel's previous message
ORDER_RECHECK = 0.1  # seconds before a message waiting for its predecessor is tried again
# Past this wait the predecessor is not in another worker's hands but lost or
# held by a dead worker: no spin in place, and a slower recheck.
ORDER_LONG_WAIT = 5.0
ORDER_RECHECK_LONG = 1.0
# Errors worth retrying: decided by where they come from, not by their kind. A
# service a message passes through (Redis, the archive's database, Kafka) that
# fails or refuses (down, full, MISCONF, a pool timeout) fails every message
# alike: retried, then the first is dead-lettered as after any last retry.
# Every other error is taken as the message's own fault (its data, a rule, a
# bug it triggers): it is isolated and dead-lettered (`Redelivery.isolate`, tasks/redelivery.py).
RETRYABLE = (TransientError, redis.RedisError, SQLAlchemyError, KafkaException)
REASON_CHARS = 500  # of a failure's reason, in a dead letter and the message's status
FORCED_ORDER = Counter("herald_forced_out_of_order_total",
                       "Records let past their channel's order gate after HERALD_ORDER_WAIT")


class RetryLater(HeraldError):
    """A transient failure at `remaining[0]`; the rest must wait behind it to keep order."""

    def __init__(self, remaining: list[Envelope], cause: BaseException):
        super().__init__(str(cause))
        self.remaining = remaining
        self.cause = cause


class PassedGate(HeraldError):
    """A failure that is not transient, raised once records had passed their order gates
    (`passed`: their ids): those were handled (delivered, or noted as duplicates or dead
    letters) and must never be dead-lettered, or a replay would deliver them twice."""

    def __init__(self, passed: set[str], cause: Exception):
        super().__init__(str(cause))
        self.passed = passed
        self.cause = cause


@dataclass
class Outcome:
    """What became of a batch: counts per outcome, and the envelopes still waiting at their gate."""

    delivered: int = 0
    duplicate: int = 0
    skipped: int = 0
    dead: int = 0
    waiting: list[Envelope] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The counts alone, for a log line or a task's result."""
        return {"delivered": self.delivered, "duplicate": self.duplicate, "skipped": self.skipped,
                "dead": self.dead}


def backoff_delay(retries: int, base: float, cap: float, rand=random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retries)]."""
    return rand() * min(cap, base * (2 ** retries))


def failure_reason(exc: BaseException) -> str:
    """`Type: message` of an exception, at most REASON_CHARS long (a dead letter's reason)."""
    try:
        text = str(exc)
    except Exception:  # a message that cannot even be put in words is still dead-lettered
        text = "(no message)"
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 1] + "\u2026"


def check_type(envelope: Envelope, allowed: tuple[str, ...]) -> None:
    """Reject message types no handler knows (when the deployment lists its types)."""
    if allowed and envelope.type not in allowed:
        raise PermanentError(f"unknown message type {envelope.type!r}")


class Processor:
    """Takes a batch of envelopes (each partition's in offset order) through to delivery.

    Each step is one Redis round trip or one SQL transaction for the whole
    batch; every step is idempotent, so a batch that fails half-way is simply
    run again.
    """

    def __init__(self, settings, store, archive, dead_letters, rules=None):
        self.settings = settings
        self.store = store
        self.archive = archive
        self.dead_letters = dead_letters
        self.rules = rules  # pipeline.rules.step.RulesStep, or None to run no rules

    def run(self, envelopes: list[Envelope], *, final_attempt: bool) -> Outcome:
        """Process the batch once; raises RetryLater when a transient failure stops it.

        Every record passes its channel's order gate, whatever becomes of it
        (docs/design.md: "Order"): duplicates and dead-lettered messages move the gate
        on without being delivered. Records whose predecessor in the channel is
        not handled yet come back in `Outcome.waiting`, to be run again
        shortly; once they have waited `order_wait` seconds they pass anyway
        (the predecessor may sit with a dead worker until the broker's
        visibility timeout), which is logged and counted.
        """
        unmatched: list[dict] = []  # the rules' record for what they matched nothing in, once they ran
        try:
            outcome = self._run(envelopes, final_attempt, unmatched)
        except RetryLater as pending:
            pending.remaining = _decided(pending.remaining, unmatched)
            raise
        outcome.waiting = _decided(outcome.waiting, unmatched)
        return outcome

    def _run(self, envelopes: list[Envelope], final_attempt: bool, unmatched: list[dict]) -> Outcome:
        outcome = Outcome()
        now = time.time()
        envelopes = [replace(e, force_order=True) if now - _since(e, now) >= self.settings.order_wait else e
                     for e in envelopes]
        try:
            if self.rules is not None:
                # Before anything stores the message: a redacted field is never kept.
                envelopes, record = self.rules.apply(envelopes)
                if record is not None:
                    unmatched.append(record)
            # A message back from waiting was marked already; it is not a new attempt.
            marked = iter(self.store.mark_processing([e for e in envelopes if e.waiting_since is None]))
            statuses = ["processing" if e.waiting_since is not None else next(marked) for e in envelopes]
            for index, (envelope, status) in enumerate(zip(envelopes, statuses)):
                if status in TERMINAL:
                    envelopes[index] = replace(envelope, skip=True)  # handled before: it only passes the gate
                elif not envelope.skip:
                    try:
                        check_type(envelope, self.settings.message_types)
                    except PermanentError as exc:
                        self._dead_letter(envelope, str(exc), attempts=1)
                        outcome.dead += 1
                        envelopes[index] = replace(envelope, skip=True)
            self.archive.store([e for e in envelopes if not e.skip])
            results = self._pass(envelopes, force=final_attempt)
        except RETRYABLE as exc:
            raise RetryLater(envelopes, exc) from exc
        results, failure = self._deliver_waiting(envelopes, results, force=final_attempt)
        try:
            return self._after_gate(envelopes, results, failure, outcome, now)
        except RetryLater:
            raise
        except Exception as exc:
            raise PassedGate({e.id for e, result in zip(envelopes, results) if result.outcome != "wait"},
                             exc) from exc

    def _pass(self, envelopes: list[Envelope], *, force: bool) -> list[PassResult]:
        # Through the order gate, then the rules' alerts and routes of what passed.
        results = self.store.deliver(envelopes, force=force)
        if any(e.rules for e in envelopes):  # only a decision has effects
            effects = emissions(envelopes, [r.outcome != "wait" for r in results], self.settings.rules_alert_channel)
            if effects:
                self.store.emit(effects)
        return results

    def _after_gate(self, envelopes: list[Envelope], results: list[PassResult], failure, outcome: Outcome,
                    now: float) -> Outcome:
        # What follows the gate: each record's count and log, the archive's history offsets.
        handled: dict[str, list[str]] = {}
        placed = []  # (id, stream id) of what is in history, for the archive
        for envelope, (result, sid, forced) in zip(envelopes, results):
            if result == "wait":
                outcome.waiting.append(envelope if envelope.waiting_since is not None
                                       else replace(envelope, waiting_since=now))
                continue
            if forced:
                FORCED_ORDER.inc()
                log.warning("passed out of order: its predecessor is still not handled",
                            extra={"message_id": envelope.id, "channel": envelope.channel,
                                   "offset": envelope.offset, "prev": envelope.prev,
                                   "request_id": envelope.request_id})
            if sid and result in ("delivered", "duplicate"):
                placed.append((envelope.id, sid))
            if result == "delivered" and envelope.kafka_ts is not None:
                DELIVERY_LATENCY.observe(max(0.0, time.time() - envelope.kafka_ts / 1000))
            setattr(outcome, result, getattr(outcome, result) + 1)
            handled.setdefault(result, []).append(envelope.id)
        for name, count in outcome.counts().items():
            if count:
                DELIVERED.labels(name).inc(count)
        if handled:
            # One line per batch, not per message: log lines cost a worker's CPU
            # in proportion. The web's "accepted" line ties each id to its request.
            log.info("batch processed", extra={"partitions": offset_spans(envelopes),
                                               **{f"{result}_ids": ids for result, ids in handled.items()}})
        try:
            self.archive.record_offsets(placed)
        except RETRYABLE as exc:
            # Run again, each record is a duplicate carrying its stream id.
            raise RetryLater(envelopes, exc) from exc
        if failure is not None:
            # The records still waiting, in batch order: the retry is their only way back.
            raise RetryLater(outcome.waiting, failure) from failure
        return outcome

    def check_rules(self) -> None:
        """Raises RulesUnavailable while this process has no rule set it can apply
        (pipeline.rules.repository: it fails closed), before a batch is run at all."""
        if self.rules is not None:
            self.rules.current()

    def dead_letter_first(self, envelopes: list[Envelope], error: str, attempts: int) -> None:
        """Retries are used up: dead-letter the message that kept failing, unless it only
        passes its gate (dead-lettered or rejected before: its letter stays as it was)."""
        if not envelopes[0].skip:
            self._dead_letter(envelopes[0], error, attempts=attempts)

    def _deliver_waiting(self, envelopes: list[Envelope], results: list[PassResult], *, force: bool):
        """Try the batch's waiting records again, all of them in one round trip each time,
        until they pass or ORDER_SPIN is over; returns (results, the transient error that
        stopped the wait or None).

        A waiting record's predecessor is usually in another worker's hands
        right now (the batch before in the same partition, or the record before
        in a line draining under load): a few milliseconds of waiting here beat
        a round trip through the broker, but a worker slot must not be held for
        long. A record that has waited ORDER_LONG_WAIT is not held at all: its
        predecessor is lost or with a dead worker, and a long line of such
        records, each holding a slot, would keep the workers from the one they
        all wait for (a task the broker lost, sent again by the bridge). The
        records go again in batch order, so a channel's later record is tried
        only after its earlier one.
        """
        deadline = time.monotonic() + ORDER_SPIN
        delay = 0.002
        now = time.time()
        waiting = [index for index, result in enumerate(results)
                   if result.outcome == "wait" and now - _since(envelopes[index], now) < ORDER_LONG_WAIT]
        while waiting and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
            try:
                again = self._pass([envelopes[index] for index in waiting], force=force)
            except RETRYABLE as exc:
                return results, exc
            for index, result in zip(waiting, again):
                results[index] = result
            waiting = [index for index in waiting if results[index].outcome == "wait"]
        return results, None

    def _dead_letter(self, envelope: Envelope, error: str, *, attempts: int) -> None:
        self.dead_letters.send(reason=error, partition=_or_unknown(envelope.partition),
                               offset=_or_unknown(envelope.offset), attempts=attempts, envelope=envelope)
        self.store.mark_failed(envelope, error)


def recheck_delay(waited: float) -> float:
    """Seconds before messages that have waited `waited` seconds at their gate are tried again.

    A short wait ends within milliseconds (the predecessor is in another
    worker's hands); a long one waits for a task the broker hands back or the
    bridge sends again, and a channel's whole line checking ten times a second
    would crowd that task out. Two steps, not a delay of each record's own:
    a line's records, requeued in order with one delay, come back in order
    and pass together (younger records back first wait again).
    """
    return ORDER_RECHECK if waited < ORDER_LONG_WAIT else ORDER_RECHECK_LONG


def _decided(envelopes: list[Envelope], unmatched: list[dict]) -> list[Envelope]:
    # Every record that leaves a run to be run again carries its rules' decision:
    # those the rules ran on and matched nothing in get their mark now (RulesStep.apply).
    if not unmatched:
        return envelopes
    return [e if e.rules is not None or e.skip else e.with_rules(unmatched[0]) for e in envelopes]


def _since(envelope: Envelope, now: float) -> float:
    return now if envelope.waiting_since is None else envelope.waiting_since


def _or_unknown(position: int | None) -> int:
    # A dead letter's partition and offset are -1 when the message never came from Kafka.
    return -1 if position is None else position
