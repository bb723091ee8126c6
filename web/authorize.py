"""Who may subscribe to or publish on a channel: the token's globs first, then, for what
they do not allow, the deployment's own endpoint (HERALD_AUTHORIZE_URL; docs/guide.md:
"Permissions from your backend").

The endpoint is hostile until bounded: one decision costs at most
HERALD_AUTHORIZE_TIMEOUT (waiting for a free call, connecting and reading
together), an answer is read up to MAX_ANSWER_BYTES, and at most MAX_CALLS
calls run at once in a process. No answer in time (a timeout, a refused
connection, a 5xx) is decided by HERALD_AUTHORIZE_ON_TIMEOUT: allowed, or
refused as `unavailable` (HTTP 503), which a client retries and which never
closes its socket. An answer that is not one (another 4xx, a body that is not
`{"allow": <bool>}`) is denied whatever the policy.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable

import gevent
import urllib3

from pipeline.core.errors import TransientError
from pipeline.core.metrics import AUTHORIZE_CACHE_HITS, AUTHORIZE_CALLS, AUTHORIZE_LATENCY
from pipeline.webhooks.signing import SIGNATURE_HEADER, signature
from web.auth import Identity

SUBSCRIBE, PUBLISH = "subscribe", "publish"
# `{"allow": false}` is 16 bytes: anything near this is not an answer.
MAX_ANSWER_BYTES = 4096
# Answers cached per process, at most (about 200 bytes each).
MAX_ENTRIES = 100_000
# Calls in flight per process, at most: a slow endpoint and many distinct
# questions cost that many sockets, and the rest wait (within their deadline).
MAX_CALLS = 64

log = logging.getLogger("herald.authorize")


class AuthorizeFailed(Exception):
    """The endpoint gave no answer: a timeout, a refused connection, a 5xx, or no free call
    in time. HERALD_AUTHORIZE_ON_TIMEOUT decides."""


class BadAnswer(AuthorizeFailed):
    """The endpoint answered, but not an answer: a 4xx other than 403 (a wrong URL, a secret
    it does not share), or a body that is not `{"allow": <bool>}` within MAX_ANSWER_BYTES.
    Denied whatever the policy: a misconfiguration must not open every channel."""


class AuthorizeUnavailable(TransientError):
    """The endpoint gave no answer and the policy denies: the op is refused as `unavailable`
    (HTTP 503), worth retrying and never counted against the client as a bad frame."""


class Answers:
    """Answers kept for `ttl` seconds, at most `max_entries`, the least recently used dropped first."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._entries: collections.OrderedDict[Hashable, tuple[float, bool]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bool | None:
        """The answer kept for `key`, or None when there is none (or it expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, allow: bool) -> None:
        """Keep `allow` for `key` (nothing when the TTL is 0)."""
        if self.ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self.clock() + self.ttl, allow)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: bool | None = None
        self.error: BaseException | None = None


class SingleFlight:
    """Concurrent calls with one key make one call: the first runs it, the others wait for its result."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}
        self._lock = threading.Lock()

    def do(self, key: Hashable, call: Callable[[], bool], wait: float) -> bool:
        """`call()`'s result, or that of the identical call already running (waited for at most
        `wait` seconds, then AuthorizeFailed); the running call's exception is raised to all."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if leader:
            try:
                flight.result = call()
            except BaseException as exc:  # gevent's Timeout too: the waiters must not wait for nothing
                flight.error = exc
                raise
            finally:
                with self._lock:
                    del self._flights[key]
                flight.done.set()
            return flight.result
        if not flight.done.wait(wait):
            raise AuthorizeFailed("the identical call did not end in time")
        if flight.error is not None:
            kind = BadAnswer if isinstance(flight.error, BadAnswer) else AuthorizeFailed
            raise kind(f"the identical call failed: {flight.error}")
        assert flight.result is not None
        return flight.result

    def __len__(self) -> int:
        return len(self._flights)


class Decider:
    """One decision per (user, op, channel): from the cache, else from `ask` (single-flight,
    at most `max_calls` at once), all within `timeout` seconds; a failure is `on_failure`.

    `ask(user, op, channel, seconds)` answers True or False within `seconds` or raises."""

    def __init__(self, ask: Callable[[str, str, str, float], bool], *, ttl: float, timeout: float,
                 on_failure: bool, max_calls: int = MAX_CALLS, max_entries: int = MAX_ENTRIES):
        self.ask, self.timeout, self.on_failure, self.max_calls = ask, timeout, on_failure, max_calls
        self.answers = Answers(ttl, max_entries)
        self.flights = SingleFlight()
        self._calls = threading.BoundedSemaphore(max_calls)

    def decide(self, user: str, op: str, channel: str) -> bool:
        """True when `user` may do `op` on `channel`."""
        key = (user, op, channel)
        cached = self.answers.get(key)
        if cached is not None:
            AUTHORIZE_CACHE_HITS.inc()
            return cached
        deadline = time.monotonic() + self.timeout
        try:
            return self.flights.do(key, lambda: self._call(key, deadline), self.timeout)
        except BadAnswer as exc:
            log.error("authorize endpoint misanswered: denied", extra={"user": user, "op": op, "channel": channel,
                                                                       "error": str(exc)[:200]})
            return False
        except Exception as exc:  # whatever else a hostile endpoint makes fail is decided by the policy
            log.warning("authorize failed", extra={"user": user, "op": op, "channel": channel,
                                                   "error": str(exc)[:200], "allow": self.on_failure})
            if self.on_failure:
                return True
            raise AuthorizeUnavailable("permissions could not be checked now, retry") from None

    def _call(self, key: tuple[str, str, str], deadline: float) -> bool:
        # Failures are not cached: a blip would otherwise decide (deny, or
        # allow) for a whole TTL; single-flight and MAX_CALLS already bound
        # what a failing endpoint is asked.
        if not self._calls.acquire(timeout=max(0.0, deadline - time.monotonic())):
            AUTHORIZE_CALLS.labels("failed").inc()
            raise AuthorizeFailed(f"no free call within the timeout ({self.max_calls} at once)")
        started = time.monotonic()
        try:
            allow = self.ask(*key, max(0.001, deadline - started))
        except Exception:
            AUTHORIZE_CALLS.labels("failed").inc()
            raise
        finally:
            self._calls.release()
            AUTHORIZE_LATENCY.observe(time.monotonic() - started)
        AUTHORIZE_CALLS.labels("allow" if allow else "deny").inc()
        self.answers.put(key, allow)
        return allow


class Endpoint:
    """HERALD_AUTHORIZE_URL over a pool of keep-alive connections: one signed POST a question."""

    def __init__(self, settings, max_calls: int = MAX_CALLS):
        self.url = settings.authorize_url
        self.secret = settings.webhook_secret or settings.secret_key
        if not self.secret:
            log.warning("authorize calls go unsigned: set HERALD_WEBHOOK_SECRET or HERALD_SECRET_KEY")
        # Retries off, no redirects: one decision is one call, within its deadline (set per call).
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=max_calls, retries=False)

    def ask(self, user: str, op: str, channel: str, seconds: float) -> bool:
        """The endpoint's answer, within `seconds`, or AuthorizeFailed."""
        body = json.dumps({"user": user, "channel": channel, "op": op}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        # The socket timeouts bound each read; this bounds them all together
        # (a drip of a byte a second would pass every read's timeout).
        with gevent.Timeout(seconds, AuthorizeFailed(f"no answer within {seconds:.3f}s")):
            try:
                response = self.pool.request("POST", self.url, body=body, headers=headers, redirect=False,
                                             preload_content=False, decode_content=False,
                                             timeout=urllib3.Timeout(connect=seconds, read=seconds))
            except urllib3.exceptions.HTTPError as exc:
                raise AuthorizeFailed(str(exc)) from None
            finished = False
            try:
                status = response.status
                if status == 403:
                    return False  # its body is not read: the connection goes (a 200 keeps it)
                if 400 <= status < 500:
                    raise BadAnswer(f"status {status}")
                if not 200 <= status < 300:
                    raise AuthorizeFailed(f"status {status}")
                raw = response.read(MAX_ANSWER_BYTES + 1)
                if len(raw) > MAX_ANSWER_BYTES:
                    raise BadAnswer(f"an answer of more than {MAX_ANSWER_BYTES} bytes")
                finished = True
                return _allow(raw)
            except urllib3.exceptions.HTTPError as exc:
                raise AuthorizeFailed(str(exc)) from None
            finally:
                if not finished:
                    # Unread bytes would be the next call's answer: the connection goes.
                    response.close()
                response.release_conn()


def _allow(raw: bytes) -> bool:
    try:
        answer = json.loads(raw)
    except ValueError:
        raise BadAnswer("an answer that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
        raise BadAnswer('an answer without "allow": true or false')
    return answer["allow"]


class Permissions:
    """Decides an identity's right to an operation (SUBSCRIBE or PUBLISH) on a channel."""

    def __init__(self, settings):
        self.settings = settings
        self.decider: Decider | None = None
        if settings.authorize_url:
            self.decider = Decider(Endpoint(settings).ask, ttl=settings.authorize_ttl,
                                   timeout=settings.authorize_timeout,
                                   on_failure=settings.authorize_on_timeout == "ALLOW")

    def allows(self, identity: Identity, op: str, channel: str) -> bool:
        """True when the token's globs allow `op` on `channel`, else when HERALD_AUTHORIZE_URL does."""
        if identity.may_publish(channel) if op == PUBLISH else identity.may_subscribe(channel):
            return True
        return self.decider is not None and self.decider.decide(identity.user, op, channel)
