"""Rules cannot hurt anyone else's traffic: a message no rule test can raise on,
and rule sets refused up front or, stored behind Herald's back, reported while the last good
set goes on applying. On both brokers: lost 0, duplicated 0, reordered 0."""

from __future__ import annotations

import collections
import time
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools import embedded
from tests.faults.conftest import start_collector
from tests.faults.load import (
    Publisher,
    assert_exactly_once,
    history_of,
    report,
    settled_in_flight,
    wait_for_delivery,
)
from tests.harness import wait_until

# docs/guide.md's example (Rules), without its night window so the test holds at any hour,
# and a redact rule on another namespace.
RULES = """
rules:
  - id: high_value_block
    condition: {channel: 'pay:*', amount_threshold: 50000}
    action: block_and_alert
  - id: no_cards
    condition: {channel: 'nest:*'}
    action: {redact: [data.card]}
"""
HUGE = 10**400  # float() of it raises OverflowError: a numeric test must not convert
DEPTH = 200  # levels of data under the redact rule (copy.deepcopy raises past ~500)
BATCHES = 5  # a phase's batch POSTs: 40 ordinary messages and the two bad ones each
DELIVERY_BOUND = 30.0  # seconds for every ordinary message: a lost batch waits out sweeps and order gates


def nested(depth: int, leaf) -> dict:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


class Traffic:
    """Batch POSTs of ordinary messages over the channels, each with a huge amount on a
    pay: channel and deep data holding a card on a nest: channel; keeps what was accepted
    in publish order (what `report` reads) and what became of the bad ones."""

    def __init__(self, web, token, channels):
        self.web, self.token, self.channels = web, token, channels
        self.tag = uuid.uuid4().hex[:8]
        self.accepted: dict[str, dict] = {}  # to be delivered once, in this order
        self.published = 0
        self.refused: dict = {}
        self.blocked: list[str] = []  # huge amounts: blocked and alerted, never delivered
        self.redacted: list[str] = []  # deep data: delivered without its card
        self.refused_at_ingest: collections.Counter = collections.Counter()  # a bad one refused with a 4xx: allowed
        self.n = 0

    def batch(self) -> None:
        items, kinds = [], []
        pay = [c for c in self.channels if c.startswith("pay:")]
        nest = [c for c in self.channels if c.startswith("nest:")]
        for index in range(42):
            msg_id = f"{self.tag}-{self.n:05d}"
            self.n += 1
            if index == 13:
                items.append({"id": msg_id, "channel": pay[self.n % len(pay)], "data": {"amount": HUGE}})
                kinds.append("huge")
            elif index == 27:
                items.append({"id": msg_id, "channel": nest[self.n % len(nest)],
                              "data": {"card": "4111", "x": nested(DEPTH, "leaf")}})
                kinds.append("deep")
            else:
                items.append({"id": msg_id, "channel": self.channels[self.n % len(self.channels)],
                              "data": {"n": self.n, "amount": self.n}})
                kinds.append("ordinary")
        self.published += len(items)
        status, _, answer = self.web.request("POST", "/api/v1/messages/batch", {"messages": items},
                                             token=self.token, timeout=30)
        if status != 202:  # an ingest that refuses a bad message refuses its batch: send them apart
            assert 400 <= status < 500, answer
            for item, kind in zip(items, kinds):
                if kind != "ordinary":
                    single, _, body = self.web.request("POST", "/api/v1/messages", item, token=self.token,
                                                       timeout=30)
                    assert 400 <= single < 500, body
                    self.refused_at_ingest[kind] += 1
            kept = [(item, kind) for item, kind in zip(items, kinds) if kind == "ordinary"]
            status, _, answer = self.web.request("POST", "/api/v1/messages/batch",
                                                 {"messages": [item for item, _ in kept]}, token=self.token,
                                                 timeout=30)
            items, kinds = [item for item, _ in kept], [kind for _, kind in kept]
        assert status == 202, answer
        for item, kind, result in zip(items, kinds, answer["results"]):
            if result.get("status") != "accepted":
                assert kind != "ordinary" and 400 <= result["status"] < 500, result
                self.refused_at_ingest[kind] += 1
            elif kind == "huge":
                self.blocked.append(item["id"])
            else:
                self.accepted[item["id"]] = result
                if kind == "deep":
                    self.redacted.append(item["id"])


