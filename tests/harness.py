"""Real services for tests: Tansu, Redis, and Herald's own processes on free ports.

Every stack gets its own topic, consumer group, Redis prefix and SQLite file,
so tests can share servers without seeing each other's data. An existing
broker or Redis can be reused by naming it in HERALD_TEST_KAFKA /
HERALD_TEST_REDIS_URL; otherwise they are started here. A stack with
`broker="amqp"` uses RabbitMQ (HERALD_TEST_AMQP_URL, by default the local
guest account) as the Celery broker, with a queue of its own, deleted at stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import websocket

from devtools import embedded
from pipeline.core.settings import Settings
from web.auth import mint

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-key-that-is-long-enough-for-hs256"
AMQP_URL = os.environ.get("HERALD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A Herald process (web, bridge, worker) with its log captured to a file."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    def start(self) -> Proc:
        """Start the process (its log is appended to)."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            # Its own process group, so kill() can take its children (pool processes) too.
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=embedded._die_with_parent,
                                         start_new_session=True)
        return self

    def log(self) -> str:
        """What this run of the process has logged so far."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            return fh.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> None:
        """Wait until the log matches `pattern` `count` times (and fail early if the process died)."""
        regex = re.compile(pattern)

        def seen():
            if len(regex.findall(self.log())) >= count:
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return False

        wait_until(seen, timeout, 0.1, f"{self.name} to log {pattern!r}")

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait; returns how long it took to exit (SIGKILL after `timeout`)."""
        if not self.running:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL to the process and its children, as a machine dying would."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None


def tls_certificates(directory: Path) -> dict[str, Path]:
    """A fresh CA and a certificate for 127.0.0.1 and localhost signed by it (tests/tls.py):
    paths `ca`, `cert`, `key`."""
    from tests.tls import make_pki

    pki = make_pki(directory)
    return {"ca": pki.dir / "ca.pem", "cert": pki.dir / "server.pem", "key": pki.dir / "server.key"}


def redis_server(port: int, log_path: Path, *, tls: dict | None = None, args=()) -> embedded.Server:
    """Herald's embedded Redis on `port` (not started); with `tls` (from tls_certificates)
    it speaks TLS only there, without asking clients for certificates."""
    server = embedded.redis_server(port, str(log_path))
    if tls:
        # A later --port wins: the plain port is closed and `port` is the TLS one.
        server.argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls["cert"]),
                        "--tls-key-file", str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]),
                        "--tls-auth-clients", "no"]
    server.argv += list(args)
    return server


def redis_cluster(workdir: Path, nodes: int = 3) -> tuple[list[embedded.Server], str]:
    """A Redis Cluster of `nodes` primaries (no replicas) on free ports, made with
    `redis-cli --cluster create` and waited for until every node says
    cluster_state:ok: its servers, and the URL of its first node."""
    servers = []
    try:
        for _ in range(nodes):
            port = embedded.free_port()
            home = workdir / f"cluster-{port}"
            home.mkdir(parents=True)
            server = embedded.redis_server(port, str(home / "redis.log"))
            # A later --dir wins: each node keeps its nodes.conf apart. The bus
            # port is chosen too (port + 10000 may be past 65535).
            server.argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(home / "nodes.conf"),
                            "--cluster-port", str(embedded.free_port()), "--dir", str(home),
                            "--cluster-node-timeout", "5000"]
            servers.append(server.start())
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)

        def ok(server):
            info = subprocess.run(["redis-cli", "-p", str(server.port), "cluster", "info"], capture_output=True,
                                  text=True, timeout=10).stdout
            return "cluster_state:ok" in info

        wait_until(lambda: all(ok(server) for server in servers), 30, 0.2, "cluster_state:ok")
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers, f"redis://127.0.0.1:{servers[0].port}/0"


