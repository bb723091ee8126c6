"""GET /dev/token: the demo page's token in development (HERALD_DEV), and nothing at all in production."""

from __future__ import annotations

import jwt

from tests.harness import SECRET


def test_production_hands_out_no_token(web):
    # The shared stack runs as a deployment does: HERALD_DEV unset.
    for path in ("/dev/token", "/dev/token?user=admin"):
        status, headers, body = web.request("GET", path)
        assert status == 404, body
        assert "token" not in body and headers["Content-Type"] == "application/problem+json"


def test_development_hands_a_working_token_to_the_page(dev_web):
    status, headers, body = dev_web.request("GET", "/dev/token")
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == body["user"] and body["user"].startswith("guest-")
    assert claims["admin"] is False and claims["publish"] == claims["subscribe"] == ["*"]
    # The token works on the API, and each call is another user (each tab its own).
    answer = dev_web.request("GET", "/api/v1/channels/chat:lobby/presence", token=body["token"])
    assert answer[0] == 200, answer
    assert dev_web.request("GET", "/dev/token")[2]["user"] != body["user"]


def test_development_names_the_user_asked_for_and_refuses_a_bad_name(dev_web):
    status, _, body = dev_web.request("GET", "/dev/token?user=alice_1")
    assert status == 200 and jwt.decode(body["token"], SECRET, algorithms=["HS256"])["sub"] == "alice_1"
    for bad in ("a%20b", "x" * 33, "%C3%A9t%C3%A9", "a/b"):
        status, _, body = dev_web.request("GET", f"/dev/token?user={bad}")
        assert status == 400 and body["type"] == "/problems/bad-user", (bad, body)


def test_the_demo_page_is_served_either_way(web, dev_web):
    for server in (web, dev_web):
        status, _, page = server.request("GET", "/")
        assert status == 200 and "/dev/token" in page
