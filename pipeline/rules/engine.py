"""Compiling a validated rule set once per version, and deciding for one message.

`RuleSet(doc, version)` turns `validate`'s normal form (schema.py) into plain
closures, indexed by channel and type; `RuleSet.evaluate` returns a `Decision`
for one message, and `Decision.record()` the `Record` the message carries on
(`Envelope.rules`, JSON in Kafka and Celery). `redacted` applies a decision's
`redact` actions to a message's data.
"""

from __future__ import annotations

import datetime
import fnmatch
import operator
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict, cast

from pipeline.core.messages import Envelope
from pipeline.rules.reading import RulesError
from pipeline.rules.schema import (
    MISSING,
    NUMERIC,
    OPERATORS,
    compile_regex,
    is_number,
    names,
    time_of_day,
)
from pipeline.rules.validation import normal_actions

MATCH_LIMIT = 1000  # characters of a value a regex looks at: its first ones
MAX_CACHED_KINDS = 10_000  # (channel, type) pairs whose candidate rules a RuleSet remembers

Test = Callable[[Any, "Context"], bool]


class Context:
    """What one evaluation knows beyond the message: the time, and the rate counter.

    `count(key_parts, per, member)` returns how many messages the window of
    `per` seconds holds up to and including `member` (the worker's counts in
    Redis and remembers `member`; a dry run only reads); None runs no rate test.
    """

    __slots__ = ("now", "count", "_local")

    def __init__(self, now: float, count=None):
        self.now = now
        self.count = count
        self._local: dict = {}

    def seconds_of_day(self, zone: zoneinfo.ZoneInfo) -> int:
        """Seconds since midnight now, in `zone` (computed once per zone)."""
        seconds = self._local.get(zone)
        if seconds is None:
            moment = datetime.datetime.fromtimestamp(self.now, zone)
            seconds = self._local[zone] = moment.hour * 3600 + moment.minute * 60 + moment.second
        return seconds


def _getter(path: str) -> Callable[[Any], Any]:
    head, *rest = path.split(".")
    if not rest:
        return lambda envelope: getattr(envelope, head)
    if len(rest) == 1 and head == "data":
        key = rest[0]

        def one(envelope):
            data = envelope.data
            return data.get(key, MISSING) if isinstance(data, dict) else MISSING
        return one

    # A part of ASCII digits also indexes a list (data.items.0); worked out once here:
    # int() of other digits (`²` is one to isdigit) raises.
    steps = [(part, int(part) if part.isascii() and part.isdigit() else None) for part in rest]

    def deep(envelope):
        value = getattr(envelope, head)
        for part, index in steps:
            if isinstance(value, dict):
                value = value.get(part, MISSING)
            elif isinstance(value, list) and index is not None and index < len(value):
                value = value[index]
            else:
                return MISSING
        return value
    return deep


def _field_test(path: str, op: str, expected) -> Test:
    """The test `op` with `expected` of the message field at `path` (`data.amount`)."""
    get = _getter(path)
    if op == "exists":
        return (lambda e, c: get(e) is not MISSING) if expected else (lambda e, c: get(e) is MISSING)
    if op == "eq":
        return lambda e, c: _same(get(e), expected)
    if op == "ne":
        return lambda e, c: not _same(get(e), expected)
    if op in NUMERIC:
        # Python compares int with int, and int with float, exactly and without
        # converting: float(10**400) would raise, `10**400 > 50000.0` is True.
        compare = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}[op]
        bound = expected
        head, *rest = path.split(".")
        if head == "data" and len(rest) == 1:
            key = rest[0]
            # The usual shape (data.amount > N): the lookup inline, one call a test, not three.
            def numeric_data(e, c):
                data = e.data
                value = data.get(key) if isinstance(data, dict) else None
                return isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and compare(value, bound)
            return numeric_data

        def numeric(e, c):
            value = get(e)
            return is_number(value) and compare(value, bound)
        return numeric
    if op in ("in", "not_in"):
        options = list(expected)

        def inside(value) -> bool:
            return any(_same(value, o) for o in options)
        return (lambda e, c: inside(get(e))) if op == "in" else (lambda e, c: not inside(get(e)))
    if op == "contains":
        def contains(e, c):
            value = get(e)
            if isinstance(value, str):
                return isinstance(expected, str) and expected in value
            if isinstance(value, list):
                return any(_same(item, expected) for item in value)
            return False
        return contains
    regex, _problem = compile_regex(expected)

    def matches(e, c):
        value = get(e)
        if not isinstance(value, str):
            return False
        try:
            return regex.search(value[:MATCH_LIMIT]) is not None
        except UnicodeEncodeError:  # a lone surrogate: ingest refuses them, but a test never raises
            return False
    return matches


