"""One message cannot stop anyone else's traffic: a message that kills workers, or that
processing cannot handle, is dead-lettered alone; data the worker could not handle is
refused at ingest. Lost 0, duplicated 0, reordered 0 for everyone else."""

from __future__ import annotations

import collections
import json
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import Producer

from pipeline.core.ids import client_id
from pipeline.core.messages import MAX_DATA_DEPTH
from tests.faults.conftest import start_collector
from tests.faults.load import (
    assert_exactly_once,
    forced_passes,
    history_of,
    report,
    settled_in_flight,
    wait_for_delivery,
)
from tests.harness import ROOT, wait_until

POISON = Path(__file__).with_name("poison")
# Longer than every wait below: a channel whose gate did not move on could only
# pass by force after it, so a late message of the bad one's channel would be lost.
NEVER_FORCED = {"HERALD_ORDER_WAIT": 300}


def test_a_message_that_kills_workers_is_dead_lettered_and_the_rest_delivered(make_stack, channel):
    stack = make_stack(env={"HERALD_MAX_REDELIVERIES": 2})
    worker = stack.worker(PYTHONPATH=f"{POISON}:{ROOT}")
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    # Published before the bridge starts, so they reach the worker as one batch.
    ids = []
    for n in range(20):
        data = {"poison": True} if n == 7 else {"n": n}
        status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": data}, token=token)
        assert status == 202
        ids.append(answer["id"])
    poison = ids[7]
    stack.bridge()

    good = [i for i in ids if i != poison]
    seen = [client.expect(lambda f: f["op"] == "message", timeout=120)["id"] for _ in good]
    assert seen == good  # each good message once, in order; the poison one never
    letter = wait_until(lambda: (lambda p: p["total"] == 1 and p["items"][0])(
        web.request("GET", "/api/v1/dlq", token=admin)[2]), 60, 0.5, "the poison message in the DLQ")
    # Dead-lettered at its third death alone, past HERALD_MAX_REDELIVERIES=2.
    assert letter["id"] == poison and "worker died 3 times" in letter["reason"]
    message = web.request("GET", f"/api/v1/messages/{poison}", token=token)[2]
    assert message["status"] == "failed"
    history = web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"]
    assert [m["id"] for m in history] == good
    deaths = worker.log().count("exited with 'exitcode 137'")
    assert 3 <= deaths <= 4  # the poison message alone 3 times, after its batch (if it had one) once
    print("\nFAULT-FIGURES " + json.dumps({"test": "poison message", "published": len(ids), "delivered": len(seen),
                                           "dead_lettered": 1, "worker_deaths": deaths}))
    client.close()


def _published(ids: list[str]) -> SimpleNamespace:
    # What report() reads of a load.Publisher: the ids accepted, in publish order.
    return SimpleNamespace(accepted={i: None for i in ids}, published=len(ids), refused=collections.Counter())


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_message_processing_cannot_handle_is_dead_lettered_alone(make_stack, channels, broker):
    stack = make_stack(broker=broker, env=NEVER_FORCED)
    worker = stack.worker(PYTHONPATH=f"{POISON}:{ROOT}")
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    chosen = channels[:4]
    collector = start_collector([web], token, chosen)
    tag = uuid.uuid4().hex[:8]
    # One batch POST before the bridge starts: the bad message reaches a worker
    # in a batch with others of every channel, some of its own channel after it.
    items = [{"id": f"{tag}-{n:02d}", "channel": chosen[n % 4], "data": {"n": n}} for n in range(40)]
    bad = items[13]
    bad["data"] = {"raise": "ValueError"}
    status, _, answer = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token)
    assert status == 202 and all(r["status"] == "accepted" for r in answer["results"])
    good = [item["id"] for item in items if item is not bad]
    started = time.monotonic()
    stack.bridge()
    publisher = _published(good)
    wait_for_delivery(collector, publisher, timeout=60)
    seconds = round(time.monotonic() - started, 1)
    collector.stop()

    figures = report(f"message processing cannot handle ({broker})", publisher, collector,
                     history_of(stack, chosen), in_flight=settled_in_flight(stack), forced=forced_passes(worker),
                     seconds=seconds)
    page = web.request("GET", "/api/v1/dlq", token=admin)[2]
    assert [client_id(letter["id"]) for letter in page["items"]] == [bad["id"]]  # alone
    assert page["items"][0]["reason"].startswith("ValueError: injected for message")
    status = web.request("GET", f"/api/v1/messages/{bad['id']}", token=token)[2]
    assert status["status"] == "failed" and status["error"].startswith("ValueError")
    assert_exactly_once(figures)
    assert figures["forced"] == 0  # its channel's later messages passed because its gate moved on


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_message_whose_processing_fails_after_it_passed_its_gate_is_not_dead_lettered(make_stack, channels,
                                                                                        broker):
    stack = make_stack(broker=broker, env=NEVER_FORCED)
    worker = stack.worker(PYTHONPATH=f"{POISON}:{ROOT}")
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    chosen = channels[:4]
    collector = start_collector([web], token, chosen)
    tag = uuid.uuid4().hex[:8]
    items = [{"id": f"{tag}-{n:02d}", "channel": chosen[n % 4], "data": {"n": n}} for n in range(40)]
    late = items[13]
    late["id"] += "-offsets-fail"  # delivered, then recording its history offset raises
    status, _, answer = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token)
    assert status == 202 and all(r["status"] == "accepted" for r in answer["results"])
    started = time.monotonic()
    stack.bridge()
    publisher = _published([item["id"] for item in items])
    wait_for_delivery(collector, publisher, timeout=60)
    seconds = round(time.monotonic() - started, 1)
    wait_until(lambda: "injected after delivery" in worker.log(), 30, 0.2, "the failure after the gate")
    time.sleep(2.0)  # a dead letter, if one were coming, would be written by now
    collector.stop()
    page = web.request("GET", "/api/v1/dlq", token=admin)[2]
    figures = report(f"failure after the gate ({broker})", publisher, collector, history_of(stack, chosen),
                     in_flight=settled_in_flight(stack), forced=forced_passes(worker), seconds=seconds,
                     dead_letters=page["total"])
    # Delivered: a dead letter of it, replayed, would deliver it twice.
    assert page["total"] == 0 and "failed after passing its order gate; not dead-lettered" in worker.log()
    assert web.request("GET", f"/api/v1/messages/{late['id']}", token=token)[2]["status"] == "delivered"
    assert_exactly_once(figures)
    assert figures["forced"] == 0


