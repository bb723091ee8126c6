"""Rules on the running pipeline: PUT a set, publish, and see blocks, alerts, routes and redaction."""

from __future__ import annotations

import collections
import threading
import time
import uuid

import pytest

from tests.harness import wait_until

APPLY = 1.5  # seconds: every worker applies a new version within 1 s


@pytest.fixture
def admin(stack):
    return stack.token("rules-admin", admin=True)


@pytest.fixture
def put_rules(web, admin):
    """PUT a rule set (YAML text); the set is emptied after the test."""
    def put(text: str, content_type: str = "application/yaml"):
        status, _, body = web.request("PUT", "/api/v1/rules", raw=text.encode(), content_type=content_type,
                                      token=admin)
        assert status == 200, body
        time.sleep(APPLY)
        return body

    yield put
    web.request("PUT", "/api/v1/rules", raw=b"rules: []", content_type="application/yaml", token=admin)


def publish(web, token, channel, data):
    status, _, body = web.request("POST", "/api/v1/messages", {"channel": channel, "data": data}, token=token)
    assert status == 202, body
    return body["id"]


def status_of(web, token, msg_id):
    return web.request("GET", f"/api/v1/messages/{msg_id}", token=token)[2]


def test_block_alert_route_redact_and_tag(stack, web, token, channel, put_rules):
    copy = f"{channel}-copy"
    version = put_rules(f"""
rules:
  - id: big-{channel[5:]}
    condition: {{channel: '{channel}', amount_threshold: 50000}}
    action: block_and_alert
  - id: copy-{channel[5:]}
    condition: {{channel: '{channel}', field: data.kind, eq: copy}}
    action: [{{route: '{copy}'}}, {{tag: copied}}]
  - id: pii-{channel[5:]}
    priority: 10
    condition: {{channel: '{channel}'}}
    action: {{redact: [data.card]}}
""")["version"]
    assert web.request("GET", "/api/v1/rules", token=stack.token("a", admin=True))[2]["version"] == version
    alerts, watcher, copies, publisher = web.ws(token), web.ws(token), web.ws(token), web.ws(token)
    for client in (alerts, watcher, copies, publisher):
        client.recv()
    alerts.subscribe(stack.settings.rules_alert_channel)
    watcher.subscribe(channel, status=True)
    copies.subscribe(copy)

    publisher.send({"op": "publish", "channel": channel, "data": {"amount": 60000, "card": "4111"}, "ref": "b"})
    blocked = publisher.expect(lambda f: f["op"] == "ack")["id"]
    assert publisher.expect(lambda f: f["op"] == "status" and f["id"] == blocked)["status"] == "rejected"
    assert watcher.expect(lambda f: f["op"] == "status" and f["id"] == blocked)["status"] == "rejected"
    alert = alerts.expect(lambda f: f["op"] == "message" and f["data"]["message"]["id"] == blocked)
    assert alert["type"] == "rule.alert" and alert["data"]["rule"] == f"big-{channel[5:]}"
    assert alert["data"]["blocked"] is True and alert["data"]["message"]["data"] == {"amount": 60000}
    answer = status_of(web, token, blocked)
    assert answer["status"] == "rejected" and answer["rule"] == f"big-{channel[5:]}"
    # A blocked message's data is not served (docs/guide.md: Rules); the alert carries it.
    assert answer["error"] == f"blocked by rule big-{channel[5:]}" and answer["data"] is None

    routed = publish(web, token, channel, {"kind": "copy", "card": "4111", "amount": 5})
    first = watcher.expect(lambda f: f["op"] == "message")
    assert first["id"] == routed and first["data"] == {"kind": "copy", "amount": 5} and first["tags"] == ["copied"]
    other = copies.expect(lambda f: f["op"] == "message")
    assert other["id"] == routed and other["channel"] == copy and other["data"] == first["data"]
    assert status_of(web, token, routed)["data"] == {"kind": "copy", "amount": 5}  # never stored unredacted
    history = web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"]
    assert [m["id"] for m in history] == [routed]  # the blocked one was never delivered
    # Exactly once: no second alert or copy arrives.
    assert not [f for f in alerts.drain(1.0) if f.get("data", {}).get("message", {}).get("id") == blocked]
    assert not [f for f in copies.drain(0.5) if f.get("op") == "message"]
    for client in (alerts, watcher, copies, publisher):
        client.close()


def test_a_blocked_message_lets_the_next_of_its_channel_through_in_order(stack, web, token, channel, put_rules):
    put_rules(f"rule: {{id: stop-{channel[5:]}, condition: {{channel: '{channel}', field: data, eq: 1}}, "
              "action: block}")
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    ids = [publish(web, token, channel, n % 3) for n in range(9)]
    got = [client.expect(lambda f: f["op"] == "message")["id"] for _ in range(6)]
    assert got == [i for n, i in enumerate(ids) if n % 3 != 1]
    assert all(status_of(web, token, i)["status"] == "rejected" for n, i in enumerate(ids) if n % 3 == 1)
    client.close()


