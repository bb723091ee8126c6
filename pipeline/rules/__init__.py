"""Rules: policies written as data and changed at run time (docs/guide.md: "Rules").

A rule set is YAML or JSON, `rules: [...]` or a single `rule: {...}`. Each
rule has an `id`, an optional `description`, `enabled` (true), `priority` (0;
higher runs first, equal ones in the order written), a `condition` and an
`action` (one or a list). This module is pure logic: `parse` reads the text,
`validate` returns every error with its path, `compile_set` turns a valid set
into plain closures once per version, and `RuleSet.evaluate` decides for one
message. What is stored where, and when workers pick a new version up, is
`pipeline/rules/repository.py`.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import operator
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import re2
import yaml

from pipeline.core.errors import HeraldError
from pipeline.core.messages import dumps_bytes, valid_channel

RULE_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
TIME_RE = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")
FIELD_RE = re.compile(r"(id|channel|type|sender|ts|data)(\.[^.\s]{1,100}){0,16}")
MAX_RULES = 1000
MAX_DEPTH = 32  # levels of mappings and lists in a rule set document: `not` in `not` ... is refused past it
TOO_DEEP = f"nests deeper than {MAX_DEPTH} levels of mappings and lists"
MAX_PATTERN = 256  # characters of a `matches` regex
MATCH_LIMIT = 1000  # characters of a value a regex looks at: its first ones
# A regex runs on RE2, in time linear in the value whatever the pattern; these bound
# its size (RE2 instructions) and so the time and memory of one message's tests.
MAX_PROGRAM = 10_000  # instructions of one regex (`.{0,1000}` is about 9,000)
MAX_SET_PROGRAM = 50_000  # instructions of all the regexes of a set
_RE2 = re2.Options()
_RE2.log_errors = False  # a refused pattern is the caller's answer, not a line on stderr
_RE2.max_mem = 1 << 20  # bytes of one regex's program and DFA cache; past it RE2 runs its NFA, still linear
MAX_CACHED_KINDS = 10_000  # (channel, type) pairs whose candidate rules a RuleSet remembers
OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "exists", "matches")
NUMERIC = {"gt", "gte", "lt", "lte"}
CONDITION_KEYS = {"channel", "type", "sender", "field", "time_range", "timezone", "amount_threshold", "rate",
                  "all", "any", "not", *OPERATORS}
ACTIONS = ("block", "alert", "block_and_alert", "route", "redact", "tag")
RULE_KEYS = {"id", "description", "enabled", "priority", "condition", "action"}
MISSING = object()


class RulesError(HeraldError, ValueError):
    """A rule set that cannot be used; `errors` lists `{"path", "problem"}` for each fault."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{e['path']}: {e['problem']}" for e in errors))
        self.errors = errors


# -- reading -------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: `22:00` stays the text "22:00" (PyYAML's
    SafeLoader reads it as the integer 1320), so times come out as times.

    Aliases (`*name`, and `<<: *name`) are refused: under 1 KB of them names
    billions of nodes (an alias bomb), and a rule set has no need of them. A
    document nested deeper than MAX_DEPTH is refused as it is read.
    """

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise RulesError([{"path": "", "problem": f"uses an alias (*{self.peek_event().anchor}) at line "
                                                      f"{mark.line + 1}; aliases are not allowed"}])
        if not self.check_event(yaml.MappingStartEvent, yaml.SequenceStartEvent):
            return super().compose_node(parent, index)  # a scalar: no deeper
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RulesError([{"path": "", "problem": TOO_DEEP}])
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def parse(text: str | bytes, media_type: str = "application/yaml") -> Any:
    """The document in `text`, JSON when `media_type` says so, else YAML; RulesError if unreadable."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise RulesError([{"path": "", "problem": "is not UTF-8 text"}]) from None
    try:
        if media_type == "application/json" or media_type.endswith("+json"):
            return json.loads(text)
        return yaml.load(text, Loader=_Loader)
    except RulesError:
        raise
    except RecursionError:
        raise RulesError([{"path": "", "problem": TOO_DEEP}]) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise RulesError([{"path": "", "problem": f"cannot be read: {' '.join(str(exc).split())}"}]) from None


