"""One webhook POST: the signed body out, the status back, everything else bounded.

A receiver is hostile until bounded: it may answer a huge body, trickle it,
hang, redirect or refuse. The POST waits HERALD_WEBHOOK_TIMEOUT at most for
its answer, follows no redirect, reads at most ANSWER_BYTES of the answer
(and drops the connection rather than read more) and counts anything but a
2xx as a failure.
"""

from __future__ import annotations

import logging
import time

import urllib3

from pipeline.core.events import MAX_RECEIVERS
from pipeline.core.messages import new_id
from pipeline.webhooks.signing import DELIVERY_HEADER, SIGNATURE_HEADER, signature

log = logging.getLogger("herald.webhooks")
ANSWER_BYTES = 64 * 1024  # of a receiver's answer read (and discarded) to reuse its connection
READ_CHUNK = 16 * 1024


class Sender:
    """POSTs signed bodies to receivers over pooled connections (one pool a receiver)."""

    def __init__(self, settings):
        self.secret = settings.webhook_secret or ""
        self.timeout = settings.webhook_timeout
        # One connection a receiver at a time is all a lease allows; a replay from
        # a web process adds its own pool.
        self.pool = urllib3.PoolManager(num_pools=MAX_RECEIVERS, maxsize=2, retries=False,
                                        timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))

    def post(self, url: str, body: bytes) -> tuple[bool, str]:
        """POST `body` signed; returns (accepted: a 2xx answer, what happened in words)."""
        delivery = new_id()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(self.secret, body),
                   DELIVERY_HEADER: delivery, "User-Agent": "Herald-Webhooks"}
        deadline = time.monotonic() + self.timeout
        try:
            response = self.pool.request("POST", url, body=body, headers=headers, redirect=False,
                                         preload_content=False)
        except urllib3.exceptions.HTTPError as exc:  # refused, timed out, TLS, a broken answer
            return False, f"{type(exc).__name__}: {exc}"[:300]
        try:
            self._discard(response, deadline)
        finally:
            response.release_conn()
        return 200 <= response.status < 300, f"HTTP {response.status}"

    @staticmethod
    def _discard(response, deadline: float) -> None:
        # Read a short answer to the end (the connection goes back to the pool);
        # past ANSWER_BYTES or the deadline (an answer trickled byte by byte), drop
        # the connection instead: its status is all that counts.
        read = 0
        try:
            while read <= ANSWER_BYTES and time.monotonic() < deadline:
                chunk = response.read(READ_CHUNK)
                if not chunk:
                    return
                read += len(chunk)
        except urllib3.exceptions.HTTPError:
            pass
        response.close()
