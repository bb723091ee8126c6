"""The rule set's JSON Schema, as the OpenAPI document serves it: generated from the
declarations that validate a set, it agrees with the validator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
import pytest

from pipeline import rules

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"


def served() -> dict[str, jsonschema_rs.Draft202012Validator]:
    """A validator for each place the OpenAPI document takes a rule set, its references
    resolved against the document's components."""
    from web.api import document

    doc = document()
    put = doc["paths"]["/api/v1/rules"]["put"]["requestBody"]["content"]
    places = {media: content["schema"] for media, content in put.items()}
    places["POST /rules/test"] = doc["components"]["schemas"]["RulesTest"]["properties"]["rules"]
    return {place: jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]})
            for place, schema in places.items()}


VALIDATORS = served()


def guide_example() -> str:
    """The rule set docs/guide.md shows under "Rules"."""
    section = GUIDE.read_text().split("\n## Rules\n", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S)[1]


def verdicts(doc) -> tuple[bool, set[bool]]:
    """(whether the validator takes `doc`, what each served schema says of it)."""
    try:
        rules.validate(doc)
        valid = True
    except rules.RulesError:
        valid = False
    return valid, {validator.is_valid(doc) for validator in VALIDATORS.values()}


def test_the_schema_takes_the_guides_example():
    doc = rules.parse(guide_example())
    assert doc["rule"]["id"] == "night_high_value_block"
    assert verdicts(doc) == (True, {True})


RULE = {"id": "r", "condition": {}, "action": "alert"}


def rule(**changes) -> dict:
    return {"rule": {**RULE, **changes}}


GOOD = [
    {}, {"rules": []}, rule(), rule(description="d", enabled=False, priority=-5),
    rule(condition={"channel": "pay:*", "type": ["payment", "refund"], "sender": "alice"}),
    rule(condition={"field": "data.x.0", "matches": "^a+$", "ne": None, "in": [1, "a", None, True]}),
    rule(condition={"time_range": ["22:00", "6:00:30"], "timezone": "Europe/Paris"}),
    rule(condition={"amount_threshold": {"min": 1.5, "field": "data.total"}}),
    rule(condition={"rate": {"max": 3, "per": 0.5, "by": "channel"}}),
    rule(condition={"any": [{"all": [{"not": {"sender": "bob"}}]}, {"field": "id", "exists": False}]}),
    rule(action=["block", {"alert": True}, {"block_and_alert": None}, {"route": "audit:x"},
                 {"route": {"channel": "a"}}, {"redact": "data.card"}, {"redact": {"fields": ["data.a"], "mask": "*"}},
                 {"tag": ["a", "b"]}]),
    rule(action={"block": 1}),  # 1 == True
]
BAD = [
    [], {"rule": RULE, "rules": []}, {"rules": {}}, {"other": 1}, {"rules": [5]}, {"rules": [RULE] * 1001},
    rule(id="no spaces"), rule(id=5), {"rule": {"condition": {}, "action": "alert"}}, rule(description=1),
    rule(enabled="yes"), rule(priority=1_000_001), rule(priority="high"), rule(when="now"),
    {"rule": {"id": "r", "action": "alert"}}, {"rule": {"id": "r", "condition": {}}}, rule(action=None),
    rule(condition=[]), rule(condition={"frobnicate": 1}), rule(condition={"type": 5}), rule(condition={"sender": []}),
    rule(condition={"gt": 5}), rule(condition={"field": "data.x"}), rule(condition={"field": "secret", "eq": 1}),
    rule(condition={"field": "data.x", "gt": "lots"}), rule(condition={"field": "data.x", "eq": [1]}),
    rule(condition={"field": "data.x", "in": 5}), rule(condition={"field": "data.x", "in": [{}]}),
    rule(condition={"field": "data.x", "exists": 1}), rule(condition={"field": "data.x", "matches": "a" * 257}),
    rule(condition={"field": "data.x", "matches": 5}), rule(condition={"time_range": ["06:00"]}),
    rule(condition={"time_range": ["25:00", "06:00"]}), rule(condition={"timezone": "UTC"}),
    rule(condition={"amount_threshold": "lots"}), rule(condition={"amount_threshold": {"field": "data.x"}}),
    rule(condition={"amount_threshold": {"min": 1, "max": 2}}), rule(condition={"rate": 5}),
    rule(condition={"rate": {"max": 0, "per": 60}}), rule(condition={"rate": {"max": 1, "per": 0}}),
    rule(condition={"rate": {"max": 1, "per": 86401}}), rule(condition={"rate": {"max": 1, "per": 60, "by": "ip"}}),
    rule(condition={"rate": {"per": 60}}), rule(condition={"any": []}), rule(condition={"all": {}}),
    rule(condition={"not": [1]}), rule(action=[]), rule(action="explode"), rule(action="route"),
    rule(action=[["alert"]]), rule(action={"route": "no spaces"}), rule(action={"route": "a", "tag": "b"}),
    rule(action={"redact": ["channel"]}), rule(action={"redact": {"fields": ["data.a"], "mask": 1}}),
    rule(action={"redact": {"fields": ["data.a"], "other": 1}}), rule(action={"tag": "a b"}),
    rule(action={"block": False}), rule(action={"explode": True}),
]


@pytest.mark.parametrize("doc", GOOD, ids=lambda doc: json.dumps(doc)[:60])
def test_the_schema_takes_what_the_validator_takes(doc):
    assert verdicts(doc) == (True, {True})


@pytest.mark.parametrize("doc", BAD, ids=lambda doc: json.dumps(doc)[:60])
def test_the_schema_refuses_what_the_validator_refuses(doc):
    assert verdicts(doc) == (False, {False})


# What JSON Schema cannot state: the validator alone refuses these (a 422 listing each).
BEYOND = [
    {"rules": [RULE, RULE]},  # an id used twice
    rule(condition={"field": "data.x", "matches": "(?=a)"}),  # a regex RE2 refuses
    rule(condition={"time_range": ["06:00", "06:00"]}),  # starts where it ends
    rule(condition={"time_range": ["01:00", "02:00"], "timezone": "Mars/Olympus"}),  # not in the tz database
    rule(condition=json.loads('{"not": ' * 40 + "{}" + "}" * 40)),  # nested past MAX_DEPTH
    rule(description="\ud800"),  # text UTF-8 cannot encode
]


@pytest.mark.parametrize("doc", BEYOND, ids=lambda doc: json.dumps(doc)[:60])
def test_what_the_schema_cannot_state_the_validator_refuses(doc):
    assert verdicts(doc) == (False, {True})


def test_the_schema_is_printed_for_editors():
    out = subprocess.run([sys.executable, "-m", "pipeline.rules.schema"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    schema = json.loads(out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator = jsonschema_rs.Draft202012Validator(schema)
    assert validator.is_valid(rules.parse(guide_example())) and not validator.is_valid(BAD[-1])
