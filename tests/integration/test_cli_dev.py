"""`flask --app app dev` (what `make dev` runs): the token it prints works on the processes it starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jwt
import pytest

from devtools import embedded
from tests.harness import ROOT, wait_until

DOTENV_KEY = "the-key-written-to-dotenv-by-make-dev-0123456789"
SHELL_KEY = "a-key-exported-in-the-developers-shell-0123456789"


def _status(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("shell_key", [SHELL_KEY, None], ids=["shell-and-dotenv", "dotenv-only"])
def test_dev_prints_a_token_its_web_process_accepts(stack, tmp_path, shell_key):
    # A checkout of our own: its .env, and a Procfile of the real web line only.
    (tmp_path / ".env").write_text(f"HERALD_SECRET_KEY={DOTENV_KEY}\n")
    web_line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    (tmp_path / "Procfile").write_text(web_line + "\n")
    for name in ("app.py", "gunicorn.conf.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    port = embedded.free_port()
    env = {**stack.env, "PORT": str(port), "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # A topic nobody made: the web starts only if `dev` ran the release step first.
    env["HERALD_TOPIC"] = f"dev.{uuid.uuid4().hex[:8]}"
    env.pop("HERALD_SECRET_KEY")
    if shell_key:
        env["HERALD_SECRET_KEY"] = shell_key
    dev = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "dev"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(dev.stdout), daemon=True)
    reader.start()
    try:
        printed = wait_until(lambda: re.search(r"^token\s+(\S+)$", "".join(output), re.M), 30, 0.1,
                             f"flask dev to print a token; it printed {output[-20:]}")
        token = printed.group(1)
        # The environment wins over .env.
        jwt.decode(token, shell_key or DOTENV_KEY, algorithms=["HS256"])
        url = f"http://127.0.0.1:{port}/api/v1/channels/chat:lobby/history"
        status = wait_until(lambda: _web_answer(url, token, dev, output), 60, 0.2, "the web process to answer")
        assert status == 200, "".join(output[-40:])
        # In development the demo page gets its own token (GET /dev/token; a deployment has no such route).
        assert _status(f"http://127.0.0.1:{port}/dev/token", token) == 200
    finally:
        dev.send_signal(signal.SIGINT)  # Ctrl-C: flask dev passes it to honcho, which stops the processes
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
        reader.join(10)
        dev.stdout.close()


def _web_answer(url: str, token: str, dev: subprocess.Popen, output: list[str]):
    if dev.poll() is not None:
        raise AssertionError(f"flask dev exited with {dev.returncode}:\n{''.join(output[-40:])}")
    try:
        return _status(url, token)
    except OSError:
        return None
