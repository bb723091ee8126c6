"""One webhook POST: the signed body out, the status back, everything else bounded.

A receiver is hostile until bounded: it may answer a huge body, trickle it,
hang, redirect or refuse. The whole exchange (connect, send, status line and
headers, the answer read) ends within HERALD_WEBHOOK_TIMEOUT: a watchdog
shuts the connection's socket down at the deadline, since socket timeouts
bound each read, not their sum (a receiver dripping its headers a byte at a
time would hold the POST as long as it likes). Name resolution alone is out
of its reach (the resolver's own timeout bounds it). The POST follows no redirect,
reads at most ANSWER_BYTES of the answer (and drops the connection rather
than read more) and counts anything but a 2xx as a failure.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from pipeline.core.events import MAX_RECEIVERS
from pipeline.core.messages import new_id
from pipeline.webhooks.signing import DELIVERY_HEADER, SIGNATURE_HEADER, signature

log = logging.getLogger("herald.webhooks")
ANSWER_BYTES = 64 * 1024  # of a receiver's answer read (and discarded) to reuse its connection
READ_CHUNK = 16 * 1024
DEADLINE_SLACK = 0.5  # seconds a POST may outlive HERALD_WEBHOOK_TIMEOUT: the watchdog's wake-up, the unwinding

_calls = threading.local()  # the Watchdog of the POST this thread is making (one at a time a thread)


class Watchdog:
    """Ends one POST at its deadline: shuts down the socket of the connection it uses, so a
    blocked connect, send or read fails at once."""

    def __init__(self, seconds: float):
        self.lock = threading.Lock()
        self.fired = False
        self.done = False
        self.conn: HTTPConnection | None = None
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def attach(self, conn: HTTPConnection) -> None:
        """The POST uses `conn` now (a pooled one, or one being opened)."""
        with self.lock:
            self.conn = conn
            if self.fired:
                _abort(conn.sock)

    def opened(self, sock: socket.socket) -> None:
        """A socket was just opened for the POST: past the deadline, it is cut at once."""
        with self.lock:
            if self.fired:
                _abort(sock)

    def finish(self) -> bool:
        """Stops the watchdog; whether it fired (the connection is cut: never reuse it)."""
        self.timer.cancel()
        with self.lock:
            self.done = True
            return self.fired

    def _fire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.fired = True
            if self.conn is not None:
                _abort(self.conn.sock)


def _abort(sock: socket.socket | None) -> None:
    # The plain socket's shutdown, also under TLS (SSLSocket.shutdown would drop its TLS
    # state under the reading thread's feet); the owner thread closes the socket itself.
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # already closed or not connected yet: nothing blocks on it
            pass


class _Watched:
    """Mixin of the connections a Sender's pools use: each tells the calling thread's
    Watchdog which connection (and socket) the POST is on."""

    sock: socket.socket | None

    def connect(self) -> None:
        watchdog = getattr(_calls, "watchdog", None)
        if watchdog is not None:
            watchdog.attach(self)
        super().connect()  # type: ignore[misc]

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        watchdog = getattr(_calls, "watchdog", None)
        if watchdog is not None:
            watchdog.opened(sock)
        return sock

    def request(self, *args, **kwargs) -> None:
        watchdog = getattr(_calls, "watchdog", None)
        if watchdog is not None:
            watchdog.attach(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class Sender:
    """POSTs signed bodies to receivers over pooled connections (one pool a receiver)."""

    def __init__(self, settings):
        self.secret = settings.webhook_secret or ""
        self.timeout = settings.webhook_timeout
        # One connection a receiver at a time is all a lease allows; a replay from
        # a web process adds its own pool.
        self.pool = urllib3.PoolManager(num_pools=MAX_RECEIVERS, maxsize=2, retries=False)
        self.pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def post(self, url: str, body: bytes) -> tuple[bool, str]:
        """POST `body` signed; returns (accepted: a 2xx answer, what happened in words). It
        returns within HERALD_WEBHOOK_TIMEOUT (+ DEADLINE_SLACK), whatever the receiver does."""
        delivery = new_id()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(self.secret, body),
                   DELIVERY_HEADER: delivery, "User-Agent": "Herald-Webhooks"}
        watchdog = Watchdog(self.timeout)
        _calls.watchdog = watchdog
        watchdog.timer.start()
        try:
            return self._exchange(url, body, headers, watchdog, time.monotonic() + self.timeout)
        finally:  # whatever happened, the watchdog never outlives its POST (its connection may serve another)
            _calls.watchdog = None
            watchdog.finish()

    def _exchange(self, url: str, body: bytes, headers: dict, watchdog: Watchdog,
                  deadline: float) -> tuple[bool, str]:
        try:
            response = self.pool.request("POST", url, body=body, headers=headers, redirect=False,
                                         preload_content=False,
                                         timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))
        except urllib3.exceptions.HTTPError as exc:  # refused, timed out, TLS, a broken answer
            if watchdog.finish():
                return False, f"no whole answer within HERALD_WEBHOOK_TIMEOUT ({self.timeout:g}s)"
            return False, f"{type(exc).__name__}: {exc}"[:300]
        try:
            self._discard(response, deadline)
        finally:
            if watchdog.finish():  # cut, maybe after the answer's last byte: it never goes back to the pool
                response.close()
            response.release_conn()
        return 200 <= response.status < 300, f"HTTP {response.status}"

    @staticmethod
    def _discard(response, deadline: float) -> None:
        # Read a short answer to the end (the connection goes back to the pool);
        # past ANSWER_BYTES or the deadline (an answer trickled byte by byte, cut by
        # the watchdog), drop the connection instead: its status is all that counts.
        read = 0
        try:
            while read <= ANSWER_BYTES and time.monotonic() < deadline:
                chunk = response.read(READ_CHUNK)
                if not chunk:
                    return
                read += len(chunk)
        except (urllib3.exceptions.HTTPError, OSError):
            pass
        response.close()