@pytest.mark.parametrize("deaf", [False, True], ids=["soft limit", "hard limit"])
@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_message_that_hangs_its_task_is_dead_lettered_after_its_time_limits(make_stack, channels, broker, deaf):
    stack = make_stack(broker=broker, env={**NEVER_FORCED, "HERALD_TASK_TIME_LIMIT": 2,
                                           "HERALD_MAX_REDELIVERIES": 1})
    worker = stack.worker(PYTHONPATH=f"{POISON}:{ROOT}")
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    chosen = channels[:3]
    collector = start_collector([web], token, chosen)
    tag = uuid.uuid4().hex[:8]
    items = [{"id": f"{tag}-{n:02d}", "channel": chosen[n % 3], "data": {"n": n}} for n in range(15)]
    hung = items[4]
    hung["data"] = {"hang": 3600, "deaf": deaf}  # a rule in a catastrophic regex, say
    status, _, answer = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token)
    assert status == 202 and all(r["status"] == "accepted" for r in answer["results"])
    started = time.monotonic()
    stack.bridge()
    publisher = _published([item["id"] for item in items if item is not hung])
    wait_for_delivery(collector, publisher, timeout=90)
    seconds = round(time.monotonic() - started, 1)
    collector.stop()
    figures = report(f"message that hangs its task ({broker}, {'hard' if deaf else 'soft'} limit)", publisher,
                     collector, history_of(stack, chosen), in_flight=settled_in_flight(stack),
                     forced=forced_passes(worker), seconds=seconds,
                     soft_limits=worker.log().count("HERALD_TASK_TIME_LIMIT; handed back"),
                     hard_limits=worker.log().count("Hard time limit"))
    page = web.request("GET", "/api/v1/dlq", token=admin)[2]
    assert [client_id(letter["id"]) for letter in page["items"]] == [hung["id"]]
    # Its batch once, then alone twice: past HERALD_MAX_REDELIVERIES=1.
    assert "worker died 2 times" in page["items"][0]["reason"]
    assert web.request("GET", f"/api/v1/messages/{hung['id']}", token=token)[2]["status"] == "failed"
    assert_exactly_once(figures)
    assert figures["forced"] == 0


