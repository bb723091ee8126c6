"""The Celery app and Herald's task (`celery -A tasks:celery_app worker`).

The task is a thin shell: it retries a transient failure with backoff and
hands a task past HERALD_TASK_TIME_LIMIT back to the broker. What becomes of a
batch otherwise (a worker died running it, a failure that is not transient or
outlived its retries, messages waiting for their channel's previous one) is
`tasks.redelivery`'s policy; the work itself is `tasks.processor.Processor`.
The worker's signals run the hand-back of a stalled worker's tasks (`tasks.handback`)
and record the bridge's tasks taken off the broker (`tasks.taken`).
"""

from __future__ import annotations

import logging

from celery import signals
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from pipeline.core.logs import configure_logging
from pipeline.core.messages import Envelope
from pipeline.core.metrics import RETRIES
from pipeline.core.settings import current
from pipeline.rules.repository import RulesUnavailable
from pipeline.taskqueue import TASK_NAME, make_celery
from tasks.processor import RETRYABLE, Processor, RetryLater, backoff_delay, failure_reason
from tasks.redelivery import Redelivery, to_wire
from tasks.taken import Taken
from tasks.webhooks import register as register_webhooks

log = logging.getLogger("herald.tasks")


def _not_about_delayed_delivery(record: logging.LogRecord) -> bool:
    # RabbitMQ's native delayed delivery needs a topic exchange and whole
    # seconds (a retry's backoff is fractional and raises there): the worker holds countdown
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
        from pipeline.archive.cache import bloom_filter, cache_client
        from pipeline.dlq import DeadLetters
        from pipeline.kafka import Publisher
        from pipeline.rules.repository import RulesStore
        from pipeline.rules.step import RulesStep
        from pipeline.store import Store, connect
        from pipeline.webhooks import Outbox

        store = Store(connect(settings, settings.redis_pool_size), settings)
        publisher = Publisher(settings, client_id=f"herald-worker-{settings.node_id}")
        bloom = bloom_filter(settings, cache_client(settings) if settings.cache_url else store.redis)
        # No receiver, no outbox: the message path does not even ask (docs/webhooks.md).
        outbox = Outbox(store, settings) if settings.webhooks else None
        _processor = Processor(settings, store, Archive(settings.database_url, bloom),
                               DeadLetters(publisher, store, settings, outbox), RulesStep(RulesStore(store, settings)),
                               outbox=outbox)
    return _processor


def _send(envelopes: list[Envelope], **options) -> None:
    """Queue a batch as a new `process_message` task (Celery's `apply_async` options)."""
    process_message.apply_async(args=(to_wire(envelopes),), **options)


redelivery = Redelivery(settings, processor, _send)
# docs/webhooks.md: its own queue, consumed by this worker beside the messages'.
deliver_webhooks = register_webhooks(celery_app, settings)


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


taken = Taken(settings)


@signals.task_received.connect
def _took(request, **_kwargs):
    # Runs in the worker's main process for every task it takes off the broker.
    keeper = worker_handback(request.hostname)
    if keeper is not None:
        try:
            keeper.took(request.message.delivery_tag)
        except Exception as exc:  # the broker dropped: kombu's visibility timeout still hands it back
            log.warning("delivery not recorded", extra={"error": str(exc), "task_id": request.id})
    taken.record(request)


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
    retried from the first transient failure; any other failure isolates its message
    (`Redelivery.isolate`)."""
    envelopes = [Envelope.from_wire(w) for w in wire]
    final = self.request.retries >= self.max_retries
    try:
        return _attempt(self, envelopes, final)
    except SoftTimeLimitExceeded:
        # As a worker death: back to the broker, counted by count_run, split and,
        # past HERALD_MAX_REDELIVERIES, dead-lettered (Redelivery.after_worker_loss).
        log.warning("task over HERALD_TASK_TIME_LIMIT; handed back", extra={
            "message_id": envelopes[0].id, "count": len(envelopes), "task_id": self.request.id})
        raise Reject("over HERALD_TASK_TIME_LIMIT", requeue=True) from None
    except (Retry, Reject):  # Celery's own: a retry, a hand-back
        raise
    except OperationalError as exc:
        # The broker refused a task sent on (a line's records handed on): no message's fault.
        raise redelivery.retry_unlimited(self, envelopes, exc) from None
    except Exception as exc:
        # Any error not known to be transient, whatever its type (docs/design.md: "Under faults").
        return redelivery.isolate(self, envelopes, exc, attempts=self.request.retries + 1)


def _attempt(task, envelopes: list[Envelope], final: bool) -> dict:
    """Run the batch once; a transient failure is retried with backoff, then dead-lettered."""
    try:
        try:
            processor().check_rules()
        except RulesUnavailable as exc:
            return redelivery.await_rules(task, envelopes, exc)
        except RETRYABLE:
            pass  # Redis failed: the run meets it again, a failure like any other
        try:
            deaths = redelivery.deaths(task)
        except RETRYABLE as exc:
            raise RetryLater(envelopes, exc) from exc
        if deaths > 0:
            return redelivery.after_worker_loss(task, envelopes, deaths)
        return redelivery.hand_on(processor().run(envelopes))
    except RetryLater as pending:
        error = failure_reason(pending.cause)
        if not final:
            delay = backoff_delay(task.request.retries, settings.retry_base_delay, settings.retry_max_delay)
            ceiling = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** task.request.retries)
            log.warning("retrying", extra={"message_id": pending.remaining[0].id, "error": error,
                                           "retries": task.request.retries, "countdown": round(delay, 3),
                                           "ceiling": round(ceiling, 3)})
            RETRIES.inc()
            raise task.retry(args=(to_wire(pending.remaining),), countdown=delay, exc=pending.cause) from None
        return redelivery.dead_letter(task, pending.remaining, error, attempts=task.request.retries + 1)