@contextlib.contextmanager
def running_stack(workdir: Path, **options):
    """A whole Stack: a worker, the bridge and two web processes (`stack.webs`); stopped after."""
    system = Stack(workdir, **options)
    try:
        system.worker()
        system.bridge()
        system.webs = [system.web("web1"), system.web("web2")]
        yield system
    finally:
        system.stop()


class Stack:
    """A whole Herald system for tests, with handles to restart or kill each part.

    `redis_tls` (from tls_certificates) runs its own Redis, and so the Celery
    broker, over TLS at a `rediss://` URL ending in `?redis_query`;
    `redis_args` are more options for its own Redis. `cluster` runs Herald
    on a three-node Redis Cluster of its own (REDIS_CLUSTER), the Celery
    broker on a plain Redis apart.
    """

    def __init__(self, workdir: Path, *, own_kafka: bool = False, own_redis: bool = False,
                 separate_broker: bool = False, persistent_redis: bool = False, redis_tls: dict | None = None,
                 redis_query: str = "", redis_args=(), broker: str = "redis", kafka_url: str | None = None,
                 cluster: bool = False, **env):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.kafka = self.redis = None
        self.kafka_port = self.redis_port = None
        external_kafka = None if own_kafka else os.environ.get("HERALD_TEST_KAFKA")
        own_redis = own_redis or bool(redis_tls or redis_args)
        external_redis = None if own_redis or cluster else os.environ.get("HERALD_TEST_REDIS_URL")
        self.cluster: list[embedded.Server] = []
        if kafka_url:  # a Kafka the test started, given as Heroku gives it (KAFKA_URL)
            self.bootstrap = ",".join(server.split("://", 1)[-1] for server in kafka_url.split(","))
        elif external_kafka:
            self.bootstrap = external_kafka
        else:
            self.kafka_port = embedded.free_port()
            self.kafka = embedded.kafka_server(self.kafka_port, str(workdir / "kafka.log")).start()
            self.bootstrap = f"127.0.0.1:{self.kafka_port}"
        if cluster:
            self.cluster, self.redis_url = redis_cluster(workdir)
            separate_broker = separate_broker or broker == "redis"
            env = {"REDIS_CLUSTER": "1", **env}
        elif external_redis:
            self.redis_url = external_redis
        else:
            self.redis_port = embedded.free_port()
            if redis_tls or redis_args:
                self.redis = redis_server(self.redis_port, workdir / "redis.log", tls=redis_tls,
                                          args=redis_args).start()
            else:
                self.redis = embedded.redis_server(self.redis_port, str(workdir / "redis.log"),
                                                   str(workdir / "redis-data") if persistent_redis else None).start()
            scheme = "rediss" if redis_tls else "redis"
            self.redis_url = f"{scheme}://127.0.0.1:{self.redis_port}/0" + (f"?{redis_query}" if redis_query else "")
        # A Celery broker apart from the state Redis lets a test stop one without the other.
        self.broker = None
        broker_url = self.redis_url
        if separate_broker:
            port = embedded.free_port()
            self.broker = embedded.redis_server(port, str(workdir / "broker.log")).start()
            broker_url = f"redis://127.0.0.1:{port}/0"
        if broker == "amqp":
            broker_url = AMQP_URL
        tag = uuid.uuid4().hex[:10]
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": broker_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "DATABASE_URL": f"sqlite:///{workdir / 'archive.db'}",
            "HERALD_TOPIC": f"herald.test.{tag}",
            "HERALD_REDIS_PREFIX": f"t{tag}",
            "HERALD_CONSUMER_GROUP": f"bridge-{tag}",
            "HERALD_SECRET_KEY": SECRET,
            "HERALD_TOPIC_PARTITIONS": "4",
            # The tests scrape /metrics without a token (docs/operations.md: Metrics).
            "HERALD_METRICS_PUBLIC": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("KAFKA_URL", None)
        if kafka_url:
            del self.env["KAFKA_BOOTSTRAP_SERVERS"]
            self.env["KAFKA_URL"] = kafka_url
        self.env.update({k: str(v) for k, v in env.items()})
        self.settings = Settings.from_env(self.env)
        self.procs: list[Proc] = []
        self._store = None
        self.release()

    def release(self) -> list[str]:
        """Run the release phase for this stack (topics, archive schema), as a deploy does first."""
        from pipeline.release import release

        return release(self.settings)

    # -- processes ---------------------------------------------------------
    def _proc(self, name: str, argv: list[str], **env) -> Proc:
        full_env = {**self.env, **{k: str(v) for k, v in env.items()}}
        proc = Proc(name, argv, full_env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def worker(self, name: str = "worker", concurrency: int = 2, **env) -> Proc:
        """Start a Celery worker and wait until it is ready."""
        proc = self._proc(name, [sys.executable, "-m", "tasks",
                                 "--loglevel=INFO", "--without-gossip", "--without-mingle",
                                 f"--concurrency={concurrency}", "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h"],
                          HERALD_NODE_ID=name, **env).start()
        proc.wait_for_log(r"ready\.", 60)
        return proc

    def bridge(self, name: str = "bridge", wait: bool = True, **env) -> Proc:
        """Start the bridge and wait until it owns partitions."""
        proc = self._proc(name, [sys.executable, "-m", "pipeline.bridge"], HERALD_NODE_ID=name, **env).start()
        if wait:
            proc.wait_for_log("partitions assigned", 60)
        return proc

    def web(self, name: str = "web", **env) -> Web:
        """Start a web process (gunicorn, gevent) on a free port and wait until it is ready."""
        port = int(env.pop("PORT", 0)) or embedded.free_port()
        proc = self._proc(name, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                          PORT=port, **env).start()
        web = Web(proc, port)
        wait_until(web.ready, 60, 0.1, f"{name} to be ready")
        return web

    def stop(self) -> None:
        """Stop every process and server of the stack."""
        if self._store is not None:
            client = self._store.redis
            # close() leaves a given pool's sockets open
            client.disconnect_connection_pools() if self.cluster else client.connection_pool.disconnect()
        for proc in reversed(self.procs):
            proc.stop(10)
            proc.kill()  # whatever it left behind
        for server in (self.kafka, self.redis, self.broker, *self.cluster):
            if server is not None:
                server.stop()
        if self.settings.amqp_broker:
            self._delete_queue()

    def _delete_queue(self) -> None:
        # Quorum queues are durable: each stack's would outlive it in RabbitMQ.
        import kombu

        with kombu.Connection(self.settings.celery_broker_url, connect_timeout=5) as connection:
            connection.default_channel.queue_delete(f"{self.settings.redis_prefix}.tasks")

    # -- helpers ---------------------------------------------------------------
    def token(self, user: str = "tester", **claims) -> str:
        """A valid token for this stack."""
        return mint(self.settings, user, **claims)

    def store(self):
        """A Store on this stack's Redis (one per stack, closed by stop())."""
        from pipeline.store import Store, connect

        if self._store is None:
            self._store = Store(connect(self.settings), self.settings)
        return self._store


# How the Procfile starts each process (tests that watch a start-up run them alone).
PROCESSES = {
    "web": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
    "bridge": [sys.executable, "-m", "pipeline.bridge"],
    "worker": [sys.executable, "-m", "tasks", "--without-gossip", "--without-mingle"],
}


def start_environment(**env) -> dict:
    """What a process needs to get to its Redis check at start (Kafka is checked after it)."""
    return {**os.environ, "HERALD_SECRET_KEY": SECRET, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "PYTHONUNBUFFERED": "1", **env}


def refused_start(env: dict, name: str, timeout: float = 30) -> str:
    """Run one process that must refuse to start, in one line and exit code 1,
    within `timeout`; returns that line."""
    # Its own process group: a worker that did start leaves no pool process behind.
    proc = subprocess.Popen(PROCESSES[name], env={**env, "PORT": str(embedded.free_port())}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    lines = output.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, lines[-5:])
    return lines[0]


class Web:
    """A running web process and an HTTP client for it."""

    def __init__(self, proc: Proc, port: int):
        self.proc, self.port = proc, port
        self.base = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        """True once /readyz answers 200 (fails early if the process died)."""
        if not self.proc.running:
            raise AssertionError(f"{self.proc.name} exited:\n{self.proc.log()[-3000:]}")
        try:
            return self.request("GET", "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body=None, *, token: str | None = None, headers=None,
                raw: bytes | None = None, content_type: str = "application/json", timeout: float = 15):
        """Send a request; returns (status, headers, parsed JSON body or text)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, resp_headers, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            status, resp_headers, payload = err.code, err.headers, err.read()
        text = payload.decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text
        return status, resp_headers, parsed

    def restart(self) -> None:
        """Start the stopped process again, on the same port."""
        self.proc.start()
        wait_until(self.ready, 60, 0.1, f"{self.proc.name} to be ready again")

    def ws(self, token: str | None = None, **kwargs) -> WsClient:
        """A connected WebSocket client (token on the URL, or none)."""
        url = f"ws://127.0.0.1:{self.port}/ws" + (f"?token={token}" if token else "")
        return WsClient(url, **kwargs)


class WsClient:
    """A real WebSocket client speaking Herald's JSON frames."""

    def __init__(self, url: str, **kwargs):
        # websocket-client validates UTF-8 in pure Python, about a millisecond
        # per few KB: a test client doing that falls behind the server.
        self.sock = websocket.create_connection(url, timeout=10, skip_utf8_validation=True, **kwargs)
        self.frames: list[dict] = []

    def send(self, frame: dict) -> None:
        """Send one frame."""
        self.sock.send(json.dumps(frame))

    def recv(self, timeout: float = 10.0) -> dict:
        """The next frame (raises on timeout or close)."""
        self.sock.settimeout(timeout)
        frame = json.loads(self.sock.recv())
        self.frames.append(frame)
        return frame

    def expect(self, predicate, timeout: float = 10.0) -> dict:
        """Read frames until one matches `predicate`; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout:g}s; saw {self.frames[-5:]}")
            frame = self.recv(remaining)
            if predicate(frame):
                return frame

    def drain(self, seconds: float) -> list[dict]:
        """Every frame that arrives within `seconds`."""
        frames, deadline = [], time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                frames.append(self.recv(remaining))
            except websocket.WebSocketTimeoutException:
                break
        return frames

    def subscribe(self, channel: str, **options) -> dict:
        """Subscribe and return the `subscribed` reply."""
        self.send({"op": "subscribe", "channel": channel, **options})
        return self.expect(lambda f: f.get("op") == "subscribed" and f.get("channel") == channel)

    def close(self) -> None:
        """Close the socket (also when the server closed it first)."""
        try:
            self.sock.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass
        self.sock.shutdown()


def close_code(client, timeout: float = 15.0) -> int:
    """Read frames until the server's close frame; returns its code (-1 if the socket just ended)."""
    client.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Raw frames: the higher-level calls answer the close, and the
            # server may already have gone.
            frame = client.sock.recv_frame()
        except (websocket.WebSocketConnectionClosedException, OSError):
            return -1
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big")
    raise AssertionError("the server did not close the connection")


def topic_size(stack: Stack, topic: str | None = None) -> int:
    """How many records the topic holds (sum of high watermarks over its partitions)."""
    from confluent_kafka import Consumer, TopicPartition

    topic = topic or stack.settings.topic
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
    finally:
        consumer.close()


def read_topic(stack: Stack, topic: str, timeout: float = 3.0) -> list:
    """Every record of a topic, read by partition assignment (no group join)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        wanted = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, deadline = [], time.monotonic() + timeout
        while len(records) < sum(wanted.values()) and time.monotonic() < deadline:
            record = consumer.poll(0.2)
            if record is not None and not record.error():
                records.append(record)
        return records
    finally:
        consumer.close()
