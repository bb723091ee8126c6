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
# Seconds a task goes on taking a channel's parked records before it hands the
# rest on as a new task: a long line must not hold one worker past
# HERALD_TASK_TIME_LIMIT, nor keep the queue's other tasks waiting.
LINE_SLICE = 0.5
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
PARKED = Counter("herald_worker_parked_total",
                 "Records parked at their channel's order gate until their predecessor passed")


class RetryLater(HeraldError):
    """A transient failure at `remaining[0]`; the rest must wait behind it to keep order."""

    def __init__(self, remaining: list[Envelope], cause: BaseException):
        super().__init__(str(cause))
        self.remaining = remaining
        self.cause = cause


class PassedGate(HeraldError):
    """A failure that is not transient, raised once the batch's records had passed their
    order gates (`passed`: their ids) or were parked there: those were handled (delivered,
    or noted as duplicates or dead letters) and must never be dead-lettered, or a replay
    would deliver them twice, and the parked ones are safe where they are.
    `due`: the parked records the run was taking on, which must go on without it."""

    def __init__(self, passed: set[str], cause: Exception, due: list[Envelope]):
        super().__init__(str(cause))
        self.passed = passed
        self.cause = cause
        self.due = due


@dataclass
class Outcome:
    """What became of a batch: counts per outcome, and the parked records now due at their
    gates that were left for a new task (LINE_SLICE)."""

    delivered: int = 0
    duplicate: int = 0
    skipped: int = 0
    dead: int = 0
    parked: int = 0
    due: list[Envelope] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The counts alone, for a log line or a task's result."""
        return {"delivered": self.delivered, "duplicate": self.duplicate, "skipped": self.skipped,
                "dead": self.dead, "parked": self.parked}


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

    def __init__(self, settings, store, archive, dead_letters, rules=None, outbox=None):
        self.settings = settings
        self.store = store
        self.archive = archive
        self.dead_letters = dead_letters
        self.rules = rules  # pipeline.rules.step.RulesStep, or None to run no rules
        # pipeline.webhooks.Outbox when a receiver is configured: message.* events (docs/webhooks.md).
        self.outbox = outbox

    def run(self, envelopes: list[Envelope], *, take_on: bool = True) -> Outcome:
        """Process the batch once; raises RetryLater when a transient failure stops it.

        Every record passes its channel's order gate, whatever becomes of it
        (docs/design.md: "Order"): duplicates and dead-lettered messages move the gate
        on without being delivered. A record whose predecessor in the channel is
        not handled yet is parked at its gate, where it waits in Redis, not in a
        task; a record that passes brings back its channel's parked successor,
        which this run passes in turn, and so on down the line (`_take_on`);
        without `take_on`, those are left in `Outcome.due`.
        """
        unmatched: list[dict] = []  # the rules' record for what they matched nothing in, once they ran
        outcome = Outcome()
        envelopes = list(envelopes)
        try:
            self._prepare(envelopes, outcome, unmatched)
            results = self._pass(envelopes)
        except RETRYABLE as exc:
            raise RetryLater(_decided(envelopes, unmatched), exc) from exc
        passed: set[str] = set()
        try:
            self._after_gate(envelopes, results, outcome, passed)
            outcome.due = _due(results)
            if take_on:
                self._take_on(outcome, passed)
        except RetryLater:
            raise
        except Exception as exc:
            raise PassedGate(passed, exc, outcome.due) from exc
        return outcome

    def _prepare(self, envelopes: list[Envelope], outcome: Outcome, unmatched: list[dict]) -> None:
        # What comes before the gate, in place (a failure half-way leaves the
        # records as far as they got): the rules' decision, the `processing`
        # status, the type check and the archive. Each record carries its
        # decision from here, as it is parked or retried.
        if self.rules is not None:
            # Before anything stores the message: a redacted field is never kept.
            envelopes[:], record = self.rules.apply(envelopes)
            if record is not None:
                unmatched.append(record)
                envelopes[:] = _decided(envelopes, unmatched)
        statuses = self.store.mark_processing(envelopes)
        for index, (envelope, status) in enumerate(zip(envelopes, statuses)):
            if status in TERMINAL:
                envelopes[index] = replace(envelope, skip=True)  # handled before: it only passes the gate
            elif not envelope.skip:
                try:
                    check_type(envelope, self.settings.message_types)
                except PermanentError as exc:
                    self._dead_letter(envelope, str(exc), attempts=1)
                    outcome.dead += 1
                    DELIVERED.labels("dead").inc()
                    envelopes[index] = replace(envelope, skip=True)
        self.archive.store([e for e in envelopes if not e.skip])

    def _take_on(self, outcome: Outcome, passed: set[str]) -> None:
        # The parked records due at their gates now (`outcome.due`), a channel's line
        # one record a round trip (each round passes one of every channel), for
        # LINE_SLICE; what is due after that goes on in a new task. `outcome.due`
        # names the records in hand, for whoever must send them on should this run
        # stop (Redelivery.hand_on, Redelivery.isolate). A record taken on by two
        # runs at once (a task handed back) is delivered by one, a duplicate in the other.
        deadline = time.monotonic() + LINE_SLICE
        due = outcome.due
        while due and time.monotonic() < deadline:
            try:
                results = self._pass(due)
            except RETRYABLE as exc:
                # Still parked, and due: they go on in a task of their own, with
                # retries of their own (not this task's, which they never failed).
                log.warning("taking parked records on failed; handing them on",
                            extra={"message_ids": [e.id for e in due], "error": failure_reason(exc)})
                return
            self._after_gate(due, results, outcome, passed)
            outcome.due = due = _due(results)

    def _pass(self, envelopes: list[Envelope]) -> list[PassResult]:
        # Through the order gate, then the rules' alerts and routes of what passed.
        results = self.store.deliver(envelopes)
        if any(e.rules for e in envelopes):  # only a decision has effects
            effects = emissions(envelopes, [r.outcome != "parked" for r in results],
                                self.settings.rules_alert_channel)
            if effects:
                self.store.emit(effects)
        return results

    def _after_gate(self, envelopes: list[Envelope], results: list[PassResult], outcome: Outcome,
                    passed: set[str]) -> None:
        # What follows the gate: each record's count and log, the archive's history offsets.
        handled: dict[str, list[str]] = {}
        placed = []  # (id, stream id) of what is in history, for the archive
        passed_now = [e.id for e, r in zip(envelopes, results) if r.outcome != "parked"]
        passed.update(passed_now)
        for envelope, (result, sid, forced, _due) in zip(envelopes, results):
            setattr(outcome, result, getattr(outcome, result) + 1)
            if result == "parked":
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
            handled.setdefault(result, []).append(envelope.id)
        for name, ids in handled.items():
            DELIVERED.labels(name).inc(len(ids))
        if len(passed_now) < len(envelopes):
            PARKED.inc(len(envelopes) - len(passed_now))
        self._tell(envelopes, results)
        if handled:
            # One line per round, not per message: log lines cost a worker's CPU
            # in proportion. The web's "accepted" line ties each id to its request.
            log.info("batch processed", extra={"partitions": offset_spans(envelopes),
                                               **{f"{name}_ids": ids for name, ids in handled.items()}})
        try:
            self.archive.record_offsets(placed)
        except RETRYABLE as exc:
            # Run again, each record is a duplicate carrying its stream id.
            raise RetryLater([e for e, r in zip(envelopes, results) if r.outcome != "parked"], exc) from exc

    def _tell(self, envelopes: list[Envelope], results: list[PassResult]) -> None:
        # message.delivered for what passed delivered, and again, same id, for a duplicate
        # (a worker that died between the gate and here); message.rejected for what the
        # rules blocked. One round trip, and none when no receiver wants them.
        if self.outbox is None:
            return
        delivered, rejected = self.outbox.wants("message.delivered"), self.outbox.wants("message.rejected")
        events = []
        for envelope, result in zip(envelopes, results):
            if delivered and result.outcome in ("delivered", "duplicate"):
                events.append(self.outbox.message_event("message.delivered", envelope, stream_id=result.stream_id))
            elif rejected and result.outcome == "skipped" and envelope.rules and envelope.rules.get("block"):
                events.append(self.outbox.message_event("message.rejected", envelope, rule=envelope.rules["block"]))
        if not events:
            return
        try:
            self.outbox.emit(events)
        except RETRYABLE as exc:
            # Run again, each record passes as a duplicate and is told again.
            raise RetryLater([e for e, r in zip(envelopes, results) if r.outcome != "parked"], exc) from exc

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

    def _dead_letter(self, envelope: Envelope, error: str, *, attempts: int) -> None:
        self.dead_letters.send(reason=error, partition=_or_unknown(envelope.partition),
                               offset=_or_unknown(envelope.offset), attempts=attempts, envelope=envelope)
        self.store.mark_failed(envelope, error)


def _decided(envelopes: list[Envelope], unmatched: list[dict]) -> list[Envelope]:
    # Every record that leaves a run to be run again carries its rules' decision:
    # those the rules ran on and matched nothing in get their mark now (RulesStep.apply).
    if not unmatched:
        return envelopes
    return [e if e.rules is not None or e.skip else e.with_rules(unmatched[0]) for e in envelopes]


def _due(results: list[PassResult]) -> list[Envelope]:
    # The parked records the results name, once each: two records of a channel
    # passed in one round name the same successor.
    due: dict[tuple[str, int | None], Envelope] = {}
    for result in results:
        for envelope in result.due:
            due.setdefault((envelope.channel, envelope.offset), envelope)
    return list(due.values())


def _or_unknown(position: int | None) -> int:
    # A dead letter's partition and offset are -1 when the message never came from Kafka.
    return -1 if position is None else position