def _check_shape(doc: Any) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, or holding text that UTF-8 cannot
    encode (a lone surrogate such as "\\ud800" in a mask would fail every message it
    redacts). Iterative: no depth of input can exhaust the stack here."""
    stack = [(doc, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not _utf8(value):
                raise RulesError([{"path": path, "problem": "holds text that is not valid Unicode "
                                                            "(a lone surrogate)"}])
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise RulesError([{"path": path, "problem": TOO_DEEP}])
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not _utf8(key):
                    raise RulesError([{"path": path, "problem": "has a key that is not valid Unicode "
                                                                "(a lone surrogate)"}])
                stack.append((item, where, depth + 1))
        else:
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# -- validating ------------------------------------------------------------------

def validate(doc: Any) -> dict:
    """The set in normal form, `{"rules": [...]}` with every rule's defaults and a list of
    actions; raises RulesError listing every fault with its path (`rules[2].condition.gt`)."""
    _check_shape(doc)
    errors: list[dict] = []
    programs: list[int] = []  # RE2 instructions of each regex, in the order met

    def fault(path: str, problem: str) -> None:
        errors.append({"path": path, "problem": problem})

    if isinstance(doc, dict) and set(doc) == {"rule"}:
        items, base = [doc["rule"]], "rule"
    elif isinstance(doc, dict) and set(doc) == {"rules"} and isinstance(doc["rules"], list):
        items, base = doc["rules"], "rules"
    elif doc == {}:
        items, base = [], "rules"
    else:
        raise RulesError([{"path": "", "problem": "must be a mapping with `rules: [...]` or one `rule: {...}`"}])
    if len(items) > MAX_RULES:
        raise RulesError([{"path": base, "problem": f"holds {len(items)} rules; at most {MAX_RULES}"}])
    rules, seen = [], set()
    for index, item in enumerate(items):
        path = base if base == "rule" else f"rules[{index}]"
        if not isinstance(item, dict):
            fault(path, "must be a mapping")
            continue
        for key in sorted(set(item) - RULE_KEYS, key=str):
            fault(f"{path}.{key}", "unknown key")
        rule_id = item.get("id")
        if not isinstance(rule_id, str) or not RULE_ID_RE.fullmatch(rule_id):
            fault(f"{path}.id", "must match [A-Za-z0-9_.:-]{1,64}")
        elif rule_id in seen:
            fault(f"{path}.id", f"{rule_id!r} is used by an earlier rule")
        else:
            seen.add(rule_id)
        if not isinstance(item.get("description", ""), str):
            fault(f"{path}.description", "must be text")
        if not isinstance(item.get("enabled", True), bool):
            fault(f"{path}.enabled", "must be true or false")
        priority = item.get("priority", 0)
        if not _is_int(priority) or abs(priority) > 1_000_000:
            fault(f"{path}.priority", "must be an integer between -1000000 and 1000000")
        if "condition" not in item:
            fault(f"{path}.condition", "required")
        else:
            _check_condition(item["condition"], f"{path}.condition", fault, programs)
        actions = _check_actions(item.get("action"), f"{path}.action", fault)
        rules.append({"id": rule_id, "description": item.get("description", ""),
                      "enabled": item.get("enabled", True), "priority": priority,
                      "condition": item.get("condition"), "action": [_written(a) for a in actions]})
    if sum(programs) > MAX_SET_PROGRAM:
        fault(base, f"its regexes come to {sum(programs)} RE2 instructions; at most {MAX_SET_PROGRAM}")
    if errors:
        raise RulesError(errors)
    return {"rules": rules}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


def _names(value) -> list | None:
    """A text or a non-empty list of texts, as a list; None when it is neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _check_condition(cond, path: str, fault, programs: list[int]) -> None:
    if not isinstance(cond, dict):
        fault(path, "must be a mapping")
        return
    for key in sorted(set(cond) - CONDITION_KEYS, key=str):
        fault(f"{path}.{key}", "unknown condition")
    for key in ("channel", "type", "sender"):
        if key in cond and _names(cond[key]) is None:
            fault(f"{path}.{key}", "must be text or a list of texts")
    ops = [op for op in OPERATORS if op in cond]
    if "field" in cond:
        if not isinstance(cond["field"], str) or not FIELD_RE.fullmatch(cond["field"]):
            fault(f"{path}.field", "must be a message field: id, channel, type, sender, ts or data.<path>")
        if not ops:
            fault(f"{path}.field", f"needs a test: one of {', '.join(OPERATORS)}")
    elif ops:
        fault(f"{path}.{ops[0]}", "needs a `field` to test")
    for op in ops:
        value, where = cond[op], f"{path}.{op}"
        if op in NUMERIC and not _is_number(value):
            fault(where, "must be a number")
        elif op in ("eq", "ne", "contains") and not _is_scalar(value):
            fault(where, "must be a text, number, boolean or null")
        elif op in ("in", "not_in") and not (isinstance(value, list) and all(_is_scalar(v) for v in value)):
            fault(where, "must be a list of texts, numbers, booleans or nulls")
        elif op == "exists" and not isinstance(value, bool):
            fault(where, "must be true or false")
        elif op == "matches":
            compiled, problem = compile_regex(value)
            if problem:
                fault(where, problem)
            else:
                programs.append(compiled.programsize)
    if "time_range" in cond:
        span = cond["time_range"]
        if not (isinstance(span, list) and len(span) == 2):
            fault(f"{path}.time_range", "must be [start, end], times as HH:MM")
        else:
            times = []
            for index, value in enumerate(span):
                moment = _time_of_day(value)
                if moment is None:
                    fault(f"{path}.time_range[{index}]", "must be a time, HH:MM or HH:MM:SS")
                times.append(moment)
            if None not in times and times[0] == times[1]:
                fault(f"{path}.time_range", "start and end are the same time")
    if "timezone" in cond:
        if "time_range" not in cond:
            fault(f"{path}.timezone", "goes with a time_range")
        elif not _zone_ok(cond["timezone"]):
            fault(f"{path}.timezone", "must be an IANA time zone (Europe/Paris, UTC)")
    if "amount_threshold" in cond:
        threshold = cond["amount_threshold"]
        if isinstance(threshold, dict):
            for key in sorted(set(threshold) - {"min", "field"}, key=str):
                fault(f"{path}.amount_threshold.{key}", "unknown key")
            if not _is_number(threshold.get("min")):
                fault(f"{path}.amount_threshold.min", "must be a number")
            if "field" in threshold and not (isinstance(threshold["field"], str)
                                             and FIELD_RE.fullmatch(threshold["field"])):
                fault(f"{path}.amount_threshold.field", "must be a message field such as data.amount")
        elif not _is_number(threshold):
            fault(f"{path}.amount_threshold", "must be a number, or {min, field}")
    if "rate" in cond:
        rate = cond["rate"]
        if not isinstance(rate, dict):
            fault(f"{path}.rate", "must be {max, per, by}")
        else:
            for key in sorted(set(rate) - {"max", "per", "by"}, key=str):
                fault(f"{path}.rate.{key}", "unknown key")
            if not _is_int(rate.get("max")) or rate["max"] < 1:
                fault(f"{path}.rate.max", "must be a whole number of messages, at least 1")
            if not _is_number(rate.get("per")) or not 0 < rate["per"] <= 86400:
                fault(f"{path}.rate.per", "must be seconds, more than 0 and at most 86400")
            if rate.get("by", "sender") not in ("sender", "channel"):
                fault(f"{path}.rate.by", "must be sender or channel")
    for key in ("all", "any"):
        if key in cond:
            if not isinstance(cond[key], list) or not cond[key]:
                fault(f"{path}.{key}", "must be a non-empty list of conditions")
            else:
                for index, sub in enumerate(cond[key]):
                    _check_condition(sub, f"{path}.{key}[{index}]", fault, programs)
    if "not" in cond:
        _check_condition(cond["not"], f"{path}.not", fault, programs)


