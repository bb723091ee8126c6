"""The Celery app and Herald's task (`celery -A tasks:celery_app worker`).

The task is a thin shell: retries, acks and dead-lettering after the last
retry; the work itself is `tasks.processor.Processor`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from celery import signals
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from pipeline.core.logs import configure_logging
from pipeline.core.messages import Envelope
from pipeline.core.metrics import RETRIES
from pipeline.core.settings import current
from pipeline.rules.repository import RulesUnavailable
from pipeline.taskqueue import TASK_NAME, make_celery
from tasks.processor import (
    ORDER_RECHECK,
    RETRYABLE,
    Outcome,
    PassedGate,
    Processor,
    RetryLater,
    backoff_delay,
    failure_reason,
    recheck_delay,
)

log = logging.getLogger("herald.tasks")
# Seconds before a batch is tried again while its worker has no rule set it can
# apply: one VERSION_CHECK or two, a set stored meanwhile is applied at once.
RULES_RECHECK = 1.0


def _not_about_delayed_delivery(record: logging.LogRecord) -> bool:
    # RabbitMQ's native delayed delivery needs a topic exchange and whole
    # seconds (a 0.1 s recheck_delay raises there): the worker holds countdown
    # tasks itself (AMQP_PREFETCH), which Celery warns about at every one.
    return "native delayed delivery" not in record.getMessage()


logging.getLogger("celery.app.base").addFilter(_not_about_delayed_delivery)
settings = current()
celery_app = make_celery(settings)
_processor: Processor | None = None


def processor() -> Processor:
    """This worker process's Processor, made after the fork (Kafka clients do not survive one)."""
    global _processor
    if _processor is None:
        from pipeline.archive import Archive
        from pipeline.dlq import DeadLetters
        from pipeline.kafka import Publisher
        from pipeline.rules.repository import RulesStore
        from pipeline.rules.step import RulesStep
        from pipeline.store import Store, connect

        store = Store(connect(settings, settings.redis_pool_size), settings)
        publisher = Publisher(settings, client_id=f"herald-worker-{settings.node_id}")
        from pipeline.archive.cache import bloom_filter, cache_client

        bloom = bloom_filter(settings, cache_client(settings) if settings.cache_url else store.redis)
        _processor = Processor(settings, store, Archive(settings.database_url, bloom),
                               DeadLetters(publisher, store, settings), RulesStep(RulesStore(store, settings)))
    return _processor


def _send(envelopes: list[Envelope], **options) -> None:
    """Queue a batch as a new `process_message` task (Celery's `apply_async` options)."""
    process_message.apply_async(args=(_wire(envelopes),), **options)


def _wire(envelopes: list[Envelope]) -> list[dict]:
    # Celery task arguments are JSON.
    return [envelope.to_wire() for envelope in envelopes]


def _after_worker_loss(task, envelopes: list[Envelope], deaths: int, final: bool) -> dict:
    """Isolate the message that may be killing workers; dead-letter it past the cap."""
    if len(envelopes) > 1:
        # One task per message from here on, so only a poisonous one is held back.
        log.warning("batch redelivered after a worker died; splitting it",
                    extra={"message_id": envelopes[0].id, "count": len(envelopes), "deaths": deaths})
        for envelope in envelopes:
            _send([envelope])
        return {"split": len(envelopes)}
    if deaths > settings.max_redeliveries:
        try:
            processor().dead_letter_first(
                envelopes, f"worker died {deaths} times while processing it (or it ran past HERALD_TASK_TIME_LIMIT)",
                attempts=deaths + 1)
        except Exception as exc:
            raise _retry_unlimited(task, envelopes, exc) from None
        _pass_gate(task, envelopes)
        return {"dead": 1}
    return _requeue_waiting(processor().run(envelopes, final_attempt=final))


def _pass_gate(task, envelopes: list[Envelope]) -> None:
    """Send the batch on, its first message dead-lettered: that one only passes its channel's
    order gate, without its data or rules' decision (what may have failed), in a fresh task.
    Should the broker refuse it, the task is retried with that batch, never with the message
    again: it would be dead-lettered twice."""
    onward = [replace(envelopes[0], skip=True, data=None, rules=None), *envelopes[1:]]
    try:
        _send(onward)
    except Exception as exc:
        raise _retry_unlimited(task, onward, exc) from None


