"""A rule set's structure: what each key may hold, declared once (docs/guide.md: "Rules").

Each kind of value is a `Value`: the problem a wrong one has, and the same
kind as JSON Schema. validation.py checks a document against these
declarations; `definitions` and `json_schema` build the JSON Schema from them,
for the OpenAPI document and for editors (`python -m pipeline.rules.schema`
prints it). What JSON Schema cannot state, validation.py checks alone: ids
used twice, a regex RE2 refuses or that is too large, a time zone the tz
database lacks, a time range that starts where it ends; and reading.py the
nesting depth and text UTF-8 cannot encode.
"""

from __future__ import annotations

import json
import math
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import re2

from pipeline.core.messages import CHANNEL_RE
from pipeline.rules.reading import utf8

MAX_RULES = 1000
MAX_PATTERN = 256  # characters of a `matches` regex
# A regex runs on RE2, in time linear in the value whatever the pattern; these bound
# its size (RE2 instructions) and so the time and memory of one message's tests.
MAX_PROGRAM = 10_000  # instructions of one regex (`.{0,1000}` is about 9,000)
MAX_SET_PROGRAM = 50_000  # instructions of all the regexes of a set
_RE2 = re2.Options()
_RE2.log_errors = False  # a refused pattern is the caller's answer, not a line on stderr
_RE2.max_mem = 1 << 20  # bytes of one regex's program and DFA cache; past it RE2 runs its NFA, still linear
RULE_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
TIME_RE = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")
FIELD_RE = re.compile(r"(id|channel|type|sender|ts|data)(\.[^.\s]{1,100}){0,16}")
DATA_FIELD_RE = re.compile(r"data(\.[^.\s]{1,100}){1,16}")
MISSING = object()


def is_int(value) -> bool:
    """An integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An integer or a float, not a boolean (a message's numbers may be infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def names(value) -> list | None:
    """A text or a non-empty list of texts, as a list; None when it is neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def time_of_day(value: str) -> int:
    """Seconds after midnight of a time TIME_RE matches ("HH:MM[:SS]")."""
    hours, minutes, *seconds = value.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds[0] if seconds else 0)


def compile_regex(pattern) -> tuple[Any, str | None]:
    """(the RE2 regex, None), or (None, why `pattern` may not be a `matches` test).

    RE2 matches in time linear in the value, whatever the pattern: there is
    no backtracking to bound. Its syntax is Python's less what needs
    backtracking (backreferences, lookaround), which it refuses. A regex sees
    a value's first MATCH_LIMIT characters (engine.py).
    """
    if not isinstance(pattern, str):
        return None, "must be a regular expression (text)"
    if len(pattern) > MAX_PATTERN:
        return None, f"is {len(pattern)} characters; at most {MAX_PATTERN}"
    if not utf8(pattern):
        return None, "holds text that is not valid Unicode (a lone surrogate)"
    try:
        compiled = re2.compile(pattern, _RE2)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return None, f"is not a regular expression RE2 accepts: {reason}"
    if compiled.programsize > MAX_PROGRAM:
        return None, f"compiles to {compiled.programsize} RE2 instructions; at most {MAX_PROGRAM}"
    return compiled, None


def _zone_ok(name) -> bool:
    if not isinstance(name, str):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