def _check_actions(raw, path: str, fault) -> list[dict]:
    if raw is None:
        fault(path, "required")
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        fault(path, "must name at least one action")
    actions = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]" if isinstance(raw, list) else path
        if isinstance(item, str):
            if item in ("block", "alert", "block_and_alert"):
                actions.append({"do": item})
            elif item in ACTIONS:
                fault(where, f"{item} needs an argument: {{{item}: ...}}")
            else:
                fault(where, f"unknown action; one of {', '.join(ACTIONS)}")
            continue
        if not isinstance(item, dict) or len(item) != 1:
            fault(where, "must be an action name or a mapping of one action to its argument")
            continue
        (name, arg), = item.items()
        where = f"{where}.{name}"
        if name == "route":
            target = arg.get("channel") if isinstance(arg, dict) and set(arg) == {"channel"} else arg
            if not valid_channel(target):
                fault(where, "must be a channel name (or {channel: name})")
            else:
                actions.append({"do": "route", "channel": target})
        elif name == "redact":
            fields, mask = (arg.get("fields"), arg.get("mask", MISSING)) if isinstance(arg, dict) else (arg, MISSING)
            if isinstance(arg, dict) and set(arg) - {"fields", "mask"}:
                fault(where, "takes fields and mask")
            names = _names(fields)
            if names is None or not all(re.fullmatch(r"data(\.[^.\s]{1,100}){1,16}", n) for n in names):
                fault(where, "must list fields under data (data.card)")
            elif mask is not MISSING and not isinstance(mask, str):
                fault(f"{where}.mask", "must be text")
            else:
                actions.append({"do": "redact", "fields": names, **({} if mask is MISSING else {"mask": mask})})
        elif name == "tag":
            names = _names(arg)
            if names is None or not all(re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", n) for n in names):
                fault(where, "must be a tag or a list of tags ([A-Za-z0-9_.:-]{1,64})")
            else:
                actions.append({"do": "tag", "tags": names})
        elif name in ("block", "alert", "block_and_alert") and arg in (True, None):
            actions.append({"do": name})
        else:
            fault(where, f"unknown action; one of {', '.join(ACTIONS)}")
    return actions


def _written(action: dict) -> str | dict:
    """An action as a rule set writes it, so that what GET returns can be PUT back."""
    kind = action["do"]
    if kind == "route":
        return {"route": action["channel"]}
    if kind == "redact":
        return {"redact": {key: action[key] for key in ("fields", "mask") if key in action}}
    if kind == "tag":
        return {"tag": action["tags"]}
    return kind


def _time_of_day(value) -> int | None:
    """Seconds after midnight of "HH:MM[:SS]", else None."""
    match = TIME_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)