def _retry_unlimited(task, envelopes: list[Envelope], exc: BaseException) -> Retry:
    """Retry `envelopes` after HERALD_RETRY_MAX_DELAY, however often they were: for a failure
    no message can be blamed for, where a task given up would be acked and its messages lost
    or their channel stalled until HERALD_ORDER_WAIT."""
    log.warning("retrying without limit", extra={"message_id": envelopes[0].id, "count": len(envelopes),
                                                 "error": failure_reason(exc), "retries": task.request.retries})
    RETRIES.inc()
    # Celery reads max_retries=None as the task's own limit: infinity is no limit.
    return task.retry(args=(_wire(envelopes),), countdown=settings.retry_max_delay, max_retries=math.inf,
                      exc=exc)


def _isolate(task, envelopes: list[Envelope], exc: Exception, attempts: int) -> dict:
    """A batch failed for a reason that is not transient: split it, so that each message runs
    alone and only the one at fault fails; a message alone is dead-lettered with the reason,
    and its channel's order gate moves on. Nothing here leaves the task given up: a step
    that fails (the dead letter, a send) retries it (`_retry_unlimited`)."""
    if isinstance(exc, PassedGate):
        passed = [e.id for e in envelopes if e.id in exc.passed]
        if passed:
            log.error("failed after passing its order gate; not dead-lettered",
                      extra={"message_ids": passed, "error": failure_reason(exc.cause)})
        envelopes, exc = [e for e in envelopes if e.id not in exc.passed], exc.cause
        if not envelopes:
            return {"dead": 0}
    reason = failure_reason(exc)
    if len(envelopes) > 1:
        log.warning("batch failed; splitting it", extra={"message_id": envelopes[0].id, "count": len(envelopes),
                                                          "error": reason})
        sent = 0
        try:
            for envelope in envelopes:
                _send([envelope])
                sent += 1
        except Exception as down:
            raise _retry_unlimited(task, envelopes[sent:], down) from None
        return {"split": len(envelopes)}
    if envelopes[0].skip:
        # Even passing the gate failed, with no data of its own to blame: a fault
        # of Herald's, not the message's. Until it passes, its channel waits.
        log.error("a dead-lettered message could not pass its order gate",
                  extra={"message_id": envelopes[0].id, "channel": envelopes[0].channel, "error": reason})
        raise _retry_unlimited(task, envelopes, exc)
    try:
        processor().dead_letter_first(envelopes, reason, attempts=attempts)
    except Exception as down:
        raise _retry_unlimited(task, envelopes, down) from None
    _pass_gate(task, envelopes)
    return {"dead": 1}


def _await_rules(task, envelopes: list[Envelope], exc: RulesUnavailable) -> dict:
    """This process has no rule set it can apply: the batch comes back in RULES_RECHECK
    seconds, as often as it takes, without a retry counted against its messages (none is
    dead-lettered for a fault of the policy's) and before the run is counted (`count_run`)."""
    log.warning("retrying: no rule set to apply", extra={"message_id": envelopes[0].id, "count": len(envelopes),
                                                          "error": failure_reason(exc)})
    RETRIES.inc()
    process_message.apply_async(args=(_wire(envelopes),), task_id=task.request.id, retries=task.request.retries,
                                countdown=min(RULES_RECHECK, settings.retry_max_delay))
    return {"waiting_for_rules": len(envelopes)}


def _requeue_waiting(outcome: Outcome) -> dict:
    """Send messages waiting for their channel's previous one back, shortly, as a new task;
    returns the batch's counts (the task's result)."""
    if outcome.waiting:
        waited = time.time() - min(e.waiting_since for e in outcome.waiting)
        # On RabbitMQ a waiting task holds one of the worker's fixed prefetch
        # slots until it is due (AMQP_PREFETCH): a longer delay there would
        # slow the queue, the predecessor's task included, not spare it.
        _send(outcome.waiting, countdown=ORDER_RECHECK if settings.amqp_broker else recheck_delay(waited))
    return {**outcome.counts(), "requeued": len(outcome.waiting)}


@signals.worker_process_init.connect
def _warm_up(**_kwargs):
    # Each pool process connects once at start, not on its first message.
    processor().dead_letters.publisher.warm_up()


_handback = None


