"""`flask --app app rules load FILE | show | test FILE MESSAGE_JSON`, run as a shell runs them, on a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.harness import ROOT, start_environment

GOOD = """\
rules:
  - id: big
    priority: 5
    condition: {channel: 'pay:*', amount_threshold: 50000}
    action: block_and_alert
  - id: card
    priority: 10
    condition: {field: data.card, exists: true}
    action: {redact: {fields: [data.card], mask: '****'}}
"""
BAD = """\
rules:
  - {id: fine, condition: {}, action: alert}
  - {id: bad, condition: {field: data.amount, gt: lots}, action: [explode]}
"""


@pytest.fixture
def flask_rules(spare_redis_url):
    """Run `flask --app app rules ARGS` against a Redis prefix of its own: (exit code, stdout, stderr)."""
    env = start_environment(REDIS_URL=spare_redis_url, HERALD_REDIS_PREFIX=f"cli{uuid.uuid4().hex[:8]}",
                            PYTHONPATH=str(ROOT))

    def run(*args: str) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "rules", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
        return done.returncode, done.stdout, done.stderr

    return run


def test_load_show_and_test_a_set(flask_rules, tmp_path):
    code, out, err = flask_rules("show")
    assert code == 0, err
    assert json.loads(out) == {"version": 0, "rules": []}
    good = tmp_path / "rules.yaml"
    good.write_text(GOOD)
    code, out, err = flask_rules("load", str(good))
    assert code == 0, err
    assert json.loads(out) == {"version": 1, "rules": 2}
    code, out, err = flask_rules("show")
    shown = json.loads(out)
    assert code == 0 and shown["version"] == 1 and [r["id"] for r in shown["rules"]] == ["big", "card"]
    assert shown["rules"][0]["action"] == ["block_and_alert"] and shown["rules"][1]["enabled"] is True
    # What `show` prints, as JSON, loads back as the same set (a new version).
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"rules": shown["rules"]}))
    code, out, err = flask_rules("load", str(again))
    assert code == 0 and json.loads(out) == {"version": 2, "rules": 2}, err

    code, out, err = flask_rules("test", str(good), json.dumps(
        {"channel": "pay:eu", "data": {"amount": 60000, "card": "4111"}, "sender": "alice"}))
    assert code == 0, err
    assert json.loads(out) == {"version": 0, "matched": [["card", "redact"], ["big", "block_and_alert"]],
                               "blocked": "big", "alerts": ["big"], "routes": [], "tags": [],
                               "data": {"amount": 60000, "card": "****"}}
    code, out, err = flask_rules("test", str(good), '{"channel": "chat:x", "data": {"amount": 1}}')
    assert code == 0 and json.loads(out)["matched"] == [] and json.loads(out)["blocked"] is None, err


def test_a_bad_file_is_refused_whole_naming_each_fault_by_its_path(flask_rules, tmp_path):
    good = tmp_path / "rules.yaml"
    good.write_text(GOOD)
    assert flask_rules("load", str(good))[0] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    for args in (("load", str(bad)), ("test", str(bad), '{"channel": "a", "data": 1}')):
        code, out, err = flask_rules(*args)
        assert code == 1 and out == ""
        assert err.splitlines() == [
            "rules[1].condition.gt: must be a number",
            "rules[1].action[0]: unknown action; one of block, alert, block_and_alert, route, redact, tag",
            f"Error: {bad}: the rule set is invalid; nothing was changed"]
    unreadable = tmp_path / "unreadable.yaml"
    unreadable.write_text("rules: [")
    code, _out, err = flask_rules("load", str(unreadable))
    assert code == 1 and err.startswith(f"{unreadable}: cannot be read:")
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{"rules": [{"id": "\xe9"}]}')
    code, _out, err = flask_rules("load", str(not_utf8))
    assert code == 1 and err.startswith(f"{not_utf8}: is not UTF-8 text")
    code, _out, err = flask_rules("load", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err
    # Nothing changed: the set loaded first is still in force.
    code, out, _err = flask_rules("show")
    assert code == 0 and json.loads(out)["version"] == 1 and [r["id"] for r in json.loads(out)["rules"]] == [
        "big", "card"]


@pytest.mark.parametrize("message, lines", [
    ('{"channel": "pay:x"', ["Error: MESSAGE is not a message: Expecting ',' delimiter: line 1 column 20 (char 19)"]),
    ("[1]", ["Error: MESSAGE is not a message: not an object"]),
    ('{"channel": "no spaces", "data": 1, "extra": 2}', [
        "channel: must match [A-Za-z0-9_:.@-]{1,200}", "extra: unknown field",
        "Error: MESSAGE is not a message: The message has invalid fields"]),
    ('{"channel": "pay:x"}', ["data: required", "Error: MESSAGE is not a message: The message has invalid fields"]),
])
def test_a_bad_message_is_refused_saying_why(flask_rules, tmp_path, message, lines):
    good = tmp_path / "rules.yaml"
    good.write_text(GOOD)
    code, out, err = flask_rules("test", str(good), message)
    assert (code, out, err.splitlines()) == (1, "", lines)


@pytest.mark.parametrize("name, text, line", [
    ("bomb.yaml", "rules: [{id: r, action: alert, condition: {all: [&a {channel: x}, {any: [*a, *a]}]}}]",
     "uses an alias (*a) at line 1; aliases are not allowed"),
    ("deep.json", '{"rule": {"id": "r", "condition": ' + '{"not": ' * 600 + "{}" + "}" * 600 + ', "action": "block"}}',
     "rule.condition" + ".not" * 30 + ": nests deeper than 32 levels of mappings and lists"),
    ("mask.json", '{"rule": {"id": "r", "condition": {}, "action": {"redact": {"fields": ["data.card"], '
                  '"mask": "\\ud800"}}}}', "rule.action.redact.mask: holds text that is not valid Unicode (a lone "
                                           "surrogate)"),
])
def test_load_refuses_a_set_workers_could_not_run(flask_rules, tmp_path, name, text, line):
    good = tmp_path / "rules.yaml"
    good.write_text(GOOD)
    assert flask_rules("load", str(good))[0] == 0
    bad = tmp_path / name
    bad.write_text(text)
    code, out, err = flask_rules("load", str(bad))
    lines = [line if line.startswith("rule") else f"{bad}: {line}",
             f"Error: {bad}: the rule set is invalid; nothing was changed"]
    assert (code, out, err.splitlines()) == (1, "", lines)
    code, out, _err = flask_rules("show")
    assert code == 0 and json.loads(out)["version"] == 1
