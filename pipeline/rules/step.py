"""The worker's rules step: the set in force applied to a batch (docs/guide.md: "Rules").

Each message not decided yet is evaluated once: its data redacted, the
decision attached (`Envelope.rules`), a blocked one rejected; matches are
counted (`herald_rule_matches_total`) and `rate` conditions count in Redis
windows shared by every worker. `dry_run` decides for one message without
any of these side effects.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import cast

from prometheus_client import Counter

from pipeline.core.messages import Envelope
from pipeline.rules.engine import Context, RuleSet, redacted
from pipeline.rules.repository import RulesStore

log = logging.getLogger("herald.rules")
MATCHES = Counter("herald_rule_matches_total", "Messages a rule matched, per rule and action", ["rule", "action"])


class RulesStep:
    """Applies the rule set `rules` keeps in force to a worker's batches."""

    def __init__(self, rules: RulesStore):
        self.rules = rules
        self.store = rules.store
        self._version: int | None = None  # the version whose rules _match_counters holds
        self._match_counters: dict[tuple[str, str], Counter] = {}  # (rule, action): MATCHES child

    def current(self) -> RuleSet | None:
        """The compiled set in force (RulesStore.current: it raises RulesUnavailable
        while none can be compiled)."""
        return self.rules.current()

    def apply(self, envelopes: list[Envelope]) -> tuple[list[Envelope], dict | None]:
        """Evaluate the rules once for each message not decided yet: redact its data,
        attach the decision (`Envelope.rules`), and reject a blocked one, which then
        only passes its channel's order gate (`skip`).

        Returns the envelopes and the record that marks those no rule matched
        (None when there are no rules). These come back as they were: the
        caller marks them with `Envelope.with_rules(record)` before they reach
        their gate, so that a record parked there, or retried, keeps this
        decision and is not evaluated again, perhaps under another version.
        """
        rule_set = self.current()
        if rule_set is None:
            return envelopes, None
        context = Context(time.time(), self._count)
        out = []
        matches: dict[tuple[str, str], int] = {}
        blocked: list[tuple[Envelope, str]] = []
        for envelope in envelopes:
            if envelope.rules is not None or envelope.skip:
                out.append(envelope)
                continue
            decision = rule_set.evaluate(envelope, context)
            if decision is None:
                out.append(envelope)
                continue
            for pair in decision.matched:
                matches[pair] = matches.get(pair, 0) + 1
            data = redacted(envelope.data, decision.redact) if decision.redact else envelope.data
            # Envelope.rules is the Record as plain JSON (pipeline.core cannot name the type).
            record = cast(dict, decision.record())
            envelope = replace(envelope, data=data, rules=record, skip=decision.block is not None)
            if decision.block:
                blocked.append((envelope, decision.block))
            out.append(envelope)
        if blocked:
            self.store.mark_rejected(blocked)  # one round trip for the batch
            for envelope, rule in blocked:
                log.info("message blocked", extra={"message_id": envelope.id, "channel": envelope.channel,
                                                   "rule": rule})
        self._count_matches(rule_set.version, matches)
        return out, {"v": rule_set.version}

    def _count_matches(self, version: int, matches: dict[tuple[str, str], int]) -> None:
        # One increment per (rule, action) and batch, on a child looked up once
        # per version: MATCHES.labels() per match is a lock and a dict lookup each time.
        if version != self._version:
            self._version = version
            self._match_counters.clear()  # this version's rules only
        for pair, count in matches.items():
            child = self._match_counters.get(pair)
            if child is None:
                child = self._match_counters[pair] = MATCHES.labels(*pair)
            child.inc(count)

    def _count(self, parts: tuple[str, str, str], per: float, member: str) -> int:
        return self.store.count_in_window(self.store.keys.rate(*parts), per, member)


def dry_run(rule_set: RuleSet, envelope: Envelope, store=None) -> dict:
    """What `rule_set` decides for `envelope`, without side effects: rate windows are
    only read (from `store` when given, else they never match)."""
    def read_only(parts, per, member):
        return store.count_in_window(store.keys.rate(*parts), per, member, record=False)

    context = Context(time.time(), read_only if store is not None else None)
    decision = rule_set.evaluate(envelope, context)
    if decision is None:
        return {"version": rule_set.version, "matched": [], "blocked": None, "data": envelope.data}
    record = decision.record()
    return {"version": rule_set.version, "matched": record.get("matched", []), "blocked": decision.block,
            "alerts": decision.alerts, "routes": record.get("route", []), "tags": decision.tags,
            "data": redacted(envelope.data, decision.redact) if decision.redact else envelope.data}
