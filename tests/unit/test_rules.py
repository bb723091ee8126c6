"""The rules language: reading, validation with paths, each operator and action, the seed verbatim."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from pipeline import rules
from pipeline.core.messages import Envelope

SEED = """\
rule:
  id: night_high_value_block
  condition:
    time_range: [22:00, 06:00]
    amount_threshold: 50000
  action: block_and_alert
"""


def at(hour: int, minute: int = 0, zone: str = "UTC") -> float:
    """Epoch seconds of 2024-03-04 hour:minute in `zone`."""
    import zoneinfo

    return datetime.datetime(2024, 3, 4, hour, minute, tzinfo=zoneinfo.ZoneInfo(zone)).timestamp()


def message(data=None, channel="pay:eu", mtype="payment", sender="alice", msg_id="m1") -> Envelope:
    return Envelope(id=msg_id, channel=channel, type=mtype, data=data if data is not None else {}, sender=sender,
                    ts=0)


def decide(text: str, envelope: Envelope, now: float | None = None, count=None, zone="UTC"):
    rule_set = rules.RuleSet(rules.load(text), 1, zone)
    return rule_set.evaluate(envelope, rules.Context(time.time() if now is None else now, count))


def errors(text: str, media_type: str = "application/yaml") -> list[str]:
    with pytest.raises(rules.RulesError) as caught:
        rules.load(text, media_type)
    return [f"{e['path']}: {e['problem']}" for e in caught.value.errors]


# -- the seed ----------------------------------------------------------------------

def test_the_seed_is_read_verbatim_with_its_times_as_times():
    doc = rules.load(SEED)
    assert doc["rules"][0]["condition"]["time_range"] == ["22:00", "06:00"]
    assert doc["rules"][0]["action"] == ["block_and_alert"]


@pytest.mark.parametrize("hour, minute, matched", [
    (21, 59, False), (22, 0, True), (23, 59, True), (0, 0, True), (5, 59, True), (6, 0, False), (12, 0, False)])
def test_the_seed_blocks_and_alerts_at_night_on_both_sides_of_midnight(hour, minute, matched):
    decision = decide(SEED, message({"amount": 60000}), at(hour, minute))
    if matched:
        assert decision.block == "night_high_value_block" and decision.alerts == ["night_high_value_block"]
        assert decision.matched == [("night_high_value_block", "block_and_alert")]
    else:
        assert decision is None


def test_the_seed_lets_a_small_amount_through_at_night():
    assert decide(SEED, message({"amount": 49999.99}), at(23)) is None
    assert decide(SEED, message({"amount": 50000}), at(23)).block
    assert decide(SEED, message({"amount": "60000"}), at(23)) is None  # text is not an amount


def test_a_time_range_follows_its_timezone():
    text = "rule: {id: r, condition: {time_range: ['22:00', '06:00'], timezone: Asia/Tokyo}, action: alert}"
    assert decide(text, message(), at(23, 0, "Asia/Tokyo"))
    assert decide(text, message(), at(23, 0, "UTC")) is None  # 08:00 in Tokyo
    plain = "rule: {id: r, condition: {time_range: ['09:00', '17:30']}, action: alert}"
    assert decide(plain, message(), at(10, 0, "Europe/Paris"), zone="Europe/Paris")
    assert decide(plain, message(), at(17, 30, "Europe/Paris"), zone="Europe/Paris") is None


def test_amount_threshold_field_is_configurable():
    text = "rule: {id: r, condition: {amount_threshold: {min: 10, field: data.total.eur}}, action: alert}"
    assert decide(text, message({"total": {"eur": 10}}))
    assert decide(text, message({"amount": 99})) is None


# -- conditions ----------------------------------------------------------------------

@pytest.mark.parametrize("test, data, expected", [
    ("eq: 5", {"x": 5}, True), ("eq: 5", {"x": 6}, False), ("eq: true", {"x": 1}, False),
    ("ne: a", {"x": "b"}, True), ("ne: a", {"x": "a"}, False), ("ne: a", {}, True),
    ("gt: 5", {"x": 6}, True), ("gt: 5", {"x": 5}, False), ("gt: 5", {"x": "9"}, False),
    ("gte: 5", {"x": 5}, True), ("lt: 5", {"x": 4.5}, True), ("lt: 5", {"x": 5}, False),
    ("lte: 5", {"x": 5}, True), ("lte: 5", {"x": True}, False),
    ("in: [a, b]", {"x": "b"}, True), ("in: [a, b]", {"x": "c"}, False),
    ("not_in: [a, b]", {"x": "c"}, True), ("not_in: [a, b]", {"x": "a"}, False),
    ("contains: bad", {"x": "a bad word"}, True), ("contains: bad", {"x": "good"}, False),
    ("contains: 3", {"x": [1, 2, 3]}, True), ("contains: 4", {"x": [1, 2, 3]}, False),
    ("exists: true", {"x": None}, True), ("exists: true", {}, False), ("exists: false", {}, True),
    ("matches: '^[0-9]{4}-[0-9]{4}$'", {"x": "1234-5678"}, True),
    ("matches: '^[0-9]{4}$'", {"x": "12345"}, False), ("matches: 'x'", {"x": 5}, False),
])
def test_each_field_operator(test, data, expected):
    text = f"rule: {{id: r, condition: {{field: data.x, {test}}}, action: alert}}"
    assert bool(decide(text, message(data))) is expected


@pytest.mark.parametrize("data", [[5], 5, "5", None, {"x": None}, {"x": [5]}, {"y": 5}])
def test_a_numeric_test_holds_only_for_a_number_at_its_field(data):
    for test in ("gt: 0", "gte: 0", "lt: 10", "lte: 10"):
        text = f"rule: {{id: r, condition: {{field: data.x, {test}}}, action: alert}}"
        envelope = Envelope(id="m", channel="c", type="t", data=data, sender="s", ts=0)
        assert decide(text, envelope) is None
        assert decide(text, Envelope(id="m", channel="c", type="t", data={"x": 5}, sender="s", ts=0))
        assert decide(text.replace("data.x", "data.x.y"), Envelope(id="m", channel="c", type="t",
                                                                   data={"x": {"y": 5.5}}, sender="s", ts=0))


def test_channel_glob_type_and_sender():
    text = "rule: {id: r, condition: {channel: 'pay:*', type: [payment, refund], sender: alice}, action: alert}"
    assert decide(text, message())
    assert decide(text, message(channel="chat:eu")) is None
    assert decide(text, message(mtype="message")) is None
    assert decide(text, message(sender="bob")) is None


def test_rules_are_found_by_channel_and_type_and_a_nested_type_is_still_a_test():
    text = """