def worker_handback(hostname: str):
    """This worker's Handback (Redis broker only; None otherwise), made at first use."""
    global _handback
    if _handback is None and settings.redis_broker:
        from tasks.handback import Handback

        _handback = Handback(settings, celery_app, hostname)
    return _handback


@signals.worker_ready.connect
def _start_handback(sender, **_kwargs):
    if worker_handback(sender.hostname) is not None:
        _handback.start()


@signals.task_received.connect
def _took(request, **_kwargs):
    # Runs in the worker's main process for every task it takes off the broker.
    keeper = worker_handback(request.hostname)
    if keeper is not None:
        try:
            keeper.took(request.message.delivery_tag)
        except Exception as exc:  # the broker dropped: kombu's visibility timeout still hands it back
            log.warning("delivery not recorded", extra={"error": str(exc), "task_id": request.id})


@signals.worker_shutdown.connect
def _stop_handback(**_kwargs):
    if _handback is not None:
        try:
            _handback.stop()
        except Exception as exc:
            log.warning("handback not unregistered", extra={"error": str(exc)})


@signals.setup_logging.connect
def _setup_logging(**_kwargs):
    configure_logging("worker", settings.log_level)


@celery_app.task(name=TASK_NAME, bind=True, max_retries=settings.retry_max)
def process_message(self, wire: list[dict]) -> dict:
    """Process a batch of messages (`Envelope.to_wire()` each; each partition's in offset order);
    retried from the first transient failure; any other failure isolates its message (`_isolate`)."""
    envelopes = [Envelope.from_wire(w) for w in wire]
    final = self.request.retries >= self.max_retries
    try:
        return _attempt(self, envelopes, final)
    except SoftTimeLimitExceeded:
        # As a worker death: back to the broker, counted by count_run, split and,
        # past HERALD_MAX_REDELIVERIES, dead-lettered (_after_worker_loss).
        log.warning("task over HERALD_TASK_TIME_LIMIT; handed back", extra={
            "message_id": envelopes[0].id, "count": len(envelopes), "task_id": self.request.id})
        raise Reject("over HERALD_TASK_TIME_LIMIT", requeue=True) from None
    except (Retry, Reject):  # Celery's own: a retry, a hand-back
        raise
    except OperationalError as exc:
        # The broker refused a task sent on (a message back from waiting): no message's fault.
        raise _retry_unlimited(self, envelopes, exc) from None
    except Exception as exc:
        # Any error not known to be transient, whatever its type (docs/design.md: "Under faults").
        return _isolate(self, envelopes, exc, attempts=self.request.retries + 1)


def _attempt(task, envelopes: list[Envelope], final: bool) -> dict:
    """Run the batch once; a transient failure is retried with backoff, then dead-lettered."""
    try:
        try:
            processor().check_rules()
        except RulesUnavailable as exc:
            return _await_rules(task, envelopes, exc)
        except RETRYABLE:
            pass  # Redis failed: the run meets it again, a failure like any other
        # A task started more often than retried was handed back by a worker
        # that died while running it: maybe one message kills workers.
        try:
            deaths = processor().store.count_run(task.request.id) - 1 - task.request.retries
        except RETRYABLE as exc:
            raise RetryLater(envelopes, exc) from exc
        if deaths > 0:
            return _after_worker_loss(task, envelopes, deaths, final)
        return _requeue_waiting(processor().run(envelopes, final_attempt=final))
    except RetryLater as pending:
        error = failure_reason(pending.cause)
        if not final:
            delay = backoff_delay(task.request.retries, settings.retry_base_delay, settings.retry_max_delay)
            ceiling = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** task.request.retries)
            log.warning("retrying", extra={"message_id": pending.remaining[0].id, "error": error,
                                           "retries": task.request.retries, "countdown": round(delay, 3),
                                           "ceiling": round(ceiling, 3)})
            RETRIES.inc()
            raise task.retry(args=(_wire(pending.remaining),), countdown=delay, exc=pending.cause) from None
        try:
            processor().dead_letter_first(pending.remaining, error, attempts=task.request.retries + 1)
        except Exception as exc:
            raise _retry_unlimited(task, pending.remaining, exc) from None
        # The others never failed themselves: they get a fresh set of retries;
        # the dead-lettered one goes along only to pass its channel's order gate.
        _pass_gate(task, pending.remaining)
        return {"dead": 1}
