"""Permissions from the deployment's backend (HERALD_AUTHORIZE_URL) on real web processes,
asked over real HTTP of a real endpoint this module starts (docs/guide.md: "Permissions from
your backend").

The endpoint answers by the channel's namespace (ANSWERS), so one web process serves
every test: `yes:` allows, `no:` denies, `hostile` namespaces misbehave. Every test uses
channels and users of its own, so it counts only the calls it caused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devtools import embedded
from tests.harness import wait_until
from web.authorize import MAX_CALLS
from web.hub.protocol import MAX_BAD_FRAMES

TTL, TIMEOUT = 2.0, 0.5
# Past the timeout by far: a decision that waited for these would show.
SLOW_SECONDS = 6.0


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops connects of a burst: they would time out here, not in Herald

    def handle_error(self, request, client_address):
        # Herald hangs up on a hostile answer (a reset when bytes were unread): expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Endpoint:
    """A real authorize endpoint on a free port, recording each call (body and signature)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Herald's pool uses it
            disable_nagle_algorithm = True  # else each answer waits 40 ms for a delayed ACK

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with endpoint.lock:
                    endpoint.calls.append({**body, "raw": raw, "at": time.monotonic(),
                                           "signature": self.headers.get("Herald-Signature")})
                try:
                    ANSWERS[body["channel"].split(":")[0]](self)
                except OSError:
                    pass  # Herald hung up on a hostile answer: as it should

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/authorize"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def asked(self, channel: str) -> list[dict]:
        """The calls about `channel`."""
        with self.lock:
            return [call for call in self.calls if call["channel"] == channel]

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def _json(handler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _drip(handler) -> None:
    # Each byte well within a socket read's timeout; the whole far past the decision's.
    handler.send_response(200)
    handler.send_header("Content-Length", "40")
    handler.end_headers()
    for byte in b'{"allow": true}' + b" " * 25:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(SLOW_SECONDS / 40)


def _huge(handler) -> None:
    size = 10 * 1024 * 1024
    handler.send_response(200)
    handler.send_header("Content-Length", str(size))
    handler.end_headers()
    chunk = b'{"allow": true, "pad": "' + b"x" * 65536
    for _ in range(size // len(chunk)):
        handler.wfile.write(chunk)


ANSWERS = {
    "yes": lambda h: _json(h, 200, b'{"allow": true}'),
    "no": lambda h: _json(h, 200, b'{"allow": false}'),
    "forbid": lambda h: _json(h, 403, b"{}"),
    "hang": lambda h: (time.sleep(SLOW_SECONDS), _json(h, 200, b'{"allow": true}')),
    "late": lambda h: (time.sleep(TIMEOUT / 2), _json(h, 200, b'{"allow": true}')),
    "drip": _drip,
    "huge": _huge,
    "junk": lambda h: _json(h, 200, b"<html>allow</html>"),
    "fail": lambda h: _json(h, 500, b'{"allow": true}'),
    "unsigned": lambda h: _json(h, 401, b'{"allow": true}'),
}


@pytest.fixture(scope="module")
def endpoint():
    server = Endpoint()
    yield server
    server.close()


def _authz_web(stack, name: str, url: str, policy: str):
    return stack.web(name, HERALD_AUTHORIZE_URL=url, HERALD_AUTHORIZE_TTL=TTL,
                     HERALD_AUTHORIZE_TIMEOUT=TIMEOUT, HERALD_AUTHORIZE_ON_TIMEOUT=policy)


@pytest.fixture(scope="module")
def authz(stack, endpoint):
    """A web process of the shared stack asking `endpoint`; failures denied."""
    web = _authz_web(stack, "web-authz", endpoint.url, "DENY")
    yield web
    web.proc.stop(10)


@pytest.fixture(scope="module")
def authz_allow(stack, endpoint):
    """A web process of the shared stack asking `endpoint`; failures allowed."""
    web = _authz_web(stack, "web-authz-allow", endpoint.url, "ALLOW")
    yield web
    web.proc.stop(10)


def names(namespace: str) -> str:
    """A channel of `namespace` no other test uses."""
    return f"{namespace}:{uuid.uuid4().hex[:12]}"


def client(web, stack, user: str | None = None):
    """A connected WebSocket whose token allows only `own:*`; returns (socket, user)."""
    user = user or f"u-{uuid.uuid4().hex[:8]}"
    ws = web.ws(stack.token(user, subscribe=["own:*"], publish=["own:*"]))
    assert ws.recv()["op"] == "connected"
    return ws, user


def ask(ws, frame: dict, ref: str) -> dict:
    """Send `frame` and return the reply that carries `ref` (ack, subscribed or error)."""
    ws.send({**frame, "ref": ref})
    return ws.expect(lambda f: f.get("ref") == ref and f["op"] in ("ack", "subscribed", "error"), timeout=15)


def subscribe(ws, channel: str) -> dict:
    return ask(ws, {"op": "subscribe", "channel": channel}, f"s-{channel}")


def forbidden(reply: dict) -> bool:
    return reply["op"] == "error" and reply["code"] == "forbidden"


def unavailable(reply: dict) -> bool:
    """Refused because the endpoint gave no answer (policy DENY): retryable, not a bad frame."""
    return reply["op"] == "error" and reply["code"] == "unavailable"


def test_the_endpoint_decides_subscribes_and_publishes_the_globs_refuse(stack, endpoint, authz):
    ws, user = client(authz, stack)
    token = stack.token(user, subscribe=["own:*"], publish=["own:*"])
    yes, no, refused = names("yes"), names("no"), names("forbid")
    assert subscribe(ws, yes)["op"] == "subscribed"
    assert forbidden(subscribe(ws, no))
    assert forbidden(subscribe(ws, refused))  # a 403 is a denial too
    assert ask(ws, {"op": "publish", "channel": yes, "data": 1}, "p1")["op"] == "ack"
    assert forbidden(ask(ws, {"op": "publish", "channel": no, "data": 1}, "p2"))
    # The message published on `yes` reaches the subscriber the endpoint let in.
    assert ws.expect(lambda f: f["op"] == "message" and f["channel"] == yes)["data"] == 1
    # HTTP: a publish, and a history read (a subscribe's right).
    yes2, no2 = names("yes"), names("no")
    assert authz.request("POST", "/api/v1/messages", {"channel": yes2, "data": 2}, token=token)[0] == 202
    status, _, problem = authz.request("POST", "/api/v1/messages", {"channel": no2, "data": 2}, token=token)
    assert status == 403 and problem["status"] == 403
    assert authz.request("GET", f"/api/v1/channels/{yes2}/history", token=token)[0] == 200
    assert authz.request("GET", f"/api/v1/channels/{no2}/history", token=token)[0] == 403
    # What the endpoint was asked: the user, the channel, the op; signed with Herald's key.
    assert [(c["user"], c["op"]) for c in endpoint.asked(yes)] == [(user, "subscribe"), (user, "publish")]
    assert [(c["user"], c["op"]) for c in endpoint.asked(yes2)] == [(user, "publish"), (user, "subscribe")]
    call = endpoint.asked(no)[0]
    assert set(json.loads(call["raw"])) == {"user", "channel", "op"}
    secret = (stack.settings.webhook_secret or stack.settings.secret_key).encode()
    stamp, mac = (part.split("=", 1)[1] for part in call["signature"].split(","))
    assert abs(int(stamp) - time.time()) < 60
    assert mac == hmac.new(secret, stamp.encode() + b"." + call["raw"], hashlib.sha256).hexdigest()
    ws.close()


def test_globs_that_allow_never_call_the_endpoint(stack, endpoint, authz):
    ws, user = client(authz, stack)
    own = f"own:{uuid.uuid4().hex[:12]}"
    assert subscribe(ws, own)["op"] == "subscribed"
    assert ask(ws, {"op": "publish", "channel": own, "data": 1}, "p")["op"] == "ack"
    token = stack.token(user, subscribe=["own:*"], publish=["own:*"])
    assert authz.request("POST", "/api/v1/messages", {"channel": own, "data": 2}, token=token)[0] == 202
    assert endpoint.asked(own) == []
    ws.close()


def test_answers_and_denials_are_cached_until_the_ttl(stack, endpoint, authz):
    hits = metric(authz, "herald_authorize_cache_hits_total")
    ws, _ = client(authz, stack)
    yes, no = names("yes"), names("no")
    assert subscribe(ws, yes)["op"] == "subscribed" and forbidden(subscribe(ws, no))
    ws.send({"op": "unsubscribe", "channel": yes})
    assert subscribe(ws, yes)["op"] == "subscribed" and forbidden(subscribe(ws, no))
    assert len(endpoint.asked(yes)) == 1 and len(endpoint.asked(no)) == 1  # the second time: no call
    assert metric(authz, "herald_authorize_cache_hits_total") >= hits + 2
    time.sleep(TTL + 0.2)
    ws.send({"op": "unsubscribe", "channel": yes})
    assert subscribe(ws, yes)["op"] == "subscribed" and forbidden(subscribe(ws, no))
    assert len(endpoint.asked(yes)) == 2 and len(endpoint.asked(no)) == 2  # expired: asked again
    ws.close()


def test_concurrent_identical_questions_make_one_call(stack, endpoint, authz):
    user = f"u-{uuid.uuid4().hex[:8]}"
    sockets = [client(authz, stack, user)[0] for _ in range(10)]
    channel = names("late")  # answered after TIMEOUT / 2: every socket asks while the first call runs
    for ws in sockets:
        ws.send({"op": "subscribe", "channel": channel, "ref": "s"})
    for ws in sockets:
        assert ws.expect(lambda f: f.get("ref") == "s")["op"] == "subscribed"
        ws.close()
    assert len(endpoint.asked(channel)) == 1


def metric(web, name: str) -> float:
    """The sum of a metric's samples on a web process's /metrics."""
    text = web.request("GET", "/metrics")[2]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def test_a_timeout_is_denied_or_allowed_as_configured(stack, endpoint, authz, authz_allow):
    denied, _ = client(authz, stack)
    allowed, _ = client(authz_allow, stack)
    started = time.monotonic()
    assert unavailable(subscribe(denied, names("hang")))
    assert time.monotonic() - started < SLOW_SECONDS / 2  # decided at the timeout, not the answer
    assert subscribe(allowed, names("hang"))["op"] == "subscribed"
    assert ask(allowed, {"op": "publish", "channel": names("hang"), "data": 1}, "p")["op"] == "ack"
    # An answer that is not one (a 401: a secret the endpoint does not share; junk) is no
    # outage: denied even under ALLOW, so a misconfiguration opens nothing.
    assert forbidden(subscribe(allowed, names("unsigned"))) and forbidden(subscribe(allowed, names("junk")))
    denied.close()
    allowed.close()


def test_failures_are_not_cached(stack, endpoint, authz):
    ws, _ = client(authz, stack)
    channel = names("fail")
    assert unavailable(subscribe(ws, channel)) and unavailable(subscribe(ws, channel))
    assert len(endpoint.asked(channel)) == 2
    ws.close()


@pytest.mark.parametrize("namespace", ["drip", "huge", "junk", "fail", "hang"])
def test_a_hostile_endpoint_costs_only_its_own_decision(stack, endpoint, authz, namespace):
    """Ten sockets ask at once about channels the endpoint answers badly; meanwhile another
    socket subscribes, is sent messages and asks the endpoint about a well-answered channel."""
    hostile = [client(authz, stack)[0] for _ in range(10)]
    other, user = client(authz, stack)
    channels = [names(namespace) for _ in hostile]
    sent = time.monotonic()
    for ws, channel in zip(hostile, channels):
        ws.send({"op": "subscribe", "channel": channel, "ref": "h"})
    own = f"own:{uuid.uuid4().hex[:12]}"
    token = stack.token(user, subscribe=["own:*"], publish=["own:*"])
    assert subscribe(other, own)["op"] == "subscribed"
    # Not queued behind the hostile decisions (each waits TIMEOUT): served meanwhile.
    served = time.monotonic() - sent
    assert subscribe(other, names("yes"))["op"] == "subscribed"
    assert authz.request("POST", "/api/v1/messages", {"channel": own, "data": 0}, token=token)[0] == 202
    # No answer in time is an outage (policy DENY: `unavailable`); a bad answer a denial.
    refused = forbidden if namespace in ("huge", "junk") else unavailable
    for ws, channel in zip(hostile, channels):
        assert refused(ws.expect(lambda f: f.get("ref") == "h", timeout=15)), channel
    # Each decision ended at the timeout, not when the endpoint was done.
    assert time.monotonic() - sent < SLOW_SECONDS / 2
    if namespace in ("drip", "hang"):
        assert served < TIMEOUT
    for ws in hostile:
        ws.send({"op": "ping"})
        assert ws.expect(lambda f: f["op"] == "pong")  # the socket goes on
        ws.close()
    for n in range(5):
        if n:
            assert authz.request("POST", "/api/v1/messages", {"channel": own, "data": n}, token=token)[0] == 202
        assert other.expect(lambda f: f["op"] == "message" and f["channel"] == own)["data"] == n
    assert [len(endpoint.asked(channel)) for channel in channels] == [1] * len(channels)  # no retries
    other.close()


def test_calls_at_once_are_bounded_and_the_excess_fails_within_its_timeout(stack, endpoint, authz):
    """More distinct slow questions at once than MAX_CALLS: the excess never reaches the
    endpoint, each waits for a free call only until its own timeout, and the process goes on."""
    users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(2)]  # HERALD_WS_MAX_PER_USER is 100
    sockets = [client(authz, stack, users[n % 2])[0] for n in range(2 * MAX_CALLS)]
    channels = [names("hang") for _ in sockets]
    sent = time.monotonic()
    for ws, channel in zip(sockets, channels):
        ws.send({"op": "subscribe", "channel": channel, "ref": "h"})
    other, _ = client(authz, stack)
    assert subscribe(other, f"own:{uuid.uuid4().hex[:8]}")["op"] == "subscribed"
    for ws in sockets:
        assert unavailable(ws.expect(lambda f: f.get("ref") == "h", timeout=15))
    assert time.monotonic() - sent < SLOW_SECONDS / 2
    # A call is freed only by one that started after `sent` and timed out: until
    # sent + TIMEOUT, no more than MAX_CALLS can have reached the endpoint.
    early = [call for channel in channels for call in endpoint.asked(channel) if call["at"] < sent + TIMEOUT]
    assert len(early) <= MAX_CALLS
    print(f"AUTHORIZE-FIGURES questions={len(channels)} asked_within_timeout={len(early)} max_calls={MAX_CALLS}")
    for ws in sockets:
        ws.close()
    other.close()


def test_a_refused_connection_is_a_failure(stack):
    url = f"http://127.0.0.1:{embedded.free_port()}/authorize"  # nothing listens there
    web = _authz_web(stack, "web-authz-refused", url, "DENY")
    try:
        ws, _ = client(web, stack)
        # An outage of the endpoint is no fault of the client's: past MAX_BAD_FRAMES refusals
        # its socket stays open (a redeploy of the endpoint must not drop every client).
        for _ in range(MAX_BAD_FRAMES + 1):
            assert unavailable(subscribe(ws, names("yes")))
        assert subscribe(ws, f"own:{uuid.uuid4().hex[:8]}")["op"] == "subscribed"
        ws.close()
        wait_until(lambda: "authorize failed" in web.proc.log(), 5, what="the failure logged")
    finally:
        web.proc.stop(10)