rules:
  - {id: a, condition: {channel: 'pay:*', type: payment}, action: {tag: a}}
  - {id: b, condition: {type: [refund, payment]}, action: {tag: b}}
  - {id: c, condition: {any: [{type: chat}, {sender: bob}]}, action: {tag: c}}
"""
    rule_set = rules.RuleSet(rules.load(text), 1)
    context = rules.Context(time.time())
    for _ in range(2):  # the second time from the remembered candidates
        def tags(**kw):
            decision = rule_set.evaluate(message(**kw), context)
            return decision.tags if decision else []
        assert tags() == ["a", "b"]
        assert tags(channel="chat:eu") == ["b"]
        assert tags(mtype="refund") == ["b"]
        assert tags(mtype="chat") == ["c"]
        assert tags(mtype="message") == []
        assert tags(mtype="message", sender="bob") == ["c"]


def test_all_any_not():
    text = """
rule:
  id: r
  condition:
    any:
      - {field: data.country, in: [KP, IR]}
      - all: [{field: data.amount, gt: 100}, {not: {sender: alice}}]
  action: alert
"""
    assert decide(text, message({"country": "KP"}))
    assert decide(text, message({"amount": 101}, sender="bob"))
    assert decide(text, message({"amount": 101}, sender="alice")) is None
    assert decide(text, message({"amount": 99}, sender="bob")) is None


def test_rate_counts_through_the_counter_and_only_after_the_other_tests_matched():
    windows: dict = {}

    def count(parts, per, member):
        window = windows.setdefault(parts, [])
        if member not in window:
            window.append(member)
        return window.index(member) + 1

    text = "rule: {id: r, condition: {type: payment, rate: {max: 2, per: 60, by: sender}}, action: alert}"
    rule_set = rules.RuleSet(rules.load(text), 1)
    context = rules.Context(time.time(), count)
    got = [rule_set.evaluate(message(msg_id=f"m{i}"), context) for i in range(4)]
    assert [bool(d) for d in got] == [False, False, True, True]
    assert rule_set.evaluate(message(msg_id="m0"), context) is None  # counted once, not again
    assert rule_set.evaluate(message(mtype="chat", msg_id="x"), context) is None
    assert windows[("r", "sender", "alice")] == ["m0", "m1", "m2", "m3"]
    assert rule_set.evaluate(message(msg_id="m9"), rules.Context(time.time())) is None  # a dry run never counts


# -- actions and order -------------------------------------------------------------------

def test_rules_run_in_priority_order_and_a_block_stops_the_rest():
    text = """
