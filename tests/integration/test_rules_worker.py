"""The worker's rules step (RulesStep.apply inside Processor.run) against a real Redis:
what it counts, marks and emits, and that a batch run again changes nothing."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from prometheus_client import REGISTRY

from pipeline import rules
from pipeline.core.messages import Envelope, decode
from pipeline.core.settings import Settings
from pipeline.rules.repository import VERSION_CHECK, RulesStore, RulesUnavailable
from pipeline.rules.step import RulesStep
from pipeline.store import Store, connect
from tasks.processor import Processor, RetryLater
from tests.harness import redis_cluster


class _NoArchive:
    def store(self, envelopes):
        pass

    def record_offsets(self, placed):
        pass


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    """A three-node Redis Cluster of this module's own."""
    servers, url = redis_cluster(tmp_path_factory.mktemp("rules-cluster"))
    try:
        yield url
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(params=["redis", "cluster"])
def worker(request, spare_redis_url):
    """(Processor with a RulesStep, its RulesStore, Store) on a prefix of its own, on one Redis and
    on a Redis Cluster (where a batch's scripts go to the nodes of their keys' slots)."""
    env = {"HERALD_SECRET_KEY": "k" * 32, "REDIS_URL": spare_redis_url,
           "HERALD_REDIS_PREFIX": f"r{uuid.uuid4().hex[:8]}"}
    if request.param == "cluster":
        # No worker runs here: the broker is named only because a cluster needs one apart.
        env.update(REDIS_URL=request.getfixturevalue("cluster_url"), REDIS_CLUSTER="1",
                   CELERY_BROKER_URL=spare_redis_url)
    settings = Settings.from_env(env)
    store = Store(connect(settings, 8), settings)  # two RulesStores: a listener each
    rules_store = RulesStore(store, settings)
    yield Processor(settings, store, _NoArchive(), None, RulesStep(rules_store)), rules_store, store
    if store.cluster:  # a node's client leaves its pool open when closed
        for node in store.redis.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
    store.redis.close()


def batch(channel: str, amounts: list, offset0: int = 0) -> list[Envelope]:
    """One channel's messages in offset order, `data.amount` each."""
    return [Envelope(f"m{offset0 + n}-{uuid.uuid4().hex[:6]}", channel, "payment", {"amount": amount}, "s", 0,
                     partition=0, offset=offset0 + n, prev=offset0 + n - 1 if offset0 + n else None)
            for n, amount in enumerate(amounts)]


def history(store: Store, channel: str) -> list[dict]:
    return store.history(channel, None, 1000)["messages"]


def matches(rule: str, action: str) -> float:
    return REGISTRY.get_sample_value("herald_rule_matches_total", {"rule": rule, "action": action}) or 0.0


def test_matches_are_counted_once_per_rule_action_and_message(worker):
    processor, rules_store, _store = worker
    tag = uuid.uuid4().hex[:6]
    rules_store.put(rules.load(f"""
rules:
  - {{id: big-{tag}, condition: {{amount_threshold: 100}}, action: [alert, {{tag: big}}]}}
  - {{id: any-{tag}, condition: {{}}, action: {{tag: seen}}}}
"""))
    channel = f"pay:{tag}"
    envelopes = batch(channel, [5, 500, 700, 1])
    processor.run(envelopes)
    assert matches(f"big-{tag}", "alert") == 2 and matches(f"big-{tag}", "tag") == 2
    assert matches(f"any-{tag}", "tag") == 4


