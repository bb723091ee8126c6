"""The checks a rule set passes before it is stored or applied: compiled, then dry-run
on messages holding every kind of JSON value at the fields its rules name. A set is
refused whole (RulesError) rather than failing on messages later.
"""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.core.messages import dumps_bytes
from pipeline.rules.engine import MATCH_LIMIT, Context, Decision, RuleSet, apply_rule, redacted
from pipeline.rules.reading import RulesError
from pipeline.rules.validation import load

# What the dry run puts at every field a rule names: each kind of JSON value,
# the extremes a message may hold among them (docs/guide.md: "Rules").
PROBES = (0, 10**400, -(10**400), 0.5, 1e308, "", "x" * (MATCH_LIMIT + 1), [1, "a", None, [2]], {"a": {"b": 1}},
          None, True)


def checked(doc: dict, version: int, default_zone: str = "UTC") -> RuleSet:
    """`RuleSet(doc, ...)`, then a dry run: every test of every enabled rule on a message
    holding each of PROBES at each field the rule names, and its actions applied and
    encoded as a worker would. RulesError when either fails: a set is refused whole
    rather than failing on messages later."""
    try:
        rule_set = RuleSet(doc, version, default_zone)
    except Exception as exc:
        raise RulesError([{"path": "", "problem": f"cannot be compiled: {type(exc).__name__}: {exc}"}]) from None
    where = {rule["id"]: (f"rules[{index}]", rule) for index, rule in enumerate(doc["rules"])}
    context = Context(0.0)
    for rule in rule_set.rules:
        path, source = where[rule.id]
        fields = _fields_of(source["condition"]) + [name for a in rule.actions if a["do"] == "redact"
                                                    for name in a["fields"]]
        try:
            for probe in PROBES:
                placed: dict = {}
                for name in fields:
                    _place(placed, name.split(".")[1:], probe)
                for data in (probe, placed):
                    envelope = SimpleNamespace(id="dry-run", channel="dry-run", type="message", data=data,
                                               sender="dry-run", ts=0)
                    for test in rule.tests:
                        test(envelope, context)
                    decision = Decision(version)
                    apply_rule(rule, decision, envelope.channel)
                    dumps_bytes({"data": redacted(data, decision.redact), "rules": decision.record()})
        except Exception as exc:
            raise RulesError([{"path": path,
                               "problem": f"fails on a message: {type(exc).__name__}: {exc}"}]) from None
    return rule_set


def _fields_of(cond: dict) -> list[str]:
    """The `data.` fields a condition names, nested conditions included."""
    names, stack = [], [cond]
    while stack:
        part = stack.pop()
        if isinstance(part.get("field"), str):
            names.append(part["field"])
        if "amount_threshold" in part:
            threshold = part["amount_threshold"]
            names.append(threshold.get("field", "data.amount") if isinstance(threshold, dict) else "data.amount")
        stack += [*part.get("all", []), *part.get("any", []), *([part["not"]] if "not" in part else [])]
    return [name for name in names if name.startswith("data.")]


def _place(data: dict, parts: list[str], value) -> None:
    """Put `value` at `parts` in `data`, making the mappings on the way."""
    for part in parts[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[parts[-1]] = value


def compile_text(text: str | bytes, media_type: str, version: int, default_zone: str = "UTC") -> RuleSet:
    """A rule set text read, validated, compiled and dry-run (`checked`), or RulesError:
    what PUT /api/v1/rules, `flask rules load` and a worker reading the stored set all do."""
    return checked(load(text, media_type), version, default_zone)