rules:
  - {id: low, priority: 1, condition: {}, action: [{tag: late}]}
  - {id: stop, priority: 5, condition: {field: data.bad, eq: true}, action: block}
  - {id: high, priority: 9, condition: {}, action: [{tag: early}, alert]}
  - {id: unused, enabled: false, priority: 99, condition: {}, action: block}
"""
    blocked = decide(text, message({"bad": True}))
    assert blocked.block == "stop" and blocked.tags == ["early"] and blocked.alerts == ["high"]
    assert [m[0] for m in blocked.matched] == ["high", "high", "stop"]
    passed = decide(text, message({"bad": False}))
    assert passed.block is None and passed.tags == ["early", "late"]


def test_route_redact_and_tag():
    text = """
rules:
  - id: copy
    condition: {channel: 'pay:*'}
    action: [{route: 'audit:pay'}, {route: {channel: 'pay:eu'}}, {tag: [audited, pay]}]
  - id: pii
    condition: {field: data.card, exists: true}
    action: {redact: {fields: [data.card, data.holder.name], mask: '****'}}
  - id: drop
    condition: {}
    action: {redact: [data.cvv]}
"""
    data = {"card": "4111", "cvv": "123", "holder": {"name": "A", "city": "B"}, "amount": 5}
    decision = decide(text, message(data))
    assert decision.routes == [("copy", "audit:pay")]  # never back to its own channel
    assert decision.tags == ["audited", "pay"]
    assert rules.redacted(data, decision.redact) == {"card": "****", "holder": {"name": "****", "city": "B"},
                                                     "amount": 5}
    assert data["cvv"] == "123"  # the original is untouched
    record = decision.record()
    assert record["route"] == [["copy", "audit:pay"]] and record["redacted"] == ["data.card", "data.holder.name",
                                                                                  "data.cvv"]
    json.dumps(record)


def test_what_get_returns_can_be_put_back():
    doc = rules.load("""
rules:
  - {id: a, condition: {}, action: [block, {route: 'x:y'}, {redact: [data.c]}, {tag: t}]}
  - {id: b, condition: {}, action: {redact: {fields: [data.d], mask: '-'}}}
""")
    assert rules.load(json.dumps(doc), "application/json") == doc


def test_json_sets_and_an_empty_set():
    doc = rules.load('{"rules": [{"id": "j", "condition": {"time_range": ["22:00", "06:00"]}, "action": "alert"}]}',
                     "application/json")
    assert doc["rules"][0]["condition"]["time_range"] == ["22:00", "06:00"]
    assert rules.load("rules: []") == {"rules": []}


# -- bad sets ------------------------------------------------------------------------

def test_every_fault_is_listed_with_its_path():
    text = """
rules:
  - {id: ok, condition: {}, action: alert}
  - {id: ok, condition: {}, action: alert}
  - id: bad
    condition: {field: data.amount, gt: lots, frobnicate: 1, all: [{type: 5}]}
    action: [explode, route]