def test_alerts_and_routes_of_a_batch_are_delivered_once_even_when_it_runs_again(worker):
    processor, rules_store, store = worker
    tag = uuid.uuid4().hex[:6]
    alerts, copy = store.settings.rules_alert_channel, f"audit:{tag}"
    rules_store.put(rules.load(f"""
rules:
  - {{id: big, condition: {{amount_threshold: 100}}, action: [alert, {{route: '{copy}'}}]}}
  - {{id: huge, priority: -1, condition: {{amount_threshold: 1000}}, action: block_and_alert}}
  - {{id: odd, condition: {{field: data.note, exists: true}}, action: alert}}
"""))
    channel = f"pay:{tag}"
    envelopes = batch(channel, [5, 500, 5000, 7, 600])
    envelopes[3] = Envelope(envelopes[3].id, channel, "payment", {"amount": 7, "note": 'é "quoted" \\ \u2028'}, "s",
                            0, partition=0, offset=3, prev=2)
    outcome = processor.run(envelopes)
    assert outcome.delivered == 4 and outcome.skipped == 1  # 5000 was blocked
    expected = [(envelopes[1].id, "big", False), (envelopes[2].id, "big", False), (envelopes[2].id, "huge", True),
                (envelopes[3].id, "odd", False), (envelopes[4].id, "big", False)]
    got = history(store, alerts)
    assert [(a["data"]["message"]["id"], a["data"]["rule"], a["data"]["blocked"]) for a in got] == expected
    for frame, (msg_id, rule, _blocked) in zip(got, expected):
        assert frame["id"] == f"{msg_id}:alert:{rule}" and frame["type"] == "rule.alert"
        assert frame["channel"] == alerts and frame["sender"] == "herald" and isinstance(frame["ts"], int)
        assert frame["data"]["message"] == {k: v for k, v in json.loads(json.dumps(
            next(e for e in envelopes if e.id == msg_id).to_wire())).items()
            if k in ("id", "channel", "type", "data", "sender", "ts")}
    assert got[2]["data"]["matched"] == [["big", "alert"], ["big", "route"], ["huge", "block_and_alert"]]
    assert got[3]["data"]["message"]["data"]["note"] == 'é "quoted" \\ \u2028'
    # The blocked message is not routed; the others are, once each, in order.
    assert [m["id"] for m in history(store, copy)] == [envelopes[1].id, envelopes[4].id]

    again = processor.run(envelopes)  # the task's records again (a worker died)
    assert again.delivered == 0
    assert len(history(store, alerts)) == len(expected) and len(history(store, copy)) == 2
    # Run again by a worker on a newer version that alerts on everything: a message
    # that raised its alerts raises none from the second evaluation.
    rules_store.put(rules.load("rule: {id: every, condition: {}, action: alert}"))
    fresh = Processor(store.settings, store, _NoArchive(), None, RulesStep(RulesStore(store, store.settings)))
    fresh.run(envelopes[1:])
    assert len(history(store, alerts)) == len(expected)


def test_a_message_is_decided_once_matched_or_not_and_every_record_run_again_keeps_its_decision(worker,
                                                                                             monkeypatch):
    processor, rules_store, store = worker
    tag = uuid.uuid4().hex[:6]
    first = rules_store.put(rules.load(f"rule: {{id: big-{tag}, condition: {{amount_threshold: 100}}, "
                                       "action: {tag: big}}"))
    channel = f"pay:{tag}"
    envelopes = batch(channel, [5, 500])
    decided = {"v": first}, {"v": first, "matched": [[f"big-{tag}", "tag"]], "tags": ["big"]}
    # A retry: Redis fails at delivery; what the task sends again carries the decisions.
    def failing_deliver(*_args, **_kwargs):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(store, "deliver", failing_deliver)
    with pytest.raises(RetryLater) as retry:
        processor.run(envelopes)
    monkeypatch.undo()
    assert [e.rules for e in retry.value.remaining] == list(decided)
    assert [e.rules for e in envelopes] == [None, None]  # the task's own records are left as they were
    # Waiting for a predecessor that has not come: each record is parked with its decision.
    late = batch(channel, [7, 900], offset0=10)
    assert processor.run(late).parked == 2
    parked = store.redis.hgetall(store.keys.parked(channel))
    assert [decode(parked[prev]).rules for prev in ("9", "10")] == [
        {"v": first}, {"v": first, "matched": [[f"big-{tag}", "tag"]], "tags": ["big"]}]
    # A new version that would match them all: the decided records keep the decision
    # they had (a tag of the old set, no alert); the new version applies to new records.
    rules_store.put(rules.load(f"rule: {{id: all-{tag}, condition: {{}}, action: [alert, {{tag: new}}]}}"))
    fresh = Processor(store.settings, store, _NoArchive(), None, RulesStep(RulesStore(store, store.settings)))
    assert fresh.run(retry.value.remaining).delivered == 2
    assert [m.get("tags") for m in history(store, channel)] == [None, ["big"]]
    assert history(store, store.settings.rules_alert_channel) == []
    newer = batch(channel, [1], offset0=2)
    assert fresh.run(newer).delivered == 1
    assert history(store, channel)[-1]["tags"] == ["new"]
    assert len(history(store, store.settings.rules_alert_channel)) == 1


