"""The HTTP API against its own OpenAPI document: schemathesis, every check, on a live server.

The document is generated from the operations' models (web/openapi.py), which
also validate the requests; schemathesis sends schema-valid and schema-violating
requests to a real web process (Kafka and Redis behind it) and checks every
answer: no 5xx, documented statuses, media types and headers, bodies true to
their schemas, schema-valid requests accepted and invalid ones refused, 405 with
`Allow`, and that no operation lets a request through without a token.
tests/schemathesis.toml lists, with reasons, what JSON Schema cannot state.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Stack
from web.openapi import openapi_path

CONFIG = Path(__file__).resolve().parent.parent / "schemathesis.toml"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A web process of its own (schemathesis replaces the rule set and publishes at random)."""
    system = Stack(tmp_path_factory.mktemp("contract"))
    try:
        yield system, system.web("web-contract")
    finally:
        system.stop()


def test_every_route_is_declared_and_documented(api):
    system, web = api
    status, _, document = web.request("GET", "/api/v1/openapi.json")
    assert status == 200 and document["openapi"] == "3.1.0"
    from web import create_app

    app = create_app(system.settings)

    declared = {(path, method) for path, item in document["paths"].items() for method in item}
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") and rule.endpoint not in ("api.openapi", "api.asyncapi"):
            path = openapi_path(rule.rule)
            routes |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes and routes <= declared, routes - declared


def test_schemathesis_finds_no_mismatch_and_no_5xx(api, tmp_path):
    system, web = api
    token = system.token("contract", admin=True)
    env = {**os.environ, "NO_COLOR": "1"}
    # A generated rule set near 1 MiB is compiled and dry-run whole before PUT answers: on a loaded
    # 2-core machine that took over 20 s once (ST112), so each request gets 60.
    run = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "run",
         f"http://127.0.0.1:{web.port}/api/v1/openapi.json", "--checks", "all", "--max-examples", "60",
         "-H", f"Authorization: Bearer {token}", "--request-timeout", "60"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated and int(generated[1]) >= 600 and generated[1] == generated[2], output[-3000:]