"""
    assert errors(text) == [
        "rules[1].id: 'ok' is used by an earlier rule",
        "rules[2].condition.frobnicate: unknown condition",
        "rules[2].condition.gt: must be a number",
        "rules[2].condition.all[0].type: must be text or a list of texts",
        "rules[2].action[0]: unknown action; one of block, alert, block_and_alert, route, redact, tag",
        "rules[2].action[1]: route needs an argument: {route: ...}",
    ]


@pytest.mark.parametrize("condition, problem", [
    ("{time_range: [1320, '06:00']}", "condition.time_range[0]: must be a time, HH:MM or HH:MM:SS"),
    ("{time_range: ['25:00', '06:00']}", "condition.time_range[0]: must be a time, HH:MM or HH:MM:SS"),
    ("{time_range: ['06:00', '06:00']}", "condition.time_range: start and end are the same time"),
    ("{time_range: ['06:00']}", "condition.time_range: must be [start, end], times as HH:MM"),
    ("{time_range: ['01:00', '02:00'], timezone: Mars/Olympus}",
     "condition.timezone: must be an IANA time zone (Europe/Paris, UTC)"),
    ("{timezone: UTC}", "condition.timezone: goes with a time_range"),
    ("{amount_threshold: lots}", "condition.amount_threshold: must be a number, or {min, field}"),
    ("{rate: {max: 0, per: 60}}", "condition.rate.max: must be a whole number of messages, at least 1"),
    ("{rate: {max: 1, per: 60, by: ip}}", "condition.rate.by: must be sender or channel"),
    ("{gt: 5}", "condition.gt: needs a `field` to test"),
    ("{field: data.x}", "condition.field: needs a test: one of eq, ne, gt, gte, lt, lte, in, not_in, contains, "
                        "exists, matches"),
    ("{field: secret.x, eq: 1}", "condition.field: must be a message field: id, channel, type, sender, ts or "
                                 "data.<path>"),
    ("{field: data.x, in: 5}", "condition.in: must be a list of texts, numbers, booleans or nulls"),
    ("{field: data.x, matches: '(a)\\1'}",
     "condition.matches: is not a regular expression RE2 accepts: invalid escape sequence: \\1"),
    ("{field: data.x, matches: '(?=a)b'}",
     "condition.matches: is not a regular expression RE2 accepts: invalid perl operator: (?="),
    ("{field: data.x, matches: '['}", "condition.matches: is not a regular expression RE2 accepts: "
                                      "missing ]: ["),
    ("{field: data.x, matches: 'a{1001}'}",
     "condition.matches: is not a regular expression RE2 accepts: invalid repetition size: {1001}"),
    ("{field: data.x, matches: '\\w{1000}\\w{1000}\\w{1000}\\w{1000}'}",
     "condition.matches: compiles to 12004 RE2 instructions; at most 10000"),
    ("{not: [1]}", "condition.not: must be a mapping"),
    ("{any: []}", "condition.any: must be a non-empty list of conditions"),
])
def test_bad_conditions(condition, problem):
    assert errors(f"rule: {{id: r, condition: {condition}, action: alert}}") == [f"rule.{problem}"]


def test_a_long_regex_is_refused_and_a_long_value_is_matched_on_its_start():
    assert errors(f"rule: {{id: r, condition: {{field: data.x, matches: '{'a' * 257}'}}, action: alert}}") == [
        "rule.condition.matches: is 257 characters; at most 256"]
    text = "rule: {id: r, condition: {field: data.x, matches: 'a.*b'}, action: alert}"
    start = time.perf_counter()
    assert decide(text, message({"x": "a" * 100_000})) is None
    assert decide(text, message({"x": "ab" + "a" * 100_000}))
    assert time.perf_counter() - start < 1  # bounded, whatever the machine: n**2 of 1000 characters


@pytest.mark.parametrize("text, problem", [
    ("- just a list", ": must be a mapping with `rules: [...]` or one `rule: {...}`"),
    ("rules: [{condition: {}, action: alert}]", "rules[0].id: must match [A-Za-z0-9_.:-]{1,64}"),
    ("rules: [{id: x, action: alert}]", "rules[0].condition: required"),
    ("rules: [{id: x, condition: {}}]", "rules[0].action: required"),
    ("rules: [{id: x, condition: {}, action: alert, when: now}]", "rules[0].when: unknown key"),
    ("rules: [{id: x, priority: high, condition: {}, action: alert}]",
     "rules[0].priority: must be an integer between -1000000 and 1000000"),
    ("rules: [{id: x, enabled: maybe, condition: {}, action: alert}]", "rules[0].enabled: must be true or false"),
    ("rules: [{id: x, condition: {}, action: {route: 'no spaces'}}]",
     "rules[0].action.route: must be a channel name (or {channel: name})"),
    ("rules: [{id: x, condition: {}, action: {redact: [channel]}}]",
     "rules[0].action.redact: must list fields under data (data.card)"),
    ("rules: [{id: x, condition: {}, action: {tag: 'a b'}}]",
     "rules[0].action.tag: must be a tag or a list of tags ([A-Za-z0-9_.:-]{1,64})"),
])
def test_bad_rules(text, problem):
    assert errors(text) == [problem]


def test_unreadable_text_is_one_error():
    assert errors("rules: [")[0].startswith(": cannot be read:")
    assert errors("{", "application/json")[0].startswith(": cannot be read:")


# -- rule tests are total: no message makes one raise ------------------------------------

def test_a_huge_integer_is_compared_exactly_not_through_a_float():
    huge = 10**400  # float(huge) raises OverflowError
    assert decide(SEED, message({"amount": huge}), at(23)).block == "night_high_value_block"
    assert decide(SEED, message({"amount": -huge}), at(23)) is None
    for test, value, expected in [("gt: 0.5", huge, True), ("lt: 1.0e+308", huge, False), ("lte: 5", -huge, True),
                                  ("gte: 50000", 50000, True), ("gt: 49999.5", 49999, False)]:
        text = f"rule: {{id: r, condition: {{field: data.x.y, {test}}}, action: alert}}"
        assert bool(decide(text, message({"x": {"y": value}}))) is expected, test


def nested(depth: int, leaf) -> dict:
    """{"a": {"a": ... leaf}} `depth` mappings deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_redact_copies_only_the_redacted_path_whatever_the_depth_of_the_rest():
    text = "rule: {id: r, condition: {}, action: {redact: {fields: [data.card, data.x.a.a], mask: '*'}}}"
    data = {"card": "4111", "x": nested(5000, 1), "y": nested(5000, 2)}  # copy.deepcopy raises past ~500
    decision = decide(text, message(data))
    out = rules.redacted(data, decision.redact)
    assert out["card"] == "*" and out["x"]["a"]["a"] == "*" and out["y"] is data["y"]
    assert data["card"] == "4111" and data["x"]["a"]["a"] is not None and data["x"]["a"]["a"] != "*"
    assert rules.redacted(data, [("data.card", None)]).keys() == {"x", "y"}