def test_rules_endpoints_refuse_without_an_admin_token(web, token):
    assert web.request("GET", "/api/v1/rules")[0] == 401
    assert web.request("GET", "/api/v1/rules", token=token)[0] == 403
    status, _, body = web.request("PUT", "/api/v1/rules", raw=b"rules: []", content_type="application/yaml",
                                  token=token)
    assert status == 403 and body["status"] == 403
    assert web.request("POST", "/api/v1/rules/test", {"message": {"channel": "a", "data": 1}}, token=token)[0] == 403


def test_a_bad_set_is_refused_whole_and_nothing_changes(stack, web, admin, put_rules):
    before = put_rules("rule: {id: keep, condition: {channel: 'nothing:here'}, action: alert}")
    status, headers, body = web.request("PUT", "/api/v1/rules", raw=b"""
rules:
  - {id: fine, condition: {}, action: alert}
  - {id: fine2, condition: {}, action: alert}
  - {id: bad, condition: {field: data.amount, gt: lots}, action: [explode]}
""", content_type="application/yaml", token=admin)
    assert status == 422 and headers["Content-Type"] == "application/problem+json"
    assert [e["error"] for e in body["errors"]] == [
        "rules[2].condition.gt: must be a number",
        "rules[2].action[0]: unknown action; one of block, alert, block_and_alert, route, redact, tag"]
    assert web.request("GET", "/api/v1/rules", token=admin)[2] == before
    assert web.request("PUT", "/api/v1/rules", raw=b"rules: [", content_type="application/yaml",
                       token=admin)[0] == 422
    assert web.request("PUT", "/api/v1/rules", raw=b"rules: []", content_type="text/plain", token=admin)[0] == 415


def test_the_seed_in_json_and_the_dry_run(web, admin):
    seed = {"rule": {"id": "night_high_value_block", "condition": {"time_range": ["22:00", "06:00"],
                                                                   "amount_threshold": 50000},
                     "action": "block_and_alert"}}
    status, _, body = web.request("POST", "/api/v1/rules/test", {"message": {"channel": "pay:x", "data": {
        "amount": 1}}, "rules": seed}, token=admin)
    assert status == 200 and body["matched"] == [] and body["blocked"] is None
    status, _, body = web.request("POST", "/api/v1/rules/test", {"message": {"channel": "pay:x", "data": 1},
                                                                 "rules": {"rule": {"id": "x"}}}, token=admin)
    assert status == 422 and {e["field"] for e in body["errors"]} == {"rule.condition", "rule.action"}


def test_a_new_version_applies_under_load_and_no_message_sees_a_mixed_set(stack, web, token, channel, put_rules,
                                                                          admin):
    def rule_set(name):
        return (f"rules: [{{id: {name}1, condition: {{channel: '{channel}*'}}, action: {{tag: {name}1}}}}, "
                f"{{id: {name}2, condition: {{channel: '{channel}*'}}, action: {{tag: {name}2}}}}]").encode()

    put_rules(rule_set("a").decode())
    client = web.ws(token)
    client.recv()
    channels = [f"{channel}-{i}" for i in range(4)]
    for name in channels:
        client.subscribe(name)
    sent: list[str] = []
    stop = threading.Event()

    def load():
        n = 0
        while not stop.is_set():
            sent.append(publish(web, token, channels[n % 4], n))
            n += 1

    thread = threading.Thread(target=load)
    thread.start()
    swapped_at = []
    for name in ("b", "a", "b", "a", "b"):
        time.sleep(0.4)
        assert web.request("PUT", "/api/v1/rules", raw=rule_set(name), content_type="application/yaml",
                           token=admin)[0] == 200
        swapped_at.append(len(sent))
    time.sleep(1.2)  # every worker has the last set now
    after = len(sent)
    time.sleep(0.6)
    stop.set()
    thread.join()
    tags = {}
    while len(tags) < len(sent):
        frame = client.expect(lambda f: f["op"] == "message", timeout=30)
        tags[frame["id"]] = tuple(frame["tags"])
    kinds = collections.Counter(tags.values())
    assert set(kinds) <= {("a1", "a2"), ("b1", "b2")}, kinds
    assert len(kinds) == 2
    assert {tags[i] for i in sent[after:]} == {("b1", "b2")}
    client.close()