def _nested(depth: int, leaf=1):
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def _too_deep_raw(channel: str, depth: int) -> bytes:
    # Deeper than any JSON parser here takes (the stdlib's ~1,000, orjson's 1,024).
    return (f'{{"channel":"{channel}","data":' + "[" * depth + "]" * depth + "}").encode()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_data_past_the_ingest_bounds_is_refused_and_at_the_bounds_delivered(make_stack, channel, broker):
    stack = make_stack(broker=broker)
    worker = stack.worker()
    stack.bridge()
    web = stack.web()
    token = stack.token()
    collector = start_collector([web], token, [channel])
    tag = uuid.uuid4().hex[:8]
    at_limit = _nested(MAX_DATA_DEPTH)
    refused = {"700 deep": _nested(700), "limit + 1 deep": _nested(MAX_DATA_DEPTH + 1),
               "400 digits": {"amount": 10 ** 400}, "2**64": [2 ** 64], "-2**63 - 1": {"a": [-2 ** 63 - 1]}}
    fine = {"at the depth limit": at_limit, "2**64 - 1": {"amount": 2 ** 64 - 1}, "-2**63": [-2 ** 63]}
    published, answers = [], collections.Counter()

    def check_refusal(problem: dict, what: str) -> None:
        limit = str(MAX_DATA_DEPTH) if "deep" in what else "2**64-1"
        assert problem["status"] == 400 and limit in problem["detail"], (what, problem)
        answers["refused"] += 1

    for n, (name, data) in enumerate([*refused.items(), *fine.items()]):  # a single POST each
        msg_id = f"{tag}-s{n:02d}"
        status, _, body = web.request("POST", "/api/v1/messages", {"id": msg_id, "channel": channel, "data": data},
                                      token=token)
        if name in refused:
            check_refusal(body, name)
        else:
            assert status == 202, (name, body)
            published.append(msg_id)
    # Deeper than the parser goes (within HERALD_MAX_MESSAGE_BYTES): a 400, not a 500.
    status, _, problem = web.request("POST", "/api/v1/messages", raw=_too_deep_raw(channel, 30_000), token=token)
    check_refusal(problem, "30,000 deep")

    items = [{"id": f"{tag}-b{n:02d}", "channel": channel, "data": data}
             for n, data in enumerate([*refused.values(), *fine.values()])]
    status, _, answer = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token)
    assert status == 202
    for name, result in zip(refused, answer["results"]):
        check_refusal(result, name)
    assert [r["status"] for r in answer["results"][len(refused):]] == ["accepted"] * len(fine)
    published += [item["id"] for item in items[len(refused):]]
    status, _, problem = web.request("POST", "/api/v1/messages/batch", raw=_too_deep_raw(channel, 100_000),
                                     token=token)
    check_refusal(problem, "100,000 deep")

    client = web.ws(token)
    client.recv()
    for n, (name, data) in enumerate([*refused.items(), *fine.items()]):
        msg_id = f"{tag}-w{n:02d}"
        client.send({"op": "publish", "channel": channel, "data": data, "id": msg_id, "ref": msg_id})
        reply = client.expect(lambda f, msg_id=msg_id: f.get("ref") == msg_id)
        if name in refused:
            assert reply["op"] == "error" and reply["code"] == "data_out_of_bounds", (name, reply)
            check_refusal({"status": 400, "detail": reply["message"]}, name)
            # An op that succeeds: five refusals in a row close the socket (MAX_BAD_FRAMES).
            client.send({"op": "ping", "ref": f"{msg_id}-ping"})
            assert client.expect(lambda f, msg_id=msg_id: f.get("ref") == f"{msg_id}-ping")["op"] == "pong"
        else:
            assert reply["op"] == "ack", (name, reply)
            published.append(msg_id)
    client.close()

    # Records another producer wrote straight to the topic, past ingest: the
    # bridge dead-letters them (a worker's pool could not even take them).
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for n, data in enumerate([*refused.values(), *fine.values()]):
        record = {"id": f"{tag}-k{n:02d}", "channel": channel, "type": "message", "data": data, "sender": "raw",
                  "ts": 1}
        producer.produce(stack.settings.topic, key=channel, value=json.dumps(record))
        if n >= len(refused):
            published.append(record["id"])
    assert producer.flush(10) == 0

    publisher = _published(published)
    wait_for_delivery(collector, publisher, timeout=60)
    collector.stop()
    letters = web.request("GET", "/api/v1/dlq", token=stack.token("ops", admin=True))[2]["items"]
    figures = report(f"ingest bounds ({broker})", publisher, collector, history_of(stack, [channel]),
                     in_flight=settled_in_flight(stack), forced=forced_passes(worker),
                     refused_at_ingest=answers["refused"], dead_lettered_by_the_bridge=len(letters),
                     depth_limit=MAX_DATA_DEPTH)
    history = web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"]
    assert [m["data"] for m in history] == [*fine.values()] * 4  # as sent, at the very bounds
    assert answers["refused"] == 3 * len(refused) + 2
    assert len(letters) == len(refused)
    for letter in letters:
        check_refusal({"status": 400, "detail": letter["reason"]}, "deep" if "levels" in letter["reason"] else "")
    assert_exactly_once(figures)