def test_a_digit_that_is_not_ascii_names_a_key_not_a_list_index():
    text = "rule: {id: r, condition: {field: data.x.\u00b2, eq: 1}, action: alert}"  # '²'.isdigit() is True
    assert decide(text, message({"x": [1, 2, 3]})) is None  # int('²') would raise
    assert decide(text, message({"x": {"\u00b2": 1}}))
    assert decide("rule: {id: r, condition: {field: data.x.1, eq: 2}, action: alert}", message({"x": [1, 2]}))


EVERY_KIND = """
rules:
  - {id: num, condition: {field: data.x, gt: 5}, action: [alert, {tag: big}]}
  - {id: num2, condition: {field: data.a.a, lte: -0.5}, action: {route: 'audit:x'}}
  - {id: amount, condition: {amount_threshold: 50000}, action: block_and_alert}
  - {id: amount2, condition: {amount_threshold: {min: 1.5, field: data.a.0}}, action: {tag: t2}}
  - {id: eq, condition: {field: data.x, eq: 1.0}, action: {tag: one}}
  - {id: ne, condition: {field: data, ne: null}, action: {tag: ne}}
  - {id: in, condition: {field: data.x, in: [1, a, null, true]}, action: {tag: in}}
  - {id: not_in, condition: {field: data.card, not_in: [x]}, action: {tag: not_in}}
  - {id: contains, condition: {field: data.x, contains: a}, action: {tag: contains}}
  - {id: contains2, condition: {field: data.a, contains: 3}, action: {tag: contains2}}
  - {id: exists, condition: {field: data.a.a.a, exists: true}, action: {redact: [data.a.a]}}
  - {id: matches, condition: {field: data.x, matches: '^.{0,16}.{0,16}.{0,16}.{0,16}.{0,16}X'}, action: alert}
  - {id: ids, condition: {field: id, matches: 'm'}, action: {tag: id}}
  - {id: time, condition: {time_range: ['22:00', '06:00'], timezone: Asia/Tokyo}, action: {tag: night}}
  - {id: rate, condition: {rate: {max: 3, per: 60, by: channel}}, action: {tag: rate}}
  - id: logic
    condition: {any: [{all: [{field: data.card, exists: true}, {not: {sender: bob}}]}, {type: [payment]}]}
    action: {redact: {fields: [data.card, data.x, data.a.a.a], mask: '****'}}
  - {id: stop, priority: -1, condition: {field: data.x, eq: stop}, action: block}
"""


