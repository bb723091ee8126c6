"""Validating a rule set document against its declared structure (schema.py): every
fault listed with its path (`rules[2].condition.gt: must be a number`), in the
order met, and the set in normal form.
"""

from __future__ import annotations

from typing import Any

from pipeline.rules.reading import RulesError, check_shape, parse
from pipeline.rules.schema import (
    ACTIONS,
    CHANNEL,
    CONDITION_KEYS,
    DATA_FIELDS,
    FIELD,
    FLAG,
    FLAGS,
    MAX_RULES,
    MAX_SET_PROGRAM,
    MISSING,
    NAMES,
    NUMBER,
    OPERANDS,
    OPERATORS,
    RATE,
    RULE_FIELDS,
    RULE_KEYS,
    TAGS,
    TEXT,
    THRESHOLD,
    TIME,
    TIME_RANGE,
    TIMEZONE,
    Value,
    compile_regex,
    names,
    time_of_day,
)


def _judge(kind: Value, value, path: str, fault) -> bool:
    """Whether `value` is of `kind`; reports its problem at `path` when it is not."""
    problem = kind.problem_of(value)
    if problem:
        fault(path, problem)
    return not problem


def validate(doc: Any) -> dict:
    """The set in normal form, `{"rules": [...]}` with every rule's defaults and a list of
    actions; raises RulesError listing every fault with its path (`rules[2].condition.gt`)."""
    check_shape(doc)
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
        if _judge(RULE_FIELDS["id"], rule_id, f"{path}.id", fault):
            if rule_id in seen:
                fault(f"{path}.id", f"{rule_id!r} is used by an earlier rule")
            seen.add(rule_id)
        for key in ("description", "enabled", "priority"):
            if key in item:
                _judge(RULE_FIELDS[key], item[key], f"{path}.{key}", fault)
        if "condition" not in item:
            fault(f"{path}.condition", "required")
        else:
            _check_condition(item["condition"], f"{path}.condition", fault, programs)
        actions = normal_actions(item.get("action"), f"{path}.action", fault)
        rules.append({"id": rule_id, "description": item.get("description", ""),
                      "enabled": item.get("enabled", True), "priority": item.get("priority", 0),
                      "condition": item.get("condition"), "action": [_written(a) for a in actions]})
    if sum(programs) > MAX_SET_PROGRAM:
        fault(base, f"its regexes come to {sum(programs)} RE2 instructions; at most {MAX_SET_PROGRAM}")
    if errors:
        raise RulesError(errors)
    return {"rules": rules}


def _check_condition(cond, path: str, fault, programs: list[int]) -> None:
    if not isinstance(cond, dict):
        fault(path, "must be a mapping")
        return
    for key in sorted(set(cond) - CONDITION_KEYS, key=str):
        fault(f"{path}.{key}", "unknown condition")
    for key in ("channel", "type", "sender"):
        if key in cond:
            _judge(NAMES, cond[key], f"{path}.{key}", fault)
    ops = [op for op in OPERATORS if op in cond]
    if "field" in cond:
        _judge(FIELD, cond["field"], f"{path}.field", fault)
        if not ops:
            fault(f"{path}.field", f"needs a test: one of {', '.join(OPERATORS)}")
    elif ops:
        fault(f"{path}.{ops[0]}", "needs a `field` to test")
    for op in ops:
        if _judge(OPERANDS[op], cond[op], f"{path}.{op}", fault) and op == "matches":
            programs.append(compile_regex(cond[op])[0].programsize)
    if "time_range" in cond:
        span = cond["time_range"]
        if _judge(TIME_RANGE, span, f"{path}.time_range", fault):
            times = [_judge(TIME, value, f"{path}.time_range[{index}]", fault) for index, value in enumerate(span)]
            if all(times) and time_of_day(span[0]) == time_of_day(span[1]):
                fault(f"{path}.time_range", "start and end are the same time")
    if "timezone" in cond:
        if "time_range" not in cond:
            fault(f"{path}.timezone", "goes with a time_range")
        else:
            _judge(TIMEZONE, cond["timezone"], f"{path}.timezone", fault)
    if "amount_threshold" in cond:
        threshold = cond["amount_threshold"]
        if isinstance(threshold, dict):
            THRESHOLD.check(threshold, f"{path}.amount_threshold", fault)
        elif NUMBER.problem_of(threshold):
            fault(f"{path}.amount_threshold", "must be a number, or {min, field}")
    if "rate" in cond:
        if isinstance(cond["rate"], dict):
            RATE.check(cond["rate"], f"{path}.rate", fault)
        else:
            fault(f"{path}.rate", "must be {max, per, by}")
    for key in ("all", "any"):
        if key in cond:
            if not isinstance(cond[key], list) or not cond[key]:
                fault(f"{path}.{key}", "must be a non-empty list of conditions")
            else:
                for index, sub in enumerate(cond[key]):
                    _check_condition(sub, f"{path}.{key}[{index}]", fault, programs)
    if "not" in cond:
        _check_condition(cond["not"], f"{path}.not", fault, programs)


def normal_actions(raw, path: str, fault) -> list[dict]:
    """A rule's `action` (one or a list) as `{"do": kind, ...}` mappings; each fault is
    reported through `fault(path, problem)`."""
    if raw is None:
        fault(path, "required")
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        fault(path, "must name at least one action")
    actions: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]" if isinstance(raw, list) else path
        if isinstance(item, str):
            if item in FLAGS:
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
            if _judge(CHANNEL, target, where, fault):
                actions.append({"do": "route", "channel": target})
        elif name == "redact":
            fields, mask = (arg.get("fields"), arg.get("mask", MISSING)) if isinstance(arg, dict) else (arg, MISSING)
            if isinstance(arg, dict) and set(arg) - {"fields", "mask"}:
                fault(where, "takes fields and mask")
            if _judge(DATA_FIELDS, fields, where, fault) and (mask is MISSING
                                                              or _judge(TEXT, mask, f"{where}.mask", fault)):
                actions.append({"do": "redact", "fields": names(fields), **({} if mask is MISSING else {"mask": mask})})
        elif name == "tag":
            if _judge(TAGS, arg, where, fault):
                actions.append({"do": "tag", "tags": names(arg)})
        elif name in FLAGS:
            if _judge(FLAG, arg, where, fault):
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


def load(text: str | bytes, media_type: str = "application/yaml") -> dict:
    """`validate(parse(text))`: the normal form of a rule set text, or RulesError."""
    return validate(parse(text, media_type))
