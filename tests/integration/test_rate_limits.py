"""HTTP rate limits on real web processes: counted in Redis across processes, per token
user and per client address, answered with problem+json and Retry-After; off; Redis down.

Every test sends its requests from an address of its own (X-Forwarded-For,
trusted through HERALD_TRUSTED_PROXIES=1) and with users of its own, so no
test spends another's budget. Windows are a minute long and start at a
counter's first hit: each burst takes well under a second, so the counts are exact.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from pipeline.core.settings import Settings
from tests.harness import Stack, wait_until

LIMITS = "publish=10/minute;read.token=3/minute;read.address=5/minute;default=2/minute;batch=off;admin=off"
_addresses = (f"203.0.113.{n}" for n in itertools.count(1))


@pytest.fixture(scope="module")
def limited(stack):
    """Two more web processes of the shared stack (one Redis) with small limits, behind one trusted proxy."""
    # HERALD_METRICS_PUBLIC: /metrics answers without a token, to show it is never limited either.
    webs = [stack.web(f"limited-web{n}", HERALD_RATE_LIMITS=LIMITS, HERALD_TRUSTED_PROXIES=1,
                      HERALD_METRICS_PUBLIC=1) for n in (1, 2)]
    yield webs
    for web in webs:
        web.proc.stop()


def address() -> str:
    """A client address no other test uses."""
    return next(_addresses)


def user() -> str:
    """A token user no other test uses."""
    return f"rl-{uuid.uuid4().hex[:8]}"


def get(web, path, client, token=None):
    return web.request("GET", path, token=token, headers={"X-Forwarded-For": client})


def assert_too_many(answer, limit: int, by: str):
    status, headers, body = answer
    assert status == 429, answer
    assert headers["Content-Type"] == "application/problem+json"
    assert body["status"] == 429 and body["type"] == "/problems/rate-limited"
    assert by in body["detail"]
    assert 1 <= int(headers["Retry-After"]) <= 60  # delay-seconds, an integer
    assert headers["X-RateLimit-Limit"] == str(limit) and headers["X-RateLimit-Remaining"] == "0"


def test_a_burst_across_two_processes_is_counted_once(stack, limited, channel):
    token, client = stack.token(user()), address()

    def publish(n):
        web = limited[n % 2]
        return web.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token,
                           headers={"X-Forwarded-For": client})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(publish, range(30)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [202] * 10 + [429] * 20
    # Both processes refused some: the count is Redis', not each process's.
    assert {n % 2 for n, (status, _, _) in enumerate(answers) if status == 429} == {0, 1}
    for answer in answers:
        if answer[0] == 429:
            assert_too_many(answer, 10, "this token's user")


def test_each_user_has_a_budget_and_their_address_one_for_all(stack, limited, channel):
    path = f"/api/v1/channels/{channel}/history"
    web1, web2 = limited
    shared, other = address(), address()
    alice, bob = user(), user()
    alice_token, bob_token = stack.token(alice), stack.token(bob)
    # read: 3 a minute per user, 5 per address.
    assert [get(web1, path, shared, alice_token)[0] for _ in range(3)] == [200] * 3
    assert_too_many(get(web2, path, shared, alice_token), 3, "this token's user")
    # Every request spends its address's budget, the one her user's limit refused too:
    # bob has 1 of its 5 left.
    assert get(web2, path, shared, bob_token)[0] == 200
    assert_too_many(get(web1, path, shared, bob_token), 5, "this client address")
    # Another address has its own budget; a user's follows them to it, whichever token they hold.
    assert get(web1, path, other, stack.token(user()))[0] == 200
    assert_too_many(get(web1, path, other, stack.token(alice, ttl=600)), 3, "this token's user")
    # A bad token is answered 401 and counted by its address alone.
    assert get(web2, path, address(), "not-a-token")[0] == 401


_prefixes = (f"2001:db8:{n:x}:1" for n in itertools.count(1))


def test_an_ipv6_client_has_one_address_budget_for_its_whole_64(stack, limited, channel):
    # A host picks any of its /64's addresses: each one a budget of its own would be no limit.
    path = f"/api/v1/channels/{channel}/history"
    prefix, other = next(_prefixes), next(_prefixes)
    answers = [get(limited[n % 2], path, f"{prefix}::{n + 1:x}", stack.token(user()))[0] for n in range(5)]
    assert answers == [200] * 5  # read: 5 a minute per address, each request from another address
    assert_too_many(get(limited[0], path, f"{prefix}:dead:beef:0:6", stack.token(user())), 5, "this client address")
    assert get(limited[1], path, f"{other}::1", stack.token(user()))[0] == 200  # the next /64: a budget of its own


def test_a_request_counts_both_its_limits_in_one_round_trip(stack, limited, channel):
    client, name = address(), user()
    token = stack.token(name)
    watcher = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    counted, listening, stop = [], threading.Event(), threading.Event()

    def watch():
        with watcher.monitor() as monitor:
            listening.set()
            for command in monitor.listen():  # the stack's own traffic wakes it up
                text = command["command"]  # a script's own commands show too: only calls count
                if text.startswith(("EVAL", "SCRIPT")) and (f"addr:{client}" in text or f"user:{name}" in text):
                    counted.append(command["command"])
                if stop.is_set():
                    return

    for web in limited:  # each process's script is loaded by now
        get(web, f"/api/v1/channels/{channel}/presence", address(), stack.token(user()))
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert listening.wait(10)
    for web in limited:
        assert get(web, f"/api/v1/channels/{channel}/presence", client, token)[0] == 200
    wait_until(lambda: len(counted) >= 2, 10, what="the counters' calls")
    stop.set()
    thread.join(10)
    # One call per request, each counting the user and the address together.
    assert len(counted) == 2, counted
    assert all(f"addr:{client}" in command and f"user:{name}" in command for command in counted), counted


def test_health_metrics_the_demo_page_and_websockets_are_never_limited(stack, limited):
    web, client = limited[0], address()
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/herald.js"):
        assert {get(web, path, client)[0] for _ in range(5)} == {200}, path
    for _ in range(5):
        ws = web.ws(stack.token(), header=[f"X-Forwarded-For: {client}"])
        assert ws.recv()["op"] == "connected"
        ws.close()
    # default: 2 a minute; the calls above spent none of it.
    assert [get(web, "/api/v1/openapi.json", client)[0] for _ in range(2)] == [200, 200]
    assert_too_many(get(web, "/api/v1/openapi.json", client), 2, "this client address")
    # Nor are CORS preflights (no work done, no token sent).
    assert web.request("OPTIONS", "/api/v1/openapi.json", headers={"X-Forwarded-For": client})[0] == 200


def test_limits_off_count_nothing(stack):
    web = stack.web("unlimited-web", HERALD_RATE_LIMITS="off", HERALD_TRUSTED_PROXIES=1)
    try:
        client = address()
        assert {get(web, "/api/v1/openapi.json", client)[0] for _ in range(30)} == {200}
        keys = stack.store().redis.keys(f"{stack.settings.redis_prefix}:ratelimit:*{client}*")
        assert keys == []
    finally:
        web.proc.stop()


def test_the_default_limits_are_far_above_a_burst(web, token, channel):
    # The shared stack's web runs with the defaults (thousands a second).
    with ThreadPoolExecutor(8) as pool:
        statuses = set(pool.map(lambda n: web.request("POST", "/api/v1/messages", {"channel": channel, "data": n},
                                                      token=token)[0], range(200)))
    assert statuses == {202}


def test_counters_live_under_the_redis_prefix(stack, limited):
    client = address()
    assert get(limited[0], "/api/v1/openapi.json", client)[0] == 200
    keys = stack.store().redis.keys(f"*{client}*")
    assert keys == [f"{stack.settings.redis_prefix}:ratelimit:LIMITER/addr:{client}/default/2/1/minute"]
    assert 55 <= stack.store().redis.ttl(keys[0]) <= 60


def test_without_redis_each_process_counts_alone_and_nothing_fails(tmp_path):
    system = Stack(tmp_path / "rl-outage", own_redis=True)
    try:
        web = system.web(HERALD_RATE_LIMITS="default=3/minute", HERALD_TRUSTED_PROXIES=1)
        client = address()
        assert get(web, "/api/v1/openapi.json", client)[0] == 200  # counted in Redis
        system.redis.stop()
        # In this process's memory now, from zero: three more, then refused, never a 500.
        answers = [get(web, "/api/v1/openapi.json", client) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200, 200, 200, 429]
        assert_too_many(answers[-1], 3, "this client address")
        web.proc.wait_for_log("falling back to in-memory storage")
        system.redis.start()
        # Back on Redis within the storage check's back-off (at most 32 s): a new address's counter is there.
        probe = redis.Redis.from_url(system.redis_url)

        def counted_in_redis():
            fresh = address()
            get(web, "/api/v1/openapi.json", fresh)
            return probe.keys(f"*{fresh}*")

        wait_until(counted_in_redis, 60, 0.5, "counting in Redis again")
        web.proc.wait_for_log("Rate limit storage recovered")
        probe.close()
    finally:
        system.stop()


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli makes the cluster")
def test_the_counter_runs_on_a_redis_cluster(tmp_path):
    from tests.harness import redis_cluster
    from web import create_app

    servers, url = redis_cluster(tmp_path)
    try:
        settings = Settings.from_env({"HERALD_SECRET_KEY": "s" * 32, "REDIS_URL": url, "REDIS_CLUSTER": "1",
                                      "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
                                      "HERALD_REDIS_PREFIX": "rlc", "HERALD_RATE_LIMITS": "default=2/minute"})
        app = create_app(settings)
        client = app.test_client()
        statuses = [client.get("/api/v1/openapi.json").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        cluster = app.extensions["herald"].store.redis
        assert cluster.get("rlc:ratelimit:LIMITER/addr:127.0.0.1/default/2/1/minute") == "3"
        cluster.close()
    finally:
        for server in servers:
            server.stop()


def test_every_grouped_endpoint_exists():
    # A renamed view would silently fall into "default"; every other endpoint is default or unlimited.
    from web import create_app
    from web.ratelimit import GROUPS, UNLIMITED

    app = create_app(Settings.from_env({"HERALD_AUTH": "off", "HERALD_DEV": "1"}))
    assert set(GROUPS) <= set(app.view_functions)
    assert set(app.view_functions) >= UNLIMITED