def _zone_ok(name) -> bool:
    if not isinstance(name, str):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def compile_regex(pattern) -> tuple[Any, str | None]:
    """(the RE2 regex, None), or (None, why `pattern` may not be a `matches` test).

    RE2 matches in time linear in the value, whatever the pattern: there is
    no backtracking to bound. Its syntax is Python's less what needs
    backtracking (backreferences, lookaround), which it refuses. A regex sees
    a value's first MATCH_LIMIT characters.
    """
    if not isinstance(pattern, str):
        return None, "must be a regular expression (text)"
    if len(pattern) > MAX_PATTERN:
        return None, f"is {len(pattern)} characters; at most {MAX_PATTERN}"
    if not _utf8(pattern):
        return None, "holds text that is not valid Unicode (a lone surrogate)"
    try:
        compiled = re2.compile(pattern, _RE2)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return None, f"is not a regular expression RE2 accepts: {reason}"
    if compiled.programsize > MAX_PROGRAM:
        return None, f"compiles to {compiled.programsize} RE2 instructions; at most {MAX_PROGRAM}"
    return compiled, None


# -- compiling -------------------------------------------------------------------

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
        one.data_key = key  # lets a numeric test look the key up itself (_field_test)
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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_test(get, op: str, expected) -> Test:
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
        key = getattr(get, "data_key", None)
        if key is not None:
            # The usual shape (data.amount > N): the lookup inline, one call a test, not three.
            def numeric_data(e, c):
                data = e.data
                value = data.get(key) if isinstance(data, dict) else None
                return isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and compare(value, bound)
            return numeric_data

        def numeric(e, c):
            value = get(e)
            return _number(value) and compare(value, bound)
        return numeric
    if op in ("in", "not_in"):
        options = list(expected)
        inside = (lambda value: any(_same(value, o) for o in options))
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
            globs = _names(cond["channel"])
        else:
            match = _globs(_names(cond["channel"]))
            tests.append(lambda e, c: match(e.channel))
    if "type" in cond and top:
        types = frozenset(_names(cond["type"]))
    for key in ("type", "sender") if not top else ("sender",):
        if key in cond:
            options = frozenset(_names(cond[key]))
            tests.append((lambda e, c, o=options: e.type in o) if key == "type"
                         else (lambda e, c, o=options: e.sender in o))
    if "field" in cond:
        get = _getter(cond["field"])
        tests += [_field_test(get, op, cond[op]) for op in OPERATORS if op in cond]
    if "amount_threshold" in cond:
        threshold = cond["amount_threshold"]
        spec = threshold if isinstance(threshold, dict) else {"min": threshold}
        tests.append(_field_test(_getter(spec.get("field", "data.amount")), "gte", spec["min"]))
    for key in ("all", "any"):
        if key in cond:
            subs = [_whole(sub, rule_id, default_zone) for sub in cond[key]]
            if key == "all":
                tests.append(lambda e, c, s=subs: all(t(e, c) for t in s))
            else:
                tests.append(lambda e, c, s=subs: any(t(e, c) for t in s))
    if "not" in cond:
        inner = _whole(cond["not"], rule_id, default_zone)
        tests.append(lambda e, c: not inner(e, c))
    if "time_range" in cond:
        zone = zoneinfo.ZoneInfo(cond.get("timezone") or default_zone)
        start, end = (_time_of_day(t) for t in cond["time_range"])
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