# -- the declarations ------------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """One kind of value in a rule set: `problem_of(value)` says what is wrong with a
    value (None when nothing is), and `schema` says the same kind in JSON Schema."""

    problem_of: Callable[[Any], str | None]
    schema: dict


def _kind(test: Callable[[Any], bool], problem: str, schema: dict) -> Value:
    return Value(lambda value: None if test(value) else problem, schema)


def _text(regex: re.Pattern, problem: str) -> Value:
    """Text the whole of which `regex` matches."""
    return _kind(lambda value: isinstance(value, str) and regex.fullmatch(value) is not None, problem,
                 {"type": "string", "pattern": f"^(?:{regex.pattern})$"})


def _one_or_more(value: Value) -> dict:
    return {"anyOf": [value.schema, {"type": "array", "items": value.schema, "minItems": 1}]}


TEXT = _kind(lambda value: isinstance(value, str), "must be text", {"type": "string"})
BOOLEAN = _kind(lambda value: isinstance(value, bool), "must be true or false", {"type": "boolean"})
NUMBER = _kind(lambda value: is_number(value) and math.isfinite(value), "must be a number", {"type": "number"})
_SCALAR = {"type": ["string", "number", "boolean", "null"]}
SCALAR = _kind(lambda value: value is None or isinstance(value, (str, bool)) or NUMBER.problem_of(value) is None,
               "must be a text, number, boolean or null", _SCALAR)
SCALARS = _kind(lambda value: isinstance(value, list) and all(SCALAR.problem_of(v) is None for v in value),
                "must be a list of texts, numbers, booleans or nulls", {"type": "array", "items": _SCALAR})
NAMES = _kind(lambda value: names(value) is not None, "must be text or a list of texts", _one_or_more(TEXT))
FIELD = _text(FIELD_RE, "must be a message field: id, channel, type, sender, ts or data.<path>")
TIME = _text(TIME_RE, "must be a time, HH:MM or HH:MM:SS")
TIME_RANGE = _kind(lambda value: isinstance(value, list) and len(value) == 2,
                   "must be [start, end], times as HH:MM",
                   {"type": "array", "items": TIME.schema, "minItems": 2, "maxItems": 2})
TIMEZONE = _kind(_zone_ok, "must be an IANA time zone (Europe/Paris, UTC)",
                 {"type": "string", "description": "an IANA time zone (Europe/Paris, UTC)"})
RULE_FIELDS = {
    "id": _text(RULE_ID_RE, "must match [A-Za-z0-9_.:-]{1,64}"),
    "description": TEXT,
    "enabled": BOOLEAN,
    "priority": _kind(lambda value: is_int(value) and abs(value) <= 1_000_000,
                      "must be an integer between -1000000 and 1000000",
                      {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000}),
}
RULE_KEYS = {*RULE_FIELDS, "condition", "action"}
# A field's tests, in the order a rule's faults are listed.
OPERANDS = {
    "eq": SCALAR, "ne": SCALAR, "gt": NUMBER, "gte": NUMBER, "lt": NUMBER, "lte": NUMBER,
    "in": SCALARS, "not_in": SCALARS, "contains": SCALAR, "exists": BOOLEAN,
    "matches": Value(lambda value: compile_regex(value)[1],
                     {"type": "string", "maxLength": MAX_PATTERN,
                      "description": "a regular expression RE2 accepts (Python's syntax less backreferences and "
                                     "lookaround)"}),
}
OPERATORS = tuple(OPERANDS)
NUMERIC = {"gt", "gte", "lt", "lte"}


@dataclass(frozen=True)
class Mapping:
    """A mapping of known keys, each holding a Value; a `required` key's Value judges
    its absence as it would a null."""

    values: dict[str, Value]
    required: tuple[str, ...] = ()

    def check(self, value: dict, path: str, fault) -> None:
        """Report each unknown key, then each key's problem, in declaration order, through
        `fault(path, problem)`."""
        for key in sorted(set(value) - set(self.values), key=str):
            fault(f"{path}.{key}", "unknown key")
        for key, kind in self.values.items():
            if key in value or key in self.required:
                problem = kind.problem_of(value.get(key))
                if problem:
                    fault(f"{path}.{key}", problem)

    @property
    def schema(self) -> dict:
        """The mapping in JSON Schema."""
        return {"type": "object", "properties": {key: kind.schema for key, kind in self.values.items()},
                "required": list(self.required), "additionalProperties": False}


THRESHOLD = Mapping({"min": NUMBER, "field": _text(FIELD_RE, "must be a message field such as data.amount")},
                    required=("min",))
RATE = Mapping({
    "max": _kind(lambda value: is_int(value) and value >= 1, "must be a whole number of messages, at least 1",
                 {"type": "integer", "minimum": 1}),
    "per": _kind(lambda value: NUMBER.problem_of(value) is None and 0 < value <= 86400,
                 "must be seconds, more than 0 and at most 86400",
                 {"type": "number", "exclusiveMinimum": 0, "maximum": 86400}),
    "by": _kind(lambda value: value in ("sender", "channel"), "must be sender or channel",
                {"enum": ["sender", "channel"]}),
}, required=("max", "per"))
CONDITION_KEYS = {"channel", "type", "sender", "field", *OPERATORS, "time_range", "timezone", "amount_threshold",
                  "rate", "all", "any", "not"}

# Actions. A flag action (`block`) is written alone or as `{block: true}`; Python's
# `1 == True` lets `{block: 1}` through as well, and the schema says so.
FLAGS = ("block", "alert", "block_and_alert")
ACTIONS = (*FLAGS, "route", "redact", "tag")
FLAG = _kind(lambda value: value in (True, None), f"unknown action; one of {', '.join(ACTIONS)}",
             {"enum": [True, 1, None]})
CHANNEL = _text(CHANNEL_RE, "must be a channel name (or {channel: name})")
DATA_FIELD = _text(DATA_FIELD_RE, "must be a field under data (data.card)")
TAG = _text(RULE_ID_RE, "must be a tag ([A-Za-z0-9_.:-]{1,64})")


def _each(value: Value) -> Callable[[Any], bool]:
    """A test of a text or a non-empty list of texts, each of which is a `value`."""
    def test(texts) -> bool:
        listed = names(texts)
        return listed is not None and all(value.problem_of(text) is None for text in listed)
    return test


DATA_FIELDS = _kind(_each(DATA_FIELD), "must list fields under data (data.card)", _one_or_more(DATA_FIELD))
TAGS = _kind(_each(TAG), "must be a tag or a list of tags ([A-Za-z0-9_.:-]{1,64})", _one_or_more(TAG))


# -- the same structure as JSON Schema -------------------------------------------------------

def definitions(ref_template: str) -> dict[str, dict]:
    """The rule set's JSON Schema as named definitions (RuleSetInput, the document, and
    the Rule, RuleCondition and RuleAction it refers to), each reference written with
    `ref_template` (`{model}` stands for the name)."""
    def ref(name: str) -> dict:
        return {"$ref": ref_template.format(model=name)}

    condition: dict[str, Any] = {key: NAMES.schema for key in ("channel", "type", "sender")}
    condition["field"] = FIELD.schema
    condition.update({op: kind.schema for op, kind in OPERANDS.items()})
    condition.update({
        "time_range": TIME_RANGE.schema,
        "timezone": TIMEZONE.schema,
        "amount_threshold": {"anyOf": [NUMBER.schema, THRESHOLD.schema]},
        "rate": RATE.schema,
        "all": {"type": "array", "items": ref("RuleCondition"), "minItems": 1},
        "any": {"type": "array", "items": ref("RuleCondition"), "minItems": 1},
        "not": ref("RuleCondition"),
    })
    arguments = {
        "route": {"anyOf": [CHANNEL.schema, Mapping({"channel": CHANNEL}, required=("channel",)).schema]},
        "redact": {"anyOf": [DATA_FIELDS.schema, Mapping({"fields": DATA_FIELDS, "mask": TEXT},
                                                         required=("fields",)).schema]},
        "tag": TAGS.schema,
        **{flag: FLAG.schema for flag in FLAGS},
    }
    one_action = {"anyOf": [{"enum": list(FLAGS)},
                            {"type": "object", "properties": arguments, "additionalProperties": False,
                             "minProperties": 1, "maxProperties": 1}]}
    rule = {"type": "object", "properties": {**{key: kind.schema for key, kind in RULE_FIELDS.items()},
                                             "condition": ref("RuleCondition"), "action": ref("RuleAction")},
            "required": ["id", "condition", "action"], "additionalProperties": False}
    return {
        "RuleSetInput": {
            "type": "object", "description": "`rules: [...]` or one `rule: {...}` (docs/guide.md: Rules); "
                                             "`{}` is the empty set",
            "properties": {"rules": {"type": "array", "items": ref("Rule"), "maxItems": MAX_RULES},
                           "rule": ref("Rule")},
            "maxProperties": 1, "additionalProperties": False},
        "Rule": rule,
        "RuleCondition": {
            "type": "object", "description": "conditions, all of which must hold", "properties": condition,
            "additionalProperties": False,
            "dependentRequired": {**{op: ["field"] for op in OPERATORS}, "timezone": ["time_range"]},
            "dependentSchemas": {"field": {"anyOf": [{"required": [op]} for op in OPERATORS]}}},
        "RuleAction": {"description": "one action or a list of them",
                       "anyOf": [one_action, {"type": "array", "items": one_action, "minItems": 1}]},
    }


def json_schema(ref_template: str = "#/$defs/{model}") -> dict:
    """The rule set's JSON Schema: the document's, with the definitions it refers to
    under `$defs` (`ref_template` says where they are found)."""
    named = definitions(ref_template)
    return {**named.pop("RuleSetInput"), "$defs": named}


if __name__ == "__main__":
    # For an editor to check a rules file with (YAML: the document as its JSON reads it).
    print(json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Herald rule set",
                      **json_schema()}, indent=2))