def test_a_rate_rule_counts_across_two_workers(stack, web, channel, put_rules):
    user = f"rate-{uuid.uuid4().hex[:8]}"
    token = stack.token(user)
    second = stack.worker("worker-rate")
    try:
        put_rules(f"rule: {{id: burst-{user}, condition: {{sender: {user}, rate: {{max: 5, per: 60, by: sender}}}}, "
                  "action: block}")
        ids = [publish(web, token, f"{channel}-{n}", n) for n in range(24)]
        statuses = wait_until(lambda: (lambda s: s if all(v in ("delivered", "rejected") for v in s) else None)(
            [status_of(web, token, i)["status"] for i in ids]), 30, what="every message handled")
        assert statuses.count("delivered") == 5 and statuses.count("rejected") == 19
        # The second worker took part: it applied the set and processed a batch.
        assert "rules applied" in second.log() and "batch processed" in second.log()
    finally:
        second.stop(15)


# -- sets that would hurt workers are refused whole, up front (docs/guide.md: "Rules") ---------------

ALIAS_BOMB = b"""
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


def deep_not(depth: int) -> bytes:
    """A rule set in JSON whose condition is `not` in `not` ... `depth` times."""
    return ('{"rule": {"id": "deep", "condition": ' + '{"not": ' * depth + '{"field": "data.x", "eq": 1}'
            + "}" * depth + ', "action": "block"}}').encode()


@pytest.mark.parametrize("body, content_type, error", [
    (ALIAS_BOMB, "application/yaml", "uses an alias (*a) at line 7; aliases are not allowed"),
    (deep_not(600), "application/json",
     "rule.condition" + ".not" * 30 + ": nests deeper than 32 levels of mappings and lists"),
    (deep_not(600).replace(b'"', b"'"), "application/yaml", "nests deeper than 32 levels of mappings and lists"),
    (b'{"rule": {"id": "m", "condition": {}, "action": {"redact": {"fields": ["data.card"], "mask": "\\ud800"}}}}',
     "application/json", "rule.action.redact.mask: holds text that is not valid Unicode (a lone surrogate)"),
    (b"rule: {id: r, condition: {field: data.x, matches: '(a)\\1'}, action: alert}", "application/yaml",
     "rule.condition.matches: is not a regular expression RE2 accepts: invalid escape sequence: \\1"),
], ids=["alias-bomb", "deep-not-json", "deep-not-yaml", "lone-surrogate-mask", "backreference"])
def test_a_set_workers_could_not_run_is_refused_with_422_and_nothing_changes(web, admin, put_rules, body,
                                                                            content_type, error):
    before = put_rules("rule: {id: keep, condition: {channel: 'nothing:here'}, action: alert}")
    status, _, answer = web.request("PUT", "/api/v1/rules", raw=body, content_type=content_type, token=admin,
                                    timeout=30)
    assert status == 422 and [e["error"] for e in answer["errors"]] == [error], answer
    assert web.request("GET", "/api/v1/rules", token=admin)[2] == before
    if content_type == "application/json":  # the dry-run endpoint takes a set in its JSON body: the same checks
        status, _, answer = web.request("POST", "/api/v1/rules/test", raw=b'{"message": {"channel": "a", '
                                        b'"data": 1}, "rules": ' + body + b"}", token=admin)
        assert status == 422 and [e["error"] for e in answer["errors"]] == [error], answer


def test_an_exponential_regex_chain_runs_in_linear_time_in_the_web_and_the_workers(stack, web, admin, token,
                                                                                   channel, put_rules):
    # A backtracking engine takes time exponential in the repeats of this chain, and would
    # hold a process (the web's event loop in /rules/test); on RE2 both answer at once.
    chain = ".{0,16}" * 8 + "X"
    put_rules(f"rule: {{id: chain-{channel[5:]}, condition: {{channel: '{channel}', field: data.text, "
              f"matches: '{chain}'}}, action: block}}")
    for text, blocked in (("a" * 1000, None), ("a" * 50 + "X", f"chain-{channel[5:]}")):
        status, _, answer = web.request("POST", "/api/v1/rules/test", {"message": {"channel": channel, "data": {
            "text": text}}}, token=admin)
        assert status == 200 and answer["blocked"] == blocked, answer
    slow, fast = publish(web, token, channel, {"text": "a" * 1000}), publish(web, token, channel, {"text": "aX"})
    assert wait_until(lambda: [status_of(web, token, i)["status"] for i in (slow, fast)] == ["delivered", "rejected"],
                      30, 0.1, "the worker's decisions")


def test_the_dry_run_of_a_stored_set_that_cannot_compile_is_a_409(stack, web, admin, put_rules):
    put_rules("rules: []")
    store = stack.store()
    version = store.redis.hincrby(store.keys.rules, "version", 1)  # as an older Herald could have stored it
    store.redis.hset(store.keys.rules, "doc", deep_not(600))
    status, _, answer = web.request("POST", "/api/v1/rules/test", {"message": {"channel": "a", "data": 1}},
                                    token=admin)
    assert status == 409 and answer["detail"].startswith(
        f"The stored rule set (version {version}) cannot be compiled: rule.condition"), answer