def test_the_blocked_messages_of_a_batch_are_rejected_naming_their_rule_and_the_rest_delivered_in_order(worker):
    processor, rules_store, store = worker
    tag = uuid.uuid4().hex[:6]
    rules_store.put(rules.load(f"""
rules:
  - {{id: big-{tag}, condition: {{amount_threshold: 100}}, action: block}}
  - {{id: odd-{tag}, condition: {{field: data.amount, in: [3, 5]}}, action: block_and_alert}}
"""))
    channel = f"pay:{tag}"
    envelopes = batch(channel, [1, 500, 3, 2, 700, 5, 4])
    outcome = processor.run(envelopes)
    assert (outcome.delivered, outcome.skipped) == (3, 4)
    statuses = [store.get_message(e.id) for e in envelopes]
    assert [s["status"] for s in statuses] == ["delivered", "rejected", "rejected", "delivered", "rejected",
                                               "rejected", "delivered"]
    for status, rule in zip([statuses[i] for i in (1, 2, 4, 5)], ["big", "odd", "big", "odd"]):
        assert status["rule"] == f"{rule}-{tag}" and status["error"] == f"blocked by rule {rule}-{tag}"
        assert status["channel"] == channel
    assert [m["id"] for m in history(store, channel)] == [envelopes[i].id for i in (0, 3, 6)]


# A set PUT refuses (nested past rules.MAX_DEPTH), as an older Herald or a hand could store it.
UNCOMPILABLE = '{"rules": [{"id": "deep", "enabled": true, "priority": 0, "action": ["block"], "condition": ' + \
    '{"not": ' * 600 + '{}' + '}' * 600 + '}]}'


def store_directly(store: Store, doc: str) -> int:
    """Write a rule set into Redis as PUT would, without its checks; returns its version."""
    version = store.redis.hincrby(store.keys.rules, "version", 1)
    store.redis.hset(store.keys.rules, "doc", doc)
    return version


def failures() -> float:
    return REGISTRY.get_sample_value("herald_rules_compile_failures_total") or 0.0


