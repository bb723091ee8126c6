"""A service that refuses for a while is no message's fault (docs/design.md: "Under faults"): Redis refusing every
write (NOREPLICAS, as MISCONF when its disk is full) fails all messages alike, so the
worker retries them and dead-letters none; every message is delivered once it answers
again. Lost 0, duplicated 0, reordered 0."""

from __future__ import annotations

import time
import uuid

from tests.faults.conftest import start_collector
from tests.faults.load import (
    assert_exactly_once,
    forced_passes,
    history_of,
    report,
    settled_in_flight,
    wait_for_delivery,
)
from tests.faults.test_poison_message import NEVER_FORCED, _published
from tests.harness import wait_until

REFUSAL = 3.0  # seconds Redis refuses writes once the worker met the refusal


def test_redis_refusing_writes_is_retried_and_dead_letters_nothing(make_stack, channels):
    # RabbitMQ as the broker: only the state Redis refuses, as a full disk would.
    stack = make_stack(broker="amqp", env=NEVER_FORCED)
    worker = stack.worker()
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    chosen = channels[:4]
    collector = start_collector([web], token, chosen)
    tag = uuid.uuid4().hex[:8]
    items = [{"id": f"{tag}-{n:02d}", "channel": chosen[n % 4], "data": {"n": n}} for n in range(40)]
    status, _, answer = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token)
    assert status == 202 and all(r["status"] == "accepted" for r in answer["results"])
    store = stack.store()
    # No replica answers: Redis refuses every write with a NOREPLICAS error reply, which
    # redis-py raises as a plain ResponseError (so it does MISCONF, BUSY).
    store.redis.config_set("min-replicas-to-write", 1)
    try:
        stack.bridge()
        wait_until(lambda: "NOREPLICAS" in worker.log(), 60, 0.2, "the worker to meet the refusal")
        time.sleep(REFUSAL)
    finally:
        store.redis.config_set("min-replicas-to-write", 0)
    publisher = _published([item["id"] for item in items])
    wait_for_delivery(collector, publisher, timeout=120)
    collector.stop()
    page = web.request("GET", "/api/v1/dlq", token=admin)[2]
    figures = report("redis refusing writes", publisher, collector, history_of(stack, chosen),
                     in_flight=settled_in_flight(stack), forced=forced_passes(worker), dead_letters=page["total"],
                     retries=worker.log().count('"retrying"'))
    assert page["total"] == 0  # the batch not split, no message dead-lettered or lost
    assert_exactly_once(figures)
    assert figures["forced"] == 0