def _same(value, expected) -> bool:
    # True is not 1 here, as in JSON.
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    return value == expected


def _globs(patterns: list[str]) -> Callable[[str], bool]:
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda name: regex.match(name) is not None


def _compile_condition(cond: dict, rule_id: str, default_zone: str, *,
                       top: bool) -> tuple[list, frozenset | None, list[Test]]:
    """(channel globs, types or None for any, tests): a top-level condition's channel
    globs and types index the rule by channel and type (RuleSet._candidates); every
    other part is a test, cheap ones first, rate last."""
    globs: list[str] = []
    types: frozenset | None = None
    tests: list[Test] = []
    if "channel" in cond:
        if top:
            globs = _listed(cond["channel"])
        else:
            match = _globs(_listed(cond["channel"]))
            tests.append(lambda e, c: match(e.channel))
    if "type" in cond:
        if top:
            types = frozenset(_listed(cond["type"]))
        else:
            kinds = frozenset(_listed(cond["type"]))
            tests.append(lambda e, c: e.type in kinds)
    if "sender" in cond:
        senders = frozenset(_listed(cond["sender"]))
        tests.append(lambda e, c: e.sender in senders)
    if "field" in cond:
        tests += [_field_test(cond["field"], op, cond[op]) for op in OPERATORS if op in cond]
    if "amount_threshold" in cond:
        threshold = cond["amount_threshold"]
        spec = threshold if isinstance(threshold, dict) else {"min": threshold}
        tests.append(_field_test(spec.get("field", "data.amount"), "gte", spec["min"]))
    if "all" in cond:
        tests.append(_all([_whole(sub, rule_id, default_zone) for sub in cond["all"]]))
    if "any" in cond:
        tests.append(_any([_whole(sub, rule_id, default_zone) for sub in cond["any"]]))
    if "not" in cond:
        inner = _whole(cond["not"], rule_id, default_zone)
        tests.append(lambda e, c: not inner(e, c))
    if "time_range" in cond:
        zone = zoneinfo.ZoneInfo(cond.get("timezone") or default_zone)
        start, end = (time_of_day(t) for t in cond["time_range"])
        if start < end:
            tests.append(lambda e, c: start <= c.seconds_of_day(zone) < end)
        else:  # wraps midnight: [22:00, 06:00] is 22:00 to 23:59:59 and 00:00 to 05:59:59
            tests.append(lambda e, c: not end <= c.seconds_of_day(zone) < start)
    if "rate" in cond:
        rate = cond["rate"]
        limit, per, by = rate["max"], float(rate["per"]), rate.get("by", "sender")

        def over_rate(e, c):
            if c.count is None:
                return False
            return c.count((rule_id, by, e.sender if by == "sender" else e.channel), per, e.id) > limit
        tests.append(over_rate)
    return globs, types, tests


def _listed(value) -> list[str]:
    """A validated text or list of texts, as a list."""
    return names(value) or []


def _all(tests: list[Test]) -> Test:
    return lambda e, c: all(t(e, c) for t in tests)


def _any(tests: list[Test]) -> Test:
    return lambda e, c: any(t(e, c) for t in tests)


def _whole(cond: dict, rule_id: str, default_zone: str) -> Test:
    _globs_unused, _types_unused, tests = _compile_condition(cond, rule_id, default_zone, top=False)
    return tests[0] if len(tests) == 1 else _all(tests)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    id: str
    priority: int
    globs: Callable[[str], bool] | None  # None: any channel
    types: frozenset | None  # None: any type
    tests: tuple
    actions: tuple


class Record(TypedDict):
    """A decision as a message carries it (`Envelope.rules`): JSON in Kafka and Celery,
    read by delivery for its alerts, routes and tags. Only `v` is always there: the
    version that decided (alone, it marks a message no rule matched)."""

    v: int
    matched: NotRequired[list[list[str]]]  # [rule, action] for each action applied
    block: NotRequired[str]  # the rule that blocked it
    alert: NotRequired[list[str]]  # the rules that alert on it
    route: NotRequired[list[list[str]]]  # [rule, channel] for each channel it is also delivered to
    tags: NotRequired[list[str]]
    redacted: NotRequired[list[str]]  # the `data.` fields redacted


def record_of(envelope: Envelope) -> Record | None:
    """The rules' record on `envelope`, typed (None before the rules ran on it)."""
    return cast(Record | None, envelope.rules)