def metrics(port: int) -> dict[str, float]:
    """The worker's /metrics, unlabelled samples by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def deep_not(depth: int) -> bytes:
    return ('{"rule": {"id": "deep", "condition": ' + '{"not": ' * depth + '{}' + "}" * depth
            + ', "action": "block"}}').encode()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_bad_messages_under_rules_and_bad_rule_sets_hurt_no_other_traffic(make_stack, broker):
    stack = make_stack(broker=broker)
    metrics_port = embedded.free_port()
    worker = stack.worker(HERALD_METRICS_PORT=metrics_port)
    stack.bridge()
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    tag = uuid.uuid4().hex[:6]
    channels = [f"{space}:{tag}-{i}" for space in ("pay", "nest") for i in range(4)]
    status, _, answer = web.request("PUT", "/api/v1/rules", raw=RULES.encode(), content_type="application/yaml",
                                    token=admin)
    assert status == 200, answer
    good = answer["version"]
    # Sets the workers could not run are refused whole, up front, and nothing changes.
    for body, error in (
            (b'{"rule": {"id": "m", "condition": {}, "action": {"redact": {"fields": ["data.card"], '
             b'"mask": "\\ud800"}}}}', "rule.action.redact.mask: holds text that is not valid Unicode"),
            (deep_not(600), "rule.condition" + ".not" * 30 + ": nests deeper than 32 levels")):
        status, _, answer = web.request("PUT", "/api/v1/rules", raw=body, content_type="application/json",
                                        token=admin)
        assert status == 422 and answer["errors"][0]["error"].startswith(error), answer
    assert web.request("GET", "/api/v1/rules", token=admin)[2]["version"] == good
    time.sleep(1.5)  # every worker applies a version within 1 s

    collector = start_collector([web], token, channels)
    traffic = Traffic(web, token, channels)
    started = time.monotonic()
    for _ in range(BATCHES):
        traffic.batch()
        time.sleep(0.2)
    wait_for_delivery(collector, traffic, timeout=DELIVERY_BOUND)
    first_phase = round(time.monotonic() - started, 2)

    # A set that cannot compile, written into Redis behind Herald's back (an older
    # Herald, a hand): reported, and the last good set goes on applying.
    store = stack.store()
    bad = store.redis.hincrby(store.keys.rules, "version", 1)
    store.redis.hset(store.keys.rules, "doc", deep_not(600))
    store.redis.publish(store.keys.rules_notice, bad)
    started = time.monotonic()
    for _ in range(BATCHES):
        traffic.batch()
        time.sleep(0.2)
    wait_for_delivery(collector, traffic, timeout=DELIVERY_BOUND)
    second_phase = round(time.monotonic() - started, 2)
    collector.stop()

    figures = metrics(metrics_port)
    result = report(f"poison under rules ({broker})", traffic, collector, history_of(stack, channels),
                    in_flight=settled_in_flight(stack), blocked=len(traffic.blocked),
                    redacted=len(traffic.redacted), refused_at_ingest=dict(traffic.refused_at_ingest),
                    compile_failures=figures.get("herald_rules_compile_failures_total"),
                    seconds=[first_phase, second_phase])
    assert_exactly_once(result)
    # The rules' effects on the bad messages: blocked and alerted once each, redacted.
    for msg_id in traffic.blocked:
        answer = web.request("GET", f"/api/v1/messages/{msg_id}", token=token)[2]
        assert answer["status"] == "rejected" and answer["rule"] == "high_value_block", answer
        assert not collector.seen[msg_id]

    def alerts():
        return web.request("GET", f"/api/v1/channels/{stack.settings.rules_alert_channel}/history?limit=1000",
                           token=token)[2]["messages"]

    wait_until(lambda: len(alerts()) >= len(traffic.blocked), 30, 0.2, "an alert for each blocked message")
    assert sorted(a["data"]["message"]["id"] for a in alerts()) == sorted(traffic.blocked)
    assert all(a["data"]["message"]["data"] == {"amount": HUGE} and a["data"]["blocked"] for a in alerts())
    for msg_id in traffic.redacted:
        answer = web.request("GET", f"/api/v1/messages/{msg_id}", token=token)[2]
        assert answer["status"] == "delivered" and answer["data"] == {"x": nested(DEPTH, "leaf")}, msg_id
    # The bad set was reported, once per worker process, and not applied.
    assert "rules not applied: the stored set cannot be compiled" in worker.log()
    assert figures.get("herald_rules_compile_failures_total", 0) >= 1 and figures["herald_rules_version"] == good
    # Every bad message accounted for: refused at ingest, or handled by its rule.
    assert len(traffic.blocked) + traffic.refused_at_ingest["huge"] == 2 * BATCHES
    assert len(traffic.redacted) + traffic.refused_at_ingest["deep"] == 2 * BATCHES


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_worker_started_under_a_set_it_cannot_compile_runs_nothing_without_the_policy(make_stack, channels,
                                                                                        broker):
    stack = make_stack(broker=broker)
    store = stack.store()
    bad = store.redis.hincrby(store.keys.rules, "version", 1)  # there before any worker
    store.redis.hset(store.keys.rules, "doc", deep_not(600))
    worker = stack.worker()
    stack.bridge()
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    collector = start_collector([web], token, channels)
    publisher = Publisher([web], token, channels, count=200, rate=100)
    publisher.start()
    publisher.join()
    # The worker has taken the messages up: it retries them (or, without the policy, delivers them).
    wait_until(lambda: "retrying" in worker.log() or collector.seen, 30, 0.1, "the worker to take messages up")
    time.sleep(1.0)
    held = sum(collector.seen.values())  # delivered without the policy: none may be
    status, _, answer = web.request("PUT", "/api/v1/rules", raw=b"rule: {id: checked, condition: {}, "
                                    b"action: {tag: checked}}", content_type="application/yaml", token=admin)
    assert status == 200 and answer["version"] == bad + 1, answer
    wait_for_delivery(collector, publisher, timeout=DELIVERY_BOUND)
    collector.stop()
    tagged = sum(1 for channel in channels for message in store.history(channel, None, 1000)["messages"]
                 if message.get("tags") == ["checked"])
    untagged = len(publisher.accepted) - tagged  # delivered without the policy, or not at all
    figures = report(f"worker with no compilable set ({broker})", publisher, collector,
                     history_of(stack, channels), in_flight=settled_in_flight(stack), held_back_delivered=held,
                     untagged=untagged)
    assert_exactly_once(figures)
    assert held == 0 and untagged == 0
    assert "rules not applied: the stored set cannot be compiled" in worker.log()
    assert "RulesUnavailable" in worker.log()  # why its batches were retried


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_worker_waiting_for_a_set_it_can_compile_dead_letters_nothing_however_long_it_waits(make_stack, channels,
                                                                                              broker):
    stack = make_stack(broker=broker)
    store = stack.store()
    bad = store.redis.hincrby(store.keys.rules, "version", 1)  # there before any worker
    store.redis.hset(store.keys.rules, "doc", deep_not(600))
    # One retry of at most 0.1 s: the wait below is many retry budgets long, and no
    # message may be dead-lettered for it (the wait does not count against its retries).
    worker = stack.worker(HERALD_RETRY_MAX=1, HERALD_RETRY_BASE_DELAY=0.05, HERALD_RETRY_MAX_DELAY=0.1)
    stack.bridge()
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    collector = start_collector([web], token, channels)
    publisher = Publisher([web], token, channels, count=200, rate=100)
    publisher.start()
    publisher.join()
    wait_until(lambda: "RulesUnavailable" in worker.log() or collector.seen, 30, 0.1,
               "the worker to take messages up")
    time.sleep(3.0)  # thirty retry budgets
    held = sum(collector.seen.values())
    dead = store.redis.zcard(store.keys.dead_letter_index)
    status, _, answer = web.request("PUT", "/api/v1/rules", raw=b"rule: {id: checked, condition: {}, "
                                    b"action: {tag: checked}}", content_type="application/yaml", token=admin)
    assert status == 200 and answer["version"] == bad + 1, answer
    wait_for_delivery(collector, publisher, timeout=DELIVERY_BOUND)
    collector.stop()
    figures = report(f"worker waiting for a set past its retry budget ({broker})", publisher, collector,
                     history_of(stack, channels), in_flight=settled_in_flight(stack), held_back_delivered=held,
                     dead_letters=dead, dead_letters_after=store.redis.zcard(store.keys.dead_letter_index))
    assert_exactly_once(figures)
    assert held == 0 and dead == 0 and store.redis.zcard(store.keys.dead_letter_index) == 0
