"""The message envelope: validation of what clients send, and the record format.

A record on the Kafka topic is the envelope as compact JSON, keyed by channel
so that one channel stays in one partition and keeps its order.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time

from pipeline.errors import PermanentError, ValidationError

CHANNEL_RE = re.compile(r"[A-Za-z0-9_:.@-]{1,200}")
ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
TYPE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
PUBLISH_FIELDS = frozenset({"channel", "data", "type", "id"})
ENVELOPE_FIELDS = ("id", "channel", "type", "data", "sender", "ts")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now_ms: int | None = None) -> str:
    """A 26-character ULID: sortable by creation time, unique without coordination."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


def now_ms() -> int:
    """Milliseconds since the epoch, the SPEC's `ts`."""
    return int(time.time() * 1000)


def valid_channel(channel) -> bool:
    """True when `channel` matches the SPEC's channel pattern."""
    return isinstance(channel, str) and CHANNEL_RE.fullmatch(channel) is not None


def namespace(channel: str) -> str:
    """The part before the first ':' (empty when there is none)."""
    return channel.split(":", 1)[0] if ":" in channel else ""


def channel_allowed(channel: str, globs) -> bool:
    """True when one of the token's channel globs (`chat:*`) matches."""
    return any(fnmatch.fnmatchcase(channel, glob) for glob in globs or ())


def loads(raw):
    """Strict JSON: `NaN`, `Infinity` and `-Infinity` are refused with ValueError, as
    browsers' JSON.parse refuses them (a frame holding one would be lost)."""
    return json.loads(raw, parse_constant=_refuse_constant)


def dumps(value) -> str:
    """Compact strict JSON text (ValueError on NaN or an infinity)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_publish(body, *, sender: str, idempotency_key: str | None = None) -> dict:
    """Validate one client message and return its envelope, or raise ValidationError."""
    if not isinstance(body, dict):
        raise ValidationError("A message is a JSON object", [{"field": "", "problem": "must be an object"}])
    errors = []
    for field in sorted(set(body) - PUBLISH_FIELDS):
        errors.append({"field": field, "problem": "unknown field"})
    channel = body.get("channel")
    if channel is None:
        errors.append({"field": "channel", "problem": "required"})
    elif not valid_channel(channel):
        errors.append({"field": "channel", "problem": "must match [A-Za-z0-9_:.@-]{1,200}"})
    if "data" not in body:
        errors.append({"field": "data", "problem": "required"})
    mtype = body.get("type", "message")
    if not isinstance(mtype, str) or not TYPE_RE.fullmatch(mtype):
        errors.append({"field": "type", "problem": "must match [A-Za-z0-9_.:-]{1,64}"})
    msg_id = body.get("id", idempotency_key)
    if msg_id is not None and (not isinstance(msg_id, str) or not ID_RE.fullmatch(msg_id)):
        errors.append({"field": "id", "problem": "must match [A-Za-z0-9_.:-]{1,128}"})
    if idempotency_key is not None and "id" in body and body["id"] != idempotency_key:
        errors.append({"field": "id", "problem": "differs from the Idempotency-Key header"})
    if errors:
        raise ValidationError("The message has invalid fields", errors)
    try:
        # Refused here, before any idempotency claim: a lone surrogate ("\ud800")
        # or NaN would fail only when the record is encoded (issue 8: a 500 then).
        dumps(body["data"]).encode()
    except (ValueError, RecursionError):
        raise ValidationError("data cannot be encoded as UTF-8 JSON (lone surrogate, NaN or Infinity)",
                              [{"field": "data", "problem": "not encodable as UTF-8 JSON"}], status=400,
                              title="Unencodable data") from None
    return {
        "id": msg_id or new_id(),
        "channel": channel,
        "type": mtype,
        "data": body["data"],
        "sender": sender,
        "ts": now_ms(),
    }


def encode(envelope: dict) -> bytes:
    """The record value: compact, strict UTF-8 JSON."""
    return dumps(envelope).encode()


def decode(value: bytes | None) -> dict:
    """Parse a record value back into an envelope, or raise PermanentError saying why."""
    if value is None:
        raise PermanentError("record has no value")
    try:
        envelope = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PermanentError(f"record is not JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise PermanentError("record is not a JSON object")
    missing = [f for f in ENVELOPE_FIELDS if f not in envelope]
    if missing:
        raise PermanentError(f"record lacks {', '.join(missing)}")
    if not valid_channel(envelope["channel"]):
        raise PermanentError("record has an invalid channel")
    if not isinstance(envelope["id"], str) or not ID_RE.fullmatch(envelope["id"]):
        raise PermanentError("record has an invalid id")
    return envelope
