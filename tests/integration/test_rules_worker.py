"""The worker's rules step (RulesStore.apply inside Processor.run) against a real Redis:
what it counts, marks and emits, and that a batch run again changes nothing."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from pipeline import rules
from pipeline.messages import Envelope
from pipeline.processing import Processor
from pipeline.rules_store import RulesStore
from pipeline.settings import Settings
from pipeline.store import Store, connect


class _NoArchive:
    def store(self, envelopes):
        pass

    def record_offsets(self, placed):
        pass


@pytest.fixture
def worker(spare_redis_url):
    """(Processor with a RulesStore, RulesStore, Store) on a prefix of its own."""
    settings = Settings.from_env({"HERALD_SECRET_KEY": "k" * 32, "REDIS_URL": spare_redis_url,
                                  "HERALD_REDIS_PREFIX": f"r{uuid.uuid4().hex[:8]}"})
    store = Store(connect(settings, 2), settings)
    rules_store = RulesStore(store, settings)
    yield Processor(settings, store, _NoArchive(), None, rules_store), rules_store, store
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
    processor.run(envelopes, final_attempt=False)
    assert matches(f"big-{tag}", "alert") == 2 and matches(f"big-{tag}", "tag") == 2
    assert matches(f"any-{tag}", "tag") == 4