@dataclass
class Decision:
    """What the rules decided for one message (a JSON-ready `record()` travels with it)."""

    version: int
    matched: list[tuple[str, str]] = field(default_factory=list)  # (rule, action)
    block: str | None = None
    alerts: list[str] = field(default_factory=list)
    routes: list[tuple[str, str]] = field(default_factory=list)  # (rule, channel)
    redact: list[tuple[str, str | None]] = field(default_factory=list)  # (field, mask or None to drop)
    tags: list[str] = field(default_factory=list)

    def record(self) -> Record:
        """The decision as the envelope carries it (`Envelope.rules`): only what is set."""
        out: Record = {"v": self.version}
        if self.matched:
            out["matched"] = [list(m) for m in self.matched]
        if self.block:
            out["block"] = self.block
        if self.alerts:
            out["alert"] = self.alerts
        if self.routes:
            out["route"] = [list(r) for r in self.routes]
        if self.tags:
            out["tags"] = self.tags
        if self.redact:
            out["redacted"] = [f for f, _mask in self.redact]
        return out


def _never(path: str, problem: str) -> None:
    raise RulesError([{"path": path, "problem": problem}])


class RuleSet:
    """A compiled rule set of one version; `evaluate` is all a worker calls per message."""

    def __init__(self, doc: dict, version: int, default_zone: str = "UTC"):
        self.doc = doc
        self.version = version
        compiled = []
        for index, rule in enumerate(doc["rules"]):
            if not rule["enabled"]:
                continue
            globs, types, tests = _compile_condition(rule["condition"], rule["id"], default_zone, top=True)
            actions = normal_actions(rule["action"], "action", _never)
            compiled.append((-rule["priority"], index, Rule(rule["id"], rule["priority"],
                                                            _globs(globs) if globs else None, types,
                                                            tuple(tests), tuple(actions))))
        self.rules = tuple(rule for _p, _i, rule in sorted(compiled, key=lambda r: r[:2]))
        self._by_kind: dict[tuple[str, str], tuple[Rule, ...]] = {}

    def __len__(self) -> int:
        return len(self.rules)

    def _candidates(self, channel: str, mtype: str) -> tuple[Rule, ...]:
        # The rules whose channel globs and types admit a message, in priority order,
        # worked out once per (channel, type): most messages meet no rule at all.
        kind = (channel, mtype)
        found = self._by_kind.get(kind)
        if found is None:
            if len(self._by_kind) >= MAX_CACHED_KINDS:
                self._by_kind.clear()
            found = self._by_kind[kind] = tuple(r for r in self.rules if (r.globs is None or r.globs(channel))
                                                and (r.types is None or mtype in r.types))
        return found

    def evaluate(self, envelope, context: Context) -> Decision | None:
        """The decision for one message (None when no rule matched), rules in priority
        order; a `block` stops the rules after it."""
        decision = None
        for rule in self._candidates(envelope.channel, envelope.type):
            for test in rule.tests:
                if not test(envelope, context):
                    break
            else:
                if decision is None:
                    decision = Decision(self.version)
                apply_rule(rule, decision, envelope.channel)
                if decision.block:
                    break
        return decision


def apply_rule(rule: Rule, decision: Decision, channel: str) -> None:
    """Add what `rule`'s actions decide for a message on `channel` to `decision`."""
    for action in rule.actions:
        kind = action["do"]
        decision.matched.append((rule.id, kind))
        if kind in ("block", "block_and_alert") and decision.block is None:
            decision.block = rule.id
        if kind in ("alert", "block_and_alert") and rule.id not in decision.alerts:
            decision.alerts.append(rule.id)
        if kind == "route" and action["channel"] != channel \
                and all(target != action["channel"] for _r, target in decision.routes):
            decision.routes.append((rule.id, action["channel"]))
        if kind == "redact":
            decision.redact += [(name, action.get("mask")) for name in action["fields"]]
        if kind == "tag":
            decision.tags += [t for t in action["tags"] if t not in decision.tags]


def redacted(data, fields: list[tuple[str, str | None]]):
    """`data` with each `data.<path>` dropped (mask None) or replaced by its mask; `data` itself is untouched.

    Only the mappings on a redacted path are copied (at most 16 levels, the
    longest field), the rest is shared with `data`: no depth of data can
    exhaust the stack here, as `copy.deepcopy` would past ~500 levels.
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    copies = {id(out)}  # the mappings of `out` that are its own, not `data`'s
    for name, mask in fields:
        *path, last = name.split(".")[1:]
        parent = out
        for part in path:
            child = parent.get(part)
            if not isinstance(child, dict):
                break
            if id(child) not in copies:
                child = parent[part] = dict(child)
                copies.add(id(child))
            parent = child
        else:
            if last in parent:
                if mask is None:
                    del parent[last]
                else:
                    parent[last] = mask
    return out