def random_value(rng, depth=0):
    """A JSON value of any kind, with the extremes a publisher can send: huge integers,
    long and odd texts, deep nesting (NaN and lone surrogates cannot arrive; here all the same)."""
    kind = rng.randrange(14 if depth < 4 else 9)
    if kind == 0:
        return rng.choice([10**400, -(10**400), 2**63, 0, 5, 6, 50000, -1])
    if kind == 1:
        return rng.choice([0.5, -0.5, 1.0, 1e308, -1e308, float("inf"), float("-inf"), float("nan")])
    if kind == 2:
        return rng.choice(["", "a", "X", "stop", "x" * 20 + "X", "y" * 5000, "\u00b2", "\ud800", "é\u2028"])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind in (4, 5, 6, 7, 8):
        return rng.choice([1, "a", None, 3, 7])
    if kind == 9:
        return nested(rng.choice([1, 50, 800, 3000]), random_value(rng, depth + 1))
    if kind in (10, 11):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["x", "a", "card", "amount", "0", "\u00b2"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(5))}


def test_no_message_makes_any_kind_of_rule_raise():
    import random

    rng = random.Random(19)
    rule_set = rules.RuleSet(rules.load(EVERY_KIND), 1)
    windows: dict = {}

    def count(parts, per, member):
        windows.setdefault(parts, set()).add(member)
        return len(windows[parts])

    kinds = set()
    for n in range(3000):
        data = random_value(rng)
        if rng.random() < 0.5:
            data = {"x": random_value(rng), "a": random_value(rng), "card": random_value(rng),
                    "amount": random_value(rng)}
        envelope = message(data, channel=f"c{n % 7}", mtype=rng.choice(["payment", "chat"]),
                           sender=rng.choice(["bob", "eve"]), msg_id=f"m{n}")
        decision = rule_set.evaluate(envelope, rules.Context(at(rng.randrange(24)), count))
        if decision is not None:
            kinds.update(rule for rule, _action in decision.matched)
            rules.redacted(envelope.data, decision.redact)
            json.dumps(decision.record())
    assert kinds == {r["id"] for r in rules.load(EVERY_KIND)["rules"]}  # every rule matched some message


# -- sets refused up front ---------------------------------------------------------------

ALIAS_BOMB = """
rules:
  - id: bomb
    condition:
      all:
        - &a {any: [{channel: x}, {channel: x}, {channel: x}, {channel: x}, {channel: x}, {channel: x}]}
        - &b {any: [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]}
        - &c {any: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]}
        - &d {any: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]}
        - {any: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]}
    action: alert
"""


