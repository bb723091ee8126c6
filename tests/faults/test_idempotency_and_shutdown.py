"""The same id posted concurrently over two web processes; SIGTERM to every process under load."""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid

from tests.faults.conftest import start_collector
from tests.faults.load import (
    Publisher,
    assert_exactly_once,
    history_of,
    report,
    wait_for_delivery,
)
from tests.harness import read_topic


def test_same_id_posted_50_times_concurrently_over_two_web_processes(make_stack, channel):
    stack = make_stack()
    stack.worker()
    stack.bridge()
    webs = [stack.web("web1"), stack.web("web2")]
    token = stack.token()
    client = webs[0].ws(token)
    client.recv()
    client.subscribe(channel)
    msg_id = f"once-{uuid.uuid4().hex[:8]}"

    def post(n):
        headers = {"Idempotency-Key": msg_id} if n % 2 else {}
        body = {"channel": channel, "data": "only once"} | ({} if n % 2 else {"id": msg_id})
        return webs[n % 2].request("POST", "/api/v1/messages", body, token=token, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, range(50)))
    assert {status for status, _, _ in answers} == {202}, [a[2] for a in answers if a[0] != 202]
    bodies = {json.dumps(body, sort_keys=True) for _, _, body in answers}
    assert len(bodies) == 1
    frame = client.expect(lambda f: f["op"] == "message")
    assert frame["id"] == msg_id
    # Two more seconds of reading: a second delivery, were there one, shows here.
    extra = [f for f in client.drain(2) if f["op"] == "message"]
    # Kafka records carry the id scoped to its sender (docs/design.md: "Message ids"), as the answers say.
    global_id = answers[0][2]["global_id"]
    records = [r for r in read_topic(stack, stack.settings.topic) if json.loads(r.value())["id"] == global_id]
    history = history_of(stack, [channel])[channel].count(msg_id)
    assert extra == [] and len(records) == 1 and history == 1
    print("\nFAULT-FIGURES " + json.dumps({"test": "idempotency race", "posts": 50, "distinct_answers": len(bodies),
                                           "kafka_records": len(records), "deliveries": 1 + len(extra),
                                           "in_history": history}))
    client.close()


def test_sigterm_every_process_under_load_then_restart(make_stack, channels):
    stack = make_stack(persistent_redis=True)
    worker = stack.worker()
    bridge = stack.bridge()
    web = stack.web()
    token = stack.token()
    collector = start_collector([web], token, channels)
    publisher = Publisher([web], token, channels, count=1000, rate=100, give_up_after=90)
    publisher.start()
    time.sleep(3)
    exits = {}
    for name, proc in (("web", web.proc), ("bridge", bridge), ("worker", worker)):
        exits[name] = round(proc.stop(timeout=40), 2)
    time.sleep(1)
    worker.start()
    worker.wait_for_log(r"ready\.", 60)
    bridge.start()
    web.restart()
    publisher.join()
    wait_for_delivery(collector, publisher, timeout=120)
    collector.stop()
    figures = report("sigterm all", publisher, collector, history_of(stack, channels), exit_seconds=exits)
    assert all(seconds < 30 for seconds in exits.values()), exits
    assert_exactly_once(figures)
