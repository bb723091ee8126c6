"""Channel order under deploys and duplicate records (docs/design.md: "Order").

A retried POST can write a message to Kafka twice (same id, a later offset).
Every record must still pass its channel's order gate, or the records behind
a skipped duplicate wait HERALD_ORDER_WAIT and are then forced out in any
order.
"""

from __future__ import annotations

import collections
import json
import time

from confluent_kafka import Producer

from pipeline.core.messages import Envelope, encode, now_ms
from tests.faults.conftest import start_collector
from tests.faults.load import (
    Publisher,
    assert_exactly_once,
    forced_passes,
    history_of,
    inversions,
    report,
    settled_in_flight,
    wait_for_delivery,
)
from tests.harness import read_topic


def test_web_terminated_three_times_under_a_sequential_publisher(make_stack, channel):
    stack = make_stack()
    worker = stack.worker()
    stack.bridge()
    web = stack.web()
    token = stack.token()
    collector = start_collector([web], token, [channel])
    # One channel, each POST after the last one's answer, a failed one retried under its Idempotency-Key.
    publisher = Publisher([web], token, [channel], count=1000, rate=150, give_up_after=90, key_header=True)
    publisher.start()
    deploys = 0
    # A deploy terminates web every 1.5 s; a process manager starts again what
    # exited. (Restarted from this thread: the harness's processes die with the
    # thread that started them.)
    while deploys < 3 and publisher.is_alive():
        time.sleep(1.5)
        web.proc.stop(timeout=40)
        deploys += 1
        web.restart()
    publisher.join()
    wait_for_delivery(collector, publisher, timeout=120)
    collector.stop()
    records = collections.Counter(json.loads(r.value())["id"] for r in read_topic(stack, stack.settings.topic))
    figures = report("web terminated 3 times", publisher, collector, history_of(stack, [channel]),
                     in_flight=settled_in_flight(stack), deploys=deploys, forced=forced_passes(worker),
                     kafka_records_written_twice=sum(1 for c in records.values() if c > 1))
    assert deploys == 3, figures
    assert figures["forced"] == 0, figures
    assert_exactly_once(figures)


def test_an_id_written_twice_to_kafka_holds_up_nothing_behind_it(make_stack, channel):
    # An order wait longer than the test waits: a record stuck at the gate shows as lost.
    stack = make_stack(env={"HERALD_ORDER_WAIT": 60})
    worker = stack.worker()
    stack.bridge()
    web = stack.web()
    token = stack.token()
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})

    def write(msg_id: str) -> None:
        envelope = Envelope(id=msg_id, channel=channel, type="message", data=msg_id, sender="tester", ts=now_ms())
        producer.produce(stack.settings.topic, key=channel, value=encode(envelope))

    # A duplicate of a message delivered long before, then one of a message
    # whose first record is right before it (both in one worker batch, most likely).
    write("first")
    producer.flush(10)
    assert client.expect(lambda f: f["op"] == "message")["id"] == "first"
    behind = [f"behind-{n:02d}" for n in range(50)]
    for msg_id in ["first", "second", "second", *behind]:
        write(msg_id)
    producer.flush(10)
    expected = ["second", *behind]
    frames = [client.expect(lambda f: f["op"] == "message", timeout=30)["id"] for _ in expected]
    frames += [f["id"] for f in client.drain(1) if f["op"] == "message"]  # a late duplicate shows here
    history = history_of(stack, [channel])[channel]
    order = {msg_id: rank for rank, msg_id in enumerate(["first", *expected])}
    figures = {"test": "id written twice", "records": 54, "delivered": len(set(frames)),
               "duplicated": len(frames) - len(set(frames)), "reordered": inversions([frames], order),
               "history": len(history), "history_reordered": inversions([history], order),
               "forced": forced_passes(worker), "in_flight": settled_in_flight(stack)}
    print("\nFAULT-FIGURES " + json.dumps(figures))
    assert frames == expected, figures
    assert history == ["first", *expected], figures
    assert figures["forced"] == 0 and figures["in_flight"] == 0, figures
    client.close()
