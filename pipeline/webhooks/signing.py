"""The signature of a webhook POST (docs/webhooks.md: "Signature"), its one owner.

`Herald-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
The timestamp is signed with the body, so a receiver that checks its age
(`verify`'s tolerance) refuses a POST recorded and replayed later. `verify`
is what a receiver runs, in a few lines it may copy.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Herald-Signature"
DELIVERY_HEADER = "Herald-Delivery"  # the id of one POST (a batch), for the receiver's logs
TOLERANCE = 300  # seconds a receiver accepts a signature's timestamp off its own clock, by default


def signature(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The Herald-Signature header value of `body`, signed at `timestamp` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str | None, body: bytes, tolerance: float = TOLERANCE,
           now: float | None = None) -> bool:
    """True when `header` (Herald-Signature) signs `body` with `secret` at a time within
    `tolerance` seconds of `now`: what a receiver checks before it trusts a POST."""
    try:
        parts = dict(item.split("=", 1) for item in (header or "").split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)
