"""Shared fixtures: one real Herald stack per test session, plus helpers."""

from __future__ import annotations

import uuid

import pytest

from devtools import embedded
from pipeline.core.settings import Settings
from pipeline.store import Store, connect
from tests.harness import running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Tansu, Redis, a Celery worker, the bridge and two web processes."""
    with running_stack(tmp_path_factory.mktemp("stack"), HERALD_HISTORY_RETENTION="short=5/3600") as system:
        yield system


@pytest.fixture(scope="session")
def dev_web(stack):
    """A third web process on the shared stack, in development mode (HERALD_DEV=1, as `flask dev` runs it)."""
    web = stack.web("web-dev", HERALD_DEV="1")
    yield web
    web.proc.stop(10)


@pytest.fixture
def web(stack):
    """The first web process of the shared stack."""
    return stack.webs[0]


@pytest.fixture
def token(stack):
    """A token allowed everything on the shared stack."""
    return stack.token()


@pytest.fixture
def channel():
    """A channel name no other test uses."""
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def spare_redis_url(tmp_path_factory):
    """A Redis apart from the shared stack's: for tests of one process's start-up, which gets that
    far only with Redis answering, and tests whose keys have a prefix of their own."""
    server = embedded.redis_server(embedded.free_port(), str(tmp_path_factory.mktemp("spare-redis") / "redis.log"))
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def spare_store(spare_redis_url):
    """Makes Stores on the spare Redis, each under a key prefix of its own (`**env`: more
    settings); each is closed after the test: a socket left to the garbage collector warns
    in whichever later test it is collected."""
    made: list[Store] = []

    def make(**env: str) -> Store:
        settings = Settings.from_env({"HERALD_SECRET_KEY": "k" * 32, "REDIS_URL": spare_redis_url,
                                      "HERALD_REDIS_PREFIX": f"s{uuid.uuid4().hex[:8]}", **env})
        store = Store(connect(settings, 2), settings)
        made.append(store)
        return store

    yield make
    for store in made:
        store.redis.close()
