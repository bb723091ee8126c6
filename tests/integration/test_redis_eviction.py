"""A Redis that may evict Herald's keys is refused at start, unless HERALD_ALLOW_EVICTION says otherwise."""

from __future__ import annotations

import pytest

from devtools import embedded
from pipeline.core.errors import StartupError
from pipeline.core.settings import Settings
from pipeline.store import check_at_start
from tests.harness import (
    PROCESSES,
    Stack,
    redis_server,
    refused_start,
    start_environment,
)

LRU = ("--maxmemory-policy", "allkeys-lru")


@pytest.fixture(scope="module")
def evicting_redis(tmp_path_factory):
    """A Redis with allkeys-lru; yields its URL."""
    port = embedded.free_port()
    server = redis_server(port, tmp_path_factory.mktemp("lru") / "redis.log", args=LRU).start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_an_evicting_redis_is_refused_at_start(evicting_redis, name):
    line = refused_start(start_environment(REDIS_URL=evicting_redis), name)
    assert line.startswith(f"herald {name}: cannot start: Redis maxmemory-policy is allkeys-lru")
    assert "HERALD_ALLOW_EVICTION=1" in line


def test_allowed_eviction_runs_the_stack_with_a_warning(tmp_path):
    stack = Stack(tmp_path, redis_args=LRU, HERALD_ALLOW_EVICTION="1")
    try:
        worker, bridge, web = stack.worker(), stack.bridge(), stack.web()
        for proc in (worker, bridge, web.proc):
            assert "maxmemory-policy is allkeys-lru: running anyway" in proc.log()
        status, _, answer = web.request("POST", "/api/v1/messages", {"channel": "lru:x", "data": 1},
                                        token=stack.token())
        assert status == 202, answer
    finally:
        stack.stop()


@pytest.mark.parametrize("renamed, policy", [
    # Managed Redis often refuses CONFIG: INFO says it too.
    (("CONFIG",), "allkeys-lru"),
    (("CONFIG", "INFO"), None),
])
def test_the_policy_is_read_from_info_when_config_is_refused(tmp_path, renamed, policy):
    args = [*LRU] + [arg for command in renamed for arg in ("--rename-command", command, "")]
    port = embedded.free_port()
    server = redis_server(port, tmp_path / "redis.log", args=args).start()
    try:
        settings = Settings.from_env(start_environment(REDIS_URL=f"redis://127.0.0.1:{port}/0"))
        if policy:
            with pytest.raises(StartupError, match=f"maxmemory-policy is {policy}"):
                check_at_start(settings)
        else:
            assert check_at_start(settings).startswith("could not read the maxmemory-policy of Redis at redis://")
    finally:
        server.stop()