def _whole(cond: dict, rule_id: str, default_zone: str) -> Test:
    _globs_unused, _types_unused, tests = _compile_condition(cond, rule_id, default_zone, top=False)
    if len(tests) == 1:
        return tests[0]
    return lambda e, c: all(t(e, c) for t in tests)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    id: str
    priority: int
    globs: Callable[[str], bool] | None  # None: any channel
    types: frozenset | None  # None: any type
    tests: tuple
    actions: tuple


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

    def record(self) -> dict:
        """The decision as the envelope carries it (`Envelope.rules`): only what is set."""
        out: dict = {"v": self.version}
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
            actions = _check_actions(rule["action"], "action", _never)
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
                _apply(rule, decision, envelope.channel)
                if decision.block:
                    break
        return decision


def _apply(rule: Rule, decision: Decision, channel: str) -> None:
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
    exhaust the stack here, as `copy.deepcopy` did past ~500 levels.
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


def compile_set(doc: dict, version: int, default_zone: str = "UTC") -> RuleSet:
    """A validated set (`validate`'s output) compiled for evaluation."""
    return RuleSet(doc, version, default_zone)


# What the dry run puts at every field a rule names: each kind of JSON value,
# the extremes a message may hold among them (docs/guide.md: "Rules").
PROBES = (0, 10**400, -(10**400), 0.5, 1e308, "", "x" * (MATCH_LIMIT + 1), [1, "a", None, [2]], {"a": {"b": 1}},
          None, True)


def checked(doc: dict, version: int, default_zone: str = "UTC") -> RuleSet:
    """`compile_set`, then a dry run: every test of every enabled rule on a message
    holding each of PROBES at each field the rule names, and its actions applied and
    encoded as a worker would. RulesError when either fails: a set is refused whole
    rather than failing on messages later."""
    try:
        rule_set = compile_set(doc, version, default_zone)
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
                    _apply(rule, decision, envelope.channel)
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


def load(text: str | bytes, media_type: str = "application/yaml") -> dict:
    """`validate(parse(text))`: the normal form of a rule set text, or RulesError."""
    return validate(parse(text, media_type))
