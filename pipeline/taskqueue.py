"""The Celery app both the bridge and the worker use: broker, queue and delivery options.

The bridge sends tasks through it (`send_task`, by name) and `tasks/` runs them;
neither knows the other's code, so this module owns what they must agree on.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipeline.core.redis_tls import redis_tls
from pipeline.core.settings import AMQP_HEARTBEAT

# The tasks the bridge sends and the worker runs, by name: a batch of messages,
# and a webhook receiver's events (docs/webhooks.md).
TASK_NAME = "process_message"
WEBHOOK_TASK_NAME = "deliver_webhooks"
# The message header of a task the bridge sent: when it was dispatched (seconds
# since the epoch), which the worker that takes it records (docs/design.md: "Under faults").
DISPATCHED_HEADER = "herald_dispatched"
AMQP_PREFETCH = 25  # tasks per worker process held from RabbitMQ, retries among them waiting out a countdown
# Seconds between a task's soft time limit (HERALD_TASK_TIME_LIMIT) and the kill
# of its process, for a task the soft limit cannot interrupt (a loop in C code).
KILL_GRACE = 10


def make_celery(settings) -> Celery:
    """A Celery app configured for at-least-once processing with late acks."""
    broker_url, broker_tls = settings.celery_broker_url, None
    if settings.redis_broker:
        # kombu takes the TLS options apart from the URL; so does Flower,
        # which reads them from this app's config (docs/configuration.md).
        broker_url, tls = redis_tls(broker_url, settings, "CELERY_BROKER_URL")
        broker_tls = tls or None
    app = Celery("herald")
    app.conf.update(
        broker_url=broker_url,
        broker_use_ssl=broker_tls,
        # No result backend: a task's outcome is its message's status in Redis
        # (docs/design.md: "Delivery guarantees"); a result key per task was written and
        # never read.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.task_queue,
        # A task is acknowledged only when it finished; a worker that dies
        # mid-task hands it back instead of losing it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A hung task (a rule's regex, a stuck call) must not hold a worker
        # process for ever. Past the soft limit it is handed back as if its
        # worker had died (process_message); past the hard one its process is
        # killed and, not acked, the task comes back the same way.
        task_soft_time_limit=settings.task_time_limit,
        task_time_limit=settings.task_time_limit + KILL_GRACE,
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=1,
        # Cancelling on connection loss crashes kombu 5.7's Redis transport
        # (AttributeError in restore_unacked, seen restarting Redis); a task
        # left running is handed back after the visibility timeout instead.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        # Task events cost about half of a worker's main-process CPU; Flower
        # switches them on while it runs (its --enable-events default).
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
    )
    app.conf.update(broker_options(settings))
    if settings.webhooks:
        # Webhook deliveries have a queue of their own, which the same workers consume
        # (docs/webhooks.md): a message task never waits behind them, and the bridge's
        # count of ready message tasks (ready_tasks, its lost-task sweep) never counts
        # them. Without a receiver there is no such queue at all.
        arguments = {"x-queue-type": "quorum"} if settings.amqp_broker else None
        app.conf.task_queues = [Queue(settings.task_queue, queue_arguments=arguments),
                                Queue(webhook_queue(settings), queue_arguments=arguments)]
        app.conf.task_routes = {WEBHOOK_TASK_NAME: {"queue": webhook_queue(settings)}}
    return app


def webhook_queue(settings) -> str:
    """The queue of webhook delivery tasks, beside the message tasks' queue."""
    return f"{settings.task_queue}.webhooks"


def broker_options(settings) -> dict:
    """The Celery settings that differ between the Redis and RabbitMQ brokers."""
    if settings.redis_broker:
        return {
            # kombu sweeps for tasks abandoned by dead workers only every
            # interval x throttle seconds (100 s by default): tie it to the timeout.
            "broker_transport_options": {
                "visibility_timeout": settings.visibility_timeout,
                "unacked_restore_interval": settings.unacked_restore_interval,
                "unacked_restore_throttle": 1,
                # A worker killed during a sweep keeps the sweep lock until it
                # expires (300 s by default): no one could restore tasks meanwhile.
                "unacked_mutex_expire": min(300, max(5, settings.visibility_timeout // 2)),
            },
        }
    if settings.amqp_broker:
        # RabbitMQ hands a dead worker's unacknowledged tasks back the moment
        # its connection drops: no visibility timeout, no hand-back of our own.
        return {
            # Replicated and durable (RabbitMQ's documentation recommends them
            # for data safety). They have no global QoS: Celery's detection
            # switches to a per-consumer prefetch (Celery: "Quorum Queues").
            "task_default_queue_type": "quorum",
            "worker_detect_quorum_queues": True,
            # A task with a countdown (a retry) is held by the worker until it
            # is due, in one of these static prefetch slots: with one per
            # process, a worker holding two retries took nothing else.
            "worker_prefetch_multiplier": AMQP_PREFETCH,
            # A publish returns only once RabbitMQ took the task: the bridge
            # stores a record's offset after that, never for a lost publish.
            "broker_transport_options": {"confirm_publish": True},
            "broker_heartbeat": AMQP_HEARTBEAT,
        }
    return {}


def ready_tasks(app: Celery, settings) -> int:
    """Tasks in the task queue that no worker took yet (one broker round trip, on a
    connection of the app's pool). Declared as the workers declare it, which both
    brokers answer with its count; an empty queue is no error."""
    queue = app.amqp.queues[settings.task_queue]
    with app.connection_or_acquire() as connection:
        return queue.bind(connection.default_channel).queue_declare().message_count