def test_a_stored_set_that_cannot_compile_is_reported_once_and_the_last_compiled_set_kept(worker, caplog):
    processor, rules_store, store = worker
    tag = uuid.uuid4().hex[:6]
    good = rules_store.put(rules.load(f"rule: {{id: big-{tag}, condition: {{amount_threshold: 100}}, "
                                      "action: block}"))
    channel = f"pay:{tag}"
    assert processor.run(batch(channel, [5, 500])).skipped == 1
    before = failures()
    bad = store_directly(store, UNCOMPILABLE)
    time.sleep(VERSION_CHECK + 0.1)
    for offset in (2, 4):  # two batches, one report
        outcome = processor.run(batch(channel, [7, 700], offset0=offset))
        assert (outcome.delivered, outcome.skipped) == (1, 1)  # still under the good set
        time.sleep(VERSION_CHECK + 0.1)
    assert [m["rules"]["v"] for m in history(store, channel) if "rules" in m] in ([], [good] * 3)
    assert REGISTRY.get_sample_value("herald_rules_version") == good
    assert failures() == before + 1
    reports = [r for r in caplog.records if r.getMessage() == "rules not applied: the stored set cannot be compiled"]
    assert len(reports) == 1 and reports[0].levelname == "ERROR"
    assert (reports[0].version, reports[0].applied_version) == (bad, good)
    assert reports[0].error == "rules[0].condition" + ".not" * 29 + f": {rules.TOO_DEEP}"
    newer = rules_store.put(rules.load("rules: []"))  # a good set again: applied
    time.sleep(VERSION_CHECK + 0.1)
    assert processor.run(batch(channel, [9000], offset0=6)).delivered == 1
    assert REGISTRY.get_sample_value("herald_rules_version") == newer


def test_a_worker_that_compiled_no_set_holds_its_messages_until_one_compiles(worker):
    processor, _rules_store, store = worker
    tag = uuid.uuid4().hex[:6]
    version = store_directly(store, UNCOMPILABLE)
    # a restart:
    fresh = Processor(store.settings, store, _NoArchive(), None, RulesStep(RulesStore(store, store.settings)))
    channel = f"pay:{tag}"
    envelopes = batch(channel, [5, 500])
    with pytest.raises(RetryLater) as retry:  # retried as when Redis is down, never run without the policy
        fresh.run(envelopes)
    assert isinstance(retry.value.cause, RulesUnavailable)
    assert str(retry.value.cause).startswith(f"the stored rule set (version {version}) cannot be compiled")
    assert history(store, channel) == [] and store.get_message(envelopes[0].id) is None
    RulesStore(store, store.settings).put(rules.load(f"rule: {{id: big-{tag}, condition: {{amount_threshold: 100}}, "
                                                     "action: block}"))
    time.sleep(VERSION_CHECK + 0.1)
    outcome = fresh.run(retry.value.remaining)
    assert (outcome.delivered, outcome.skipped) == (1, 1)


def test_a_stored_set_whose_compile_raises_anything_is_refused_as_one_that_does_not_compile(worker, monkeypatch,
                                                                                            caplog):
    processor, rules_store, store = worker
    tag = uuid.uuid4().hex[:6]
    good = rules_store.put(rules.load(f"rule: {{id: big-{tag}, condition: {{amount_threshold: 100}}, "
                                      "action: block}"))
    channel = f"pay:{tag}"
    assert processor.run(batch(channel, [5, 500])).skipped == 1
    compile_text = rules.compile_text

    def crashing(text, *args):
        # A compiler bug, or a RecursionError it does not turn into a RulesError, on this set only.
        if f"crash-{tag}" in str(text):
            raise RecursionError("maximum recursion depth exceeded")
        return compile_text(text, *args)

    monkeypatch.setattr(rules, "compile_text", crashing)
    before = failures()
    bad = store_directly(store, json.dumps({"rules": [{"id": f"crash-{tag}", "enabled": True, "priority": 0,
                                                       "action": ["block"], "condition": {}}]}))
    time.sleep(VERSION_CHECK + 0.1)
    for offset in (2, 4):  # every batch runs, under the good set: none raises the RecursionError
        outcome = processor.run(batch(channel, [7, 700], offset0=offset))
        assert (outcome.delivered, outcome.skipped) == (1, 1)
        time.sleep(VERSION_CHECK + 0.1)
    assert failures() == before + 1 and REGISTRY.get_sample_value("herald_rules_version") == good
    reports = [r for r in caplog.records if r.getMessage() == "rules not applied: the stored set cannot be compiled"]
    assert len(reports) == 1 and (reports[0].version, reports[0].applied_version) == (bad, good)
    assert reports[0].error == "RecursionError: maximum recursion depth exceeded"
