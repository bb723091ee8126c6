"""CORS for the HTTP API on a real web process: origins from HERALD_CORS_ORIGINS, no credentials."""

from __future__ import annotations

import pytest

ALLOWED = "https://app.example"


@pytest.fixture(scope="module")
def cors_web(stack):
    """A web process of the shared stack that lists one allowed origin."""
    web = stack.web("cors-web", HERALD_CORS_ORIGINS=f"{ALLOWED},https://other.example")
    yield web
    web.proc.stop()


def preflight(web, origin: str):
    return web.request("OPTIONS", "/api/v1/messages", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})


def test_a_preflight_from_a_listed_origin_is_answered_without_credentials(cors_web):
    status, headers, _ = preflight(cors_web, ALLOWED)
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed
    assert "Access-Control-Allow-Credentials" not in headers


def test_a_request_from_a_listed_origin_may_read_the_request_id(cors_web, stack, channel):
    status, headers, body = cors_web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1},
                                             token=stack.token(), headers={"Origin": ALLOWED})
    assert status == 202 and body["status"] == "accepted"
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "x-request-id" in headers["Access-Control-Expose-Headers"].lower()


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.example.evil.example", "null"])
def test_an_origin_not_listed_gets_no_cors_headers(cors_web, origin):
    status, headers, _ = preflight(cors_web, origin)
    assert "Access-Control-Allow-Origin" not in headers


def test_with_no_origins_configured_no_origin_is_allowed(web):
    _, headers, _ = preflight(web, ALLOWED)
    assert "Access-Control-Allow-Origin" not in headers
