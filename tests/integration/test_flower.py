"""The Procfile's `flower` process (`python -m tasks.flower`): behind a password outside development."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from devtools import embedded
from tests.harness import ROOT, start_environment, wait_until

FLOWER = [sys.executable, "-m", "tasks.flower"]


def _environment(redis_url: str, **env) -> dict:
    environ = start_environment(REDIS_URL=redis_url, **env)
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API", "HERALD_DEV"):
        if name not in env:
            environ.pop(name, None)
    return environ


def _get(url: str, credentials: str | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


class Flower:
    """A real Flower process started through the wrapper, stopped (with any child) on exit."""

    def __init__(self, env: dict):
        self.port = embedded.free_port()
        self.proc = subprocess.Popen([*FLOWER, f"--port={self.port}"], env=env, cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def __enter__(self) -> Flower:
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"flower exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            return embedded.port_open("127.0.0.1", self.port)

        wait_until(listening, 60, 0.1, "flower to listen")
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.output = self.proc.communicate(timeout=20)[0]
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def _refused(env: dict) -> str:
    proc = subprocess.run([*FLOWER, "--port=1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and not proc.stdout.strip(), (proc.returncode, proc.stderr)
    return lines[0]


def test_without_a_password_outside_development_flower_refuses_in_one_line(spare_redis_url):
    line = _refused(_environment(spare_redis_url))
    assert line.startswith("herald flower: cannot start: FLOWER_BASIC_AUTH is not set")


@pytest.mark.parametrize("env, says", [
    ({"FLOWER_BASIC_AUTH": "admin"}, "FLOWER_BASIC_AUTH is not user:password"),
    ({"FLOWER_BASIC_AUTH": "admin:secret,:nouser"}, "FLOWER_BASIC_AUTH is not user:password"),
    ({"FLOWER_BASIC_AUTH": "admin:"}, "FLOWER_BASIC_AUTH is not user:password"),
    ({"FLOWER_BASIC_AUTH": "admin:secret", "FLOWER_UNAUTHENTICATED_API": "true"}, "FLOWER_UNAUTHENTICATED_API"),
], ids=["no-colon", "empty-user", "empty-password", "open-api"])
def test_a_password_flower_would_not_enforce_is_refused(spare_redis_url, env, says):
    assert says in _refused(_environment(spare_redis_url, **env))


def test_with_basic_auth_flower_asks_for_the_password(spare_redis_url):
    with Flower(_environment(spare_redis_url, FLOWER_BASIC_AUTH="ops:s3cret-pass,other:pw2")) as flower:
        assert _get(flower.url) == 401
        assert _get(flower.url, "ops:wrong") == 401
        assert _get(flower.url, "ops:s3cret-pass") == 200
        assert _get(flower.url, "other:pw2") == 200
        assert _get(flower.url + "api/workers") == 401


def test_in_development_flower_runs_open_on_localhost_only(spare_redis_url):
    with Flower(_environment(spare_redis_url, HERALD_DEV="1")) as flower:
        assert _get(flower.url) == 200
    assert f"Visit me at http://127.0.0.1:{flower.port}" in flower.output