def test_yaml_aliases_are_refused():
    assert errors(ALIAS_BOMB) == [": uses an alias (*a) at line 7; aliases are not allowed"]
    assert errors("rule: {id: r, condition: &c {}, action: alert}\nx: *c") == [
        ": uses an alias (*c) at line 2; aliases are not allowed"]
    assert rules.load("rule: {id: r, condition: &c {}, action: alert}")  # an anchor alone is harmless


def deep_not(depth: int) -> str:
    """A rule set in JSON whose condition is `not` in `not` ... `depth` times."""
    return ('{"rule": {"id": "r", "condition": ' + '{"not": ' * depth + '{"field": "data.x", "eq": 1}'
            + "}" * depth + ', "action": "alert"}}')


@pytest.mark.parametrize("depth", [30, 600, 5000])
def test_a_set_nested_deeper_than_the_limit_is_refused_naming_it(depth):
    problem = f"nests deeper than {rules.MAX_DEPTH} levels of mappings and lists"
    assert [e.split(": ", 1)[1] for e in errors(deep_not(depth), "application/json")] == [problem]
    assert [e.split(": ", 1)[1] for e in errors(deep_not(depth))] == [problem]  # JSON is YAML too
    assert rules.checked(rules.load(deep_not(29), "application/json"), 1)  # 32 levels: the limit
    assert rules.load(deep_not(29)) == rules.load(deep_not(29), "application/json")


def test_text_utf8_cannot_encode_is_refused_wherever_it_is():
    assert errors('{"rule": {"id": "r", "condition": {}, "action": {"redact": {"fields": ["data.card"], '
                  '"mask": "\\ud800"}}}}', "application/json") == [
        "rule.action.redact.mask: holds text that is not valid Unicode (a lone surrogate)"]
    assert errors('rule: {id: r, condition: {field: data.x, eq: "\\ud800"}, action: alert}') == [
        "rule.condition.eq: holds text that is not valid Unicode (a lone surrogate)"]
    assert errors('{"rule": {"id": "r", "condition": {"\\udfff": 1}, "action": "alert"}}', "application/json") == [
        "rule.condition: has a key that is not valid Unicode (a lone surrogate)"]


def test_an_exponential_regex_chain_is_accepted_and_runs_in_linear_time():
    # A backtracking engine takes time exponential in the repeats here; RE2 has no backtracking.
    chain = ".{0,16}" * 8 + "X"
    text = f"rule: {{id: r, condition: {{field: data.x, matches: '{chain}'}}, action: alert}}"
    assert decide(text, message({"x": "a" * 1000})) is None
    assert decide(text, message({"x": "a" * 100 + "X"}))


def test_the_regexes_of_a_set_are_bounded_together():
    pattern = "\\w{1000}" * 3  # ~9,000 instructions each: six of them are over the set's 50,000
    text = "rules: [" + ", ".join(f"{{id: r{i}, condition: {{field: data.x, matches: '{pattern}'}}, action: alert}}"
                                  for i in range(6)) + "]"
    assert errors(text) == [f"rules: its regexes come to 54024 RE2 instructions; at most {rules.MAX_SET_PROGRAM}"]


def test_the_dry_run_refuses_a_set_that_would_fail_on_messages():
    # Sets that skipped validation (stored by an older Herald, or by hand): what compiling
    # or applying them raises is a RulesError naming the rule, never a failure later.
    with pytest.raises(rules.RulesError, match=r"^: cannot be compiled: RecursionError"):
        rules.checked({"rules": [{**json.loads(deep_not(800))["rule"], "enabled": True, "priority": 0,
                                  "action": ["alert"]}]}, 1)
    bad_mask = {"id": "m", "enabled": True, "priority": 0, "condition": {},
                "action": [{"redact": {"fields": ["data.card"], "mask": "\ud800"}}]}
    with pytest.raises(rules.RulesError, match=r"^rules\[1\]: fails on a message: UnicodeEncodeError"):
        rules.checked({"rules": [{"id": "ok", "enabled": True, "priority": 0, "condition": {},
                                  "action": ["alert"]}, bad_mask]}, 1)
