"""The message envelope: validation of what clients send, and the record format.

A record on the Kafka topic is the message as compact JSON, keyed by channel
so that one channel stays in one partition and keeps its order. Past the
bridge the message travels as an `Envelope`, with what the pipeline knows
about it; `Envelope.to_wire` and `Envelope.from_wire` are its only encoder and
decoder (Kafka records, Celery task arguments, the in-flight index, dead letters).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import operator
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from pipeline.core.errors import DataOutOfBounds, InvalidInput, PermanentError, TooLarge, Unencodable

CHANNEL_RE = re.compile(r"[A-Za-z0-9_:.@-]{1,200}")
ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
TYPE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MESSAGE_FIELDS = ("id", "channel", "type", "data", "sender", "ts")
# Ingest bounds on `data` (docs/protocol.md: "Limits"): whatever is
# accepted must be handled by every later stage, which recurse over it
# (Celery's pool pickles task arguments, rules copy data) and encode it
# (orjson takes integers of 64 bits; past them, the slower standard library).
MAX_DATA_DEPTH = 64  # arrays and objects nested in one another
MIN_INT, MAX_INT = -(2 ** 63), 2 ** 64 - 1

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
    """Milliseconds since the epoch: a message's `ts`."""
    return int(time.time() * 1000)


def valid_channel(channel: object) -> bool:
    """True when `channel` is a channel name (CHANNEL_RE)."""
    return isinstance(channel, str) and CHANNEL_RE.fullmatch(channel) is not None


def namespace(channel: str) -> str:
    """The part before the first ':' (empty when there is none)."""
    return channel.split(":", 1)[0] if ":" in channel else ""


def channel_allowed(channel: str, globs: Iterable[str] | None) -> bool:
    """True when one of the token's channel globs (`chat:*`) matches."""
    return any(fnmatch.fnmatchcase(channel, glob) for glob in globs or ())


def loads(raw: str | bytes) -> Any:
    """Strict JSON: `NaN`, `Infinity` and `-Infinity` are refused with ValueError, as
    browsers' JSON.parse refuses them (a frame holding one would be lost)."""
    return json.loads(raw, parse_constant=_refuse_constant)


def dumps(value: Any) -> str:
    """Compact strict JSON text (ValueError on NaN or an infinity)."""
    return dumps_bytes(value).decode()


def dumps_bytes(value: Any) -> bytes:
    """`dumps` as UTF-8 bytes: what a Kafka record and a Redis field hold.

    orjson encodes, for its speed on every publish and delivery, with the same
    compact output as the standard library. Where the two differ, the standard library's rules stand: orjson
    writes NaN and the infinities as null, so a null in its output means a
    look for them, and what it refuses (an integer past 64 bits, a key that
    is not text, a lone surrogate) goes to the standard library, which
    encodes or refuses it as before.
    """
    try:
        text = orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if b"null" in text and not _finite(value):
        raise ValueError("NaN and the infinities are not JSON")
    return text


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(item) for item in value)
    return True


def data_problem(data: Any) -> str | None:
    """What breaks the ingest bounds in `data` (arrays and objects nested deeper than
    MAX_DATA_DEPTH, an integer outside MIN_INT..MAX_INT), or None. Iterative: any
    depth costs no stack."""
    pending: list[tuple[Any, int]] = [(data, 1)] if type(data) in (dict, list) else []
    if type(data) is int and not MIN_INT <= data <= MAX_INT:
        return _BIG_INT
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DATA_DEPTH:
            return f"nests arrays and objects deeper than {MAX_DATA_DEPTH} levels (the limit)"
        for item in value.values() if type(value) is dict else value:
            kind = type(item)
            if kind is dict or kind is list:
                pending.append((item, depth + 1))
            elif kind is int and not MIN_INT <= item <= MAX_INT:
                return _BIG_INT
    return None


_BIG_INT = "holds an integer outside -2**63..2**64-1 (the limit)"


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# The message a client publishes (an HTTP body, a batch item, a WebSocket
# `publish` op). This model is the validation itself and, through web/openapi.py,
# the schema the API documents: the two cannot drift.
ChannelName = Annotated[str, Field(pattern=f"^{CHANNEL_RE.pattern}$",
                                   description="a channel name; the part before the first ':' is its namespace")]
MessageId = Annotated[str, Field(pattern=f"^{ID_RE.pattern}$")]
MessageType = Annotated[str, Field(pattern=f"^{TYPE_RE.pattern}$")]


def no_null_default(schema: dict[str, Any]) -> None:
    """For a field whose None default means "absent": the document shows no `default: null`."""
    schema.pop("default", None)


class Publish(BaseModel):
    """A message as a client publishes it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    channel: ChannelName
    data: Any = Field(description=f"any JSON value with arrays and objects nested at most {MAX_DATA_DEPTH} deep "
                                  "and integers from -2^63 to 2^64-1 (else 400)")
    type: MessageType = "message"
    # Absent means "mint a ULID"; `null` is not a value the API takes (the
    # default is not validated, so None stands only for "absent"; the type
    # stays `str` so that a null is refused).
    id: MessageId = Field(  # type: ignore[assignment]
        None, json_schema_extra=no_null_default,
        description="the client's id for the message: the same id within HERALD_STATUS_TTL is answered "
                    "with the first answer and published once")
    # None stands only for "absent" (false), so a message's JSON is as it was sent; the type stays `bool`.
    ephemeral: bool = Field(None, json_schema_extra=no_null_default,  # type: ignore[assignment]
                            description="true: send it straight to the channel's subscribers, at most once: no "
                                        "Kafka, history or status (docs/protocol.md: Ephemeral messages); every "
                                        "message of HERALD_EPHEMERAL_NAMESPACES is")


# pydantic's error types, said the way the API says them (docs/protocol.md: "Errors").
_PROBLEMS = {"missing": "required", "extra_forbidden": "unknown field", "model_type": "must be an object",
             "dict_type": "must be an object"}


def field_errors(exc: PydanticError, prefix: tuple[str | int, ...] = ()) -> list[dict[str, str]]:
    """A pydantic ValidationError as the API's `errors`: `{field, problem}` with the field's
    path (`messages[2].channel`)."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        path = ""
        for part in (*prefix, *error["loc"]):
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if error["type"] == "string_pattern_mismatch":
            problem = f"must match {error['ctx']['pattern'].strip('^$')}"
        else:
            problem = _PROBLEMS.get(error["type"], error["msg"])
        errors.append({"field": path, "problem": problem})
    return errors


def parse_publish(body: object, *, sender: str, idempotency_key: str | None = None,
                  max_bytes: int | None = None) -> Envelope:
    """Validate one client message (a dict, or a `Publish` already validated) and return its
    envelope, or raise InvalidInput (or a subclass); with `max_bytes`, a message whose JSON is
    larger is TooLarge."""
    if not isinstance(body, Publish):
        try:
            body = Publish.model_validate(body)
        except PydanticError as exc:
            raise InvalidInput("The message has invalid fields", field_errors(exc)) from None
    if idempotency_key is not None and body.id is not None and body.id != idempotency_key:
        raise InvalidInput("The message has invalid fields",
                           [{"field": "id", "problem": "differs from the Idempotency-Key header"}])
    problem = data_problem(body.data)
    if problem is not None:
        raise DataOutOfBounds(f"data {problem}", [{"field": "data", "problem": problem}])
    try:
        # Refused here, before any idempotency claim: a lone surrogate ("\ud800")
        # or NaN would otherwise fail only when the record is encoded, after the claim.
        size = len(dumps_bytes(body.data))
    except (ValueError, RecursionError):
        raise Unencodable("data cannot be encoded as UTF-8 JSON (lone surrogate, NaN or Infinity)",
                          [{"field": "data", "problem": "not encodable as UTF-8 JSON"}]) from None
    # The other fields are ASCII by their patterns: their JSON is their length and the punctuation.
    if max_bytes is not None:
        size += _FRAME + len(body.channel) + len(body.type) + (_ID_FRAME + len(body.id) if body.id else 0)
        if size > max_bytes:
            raise TooLarge("The message is larger than HERALD_MAX_MESSAGE_BYTES")
    return Envelope(id=body.id or idempotency_key or new_id(), channel=body.channel, type=body.type,
                    data=body.data, sender=sender, ts=now_ms())


# The bytes of the message's JSON around the fields' values.
_FRAME = len('{"channel":"","data":,"type":""}')
_ID_FRAME = len(',"id":""')


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message (MESSAGE_FIELDS) and what the pipeline knows about it.

    Frozen: a stage that learns something makes a new one (`dataclasses.replace`).
    """

    id: str
    channel: str
    type: str
    data: Any
    sender: str
    ts: int
    # Where Kafka put it and the offset of its channel's previous record (docs/design.md: "Order").
    partition: int | None = None
    offset: int | None = None
    prev: int | None = None
    origin: str | None = None  # "node/client" of the WebSocket that published it
    request_id: str | None = None
    kafka_ts: int | None = None  # the record's Kafka timestamp (ms), for the delivery latency
    # Processing state: to pass the order gate without delivery (handled before, or dead-lettered).
    skip: bool = False
    # What the rules decided for it (pipeline/rules/engine.py: Decision.record), once:
    # a message parked at its gate, or retried, keeps its decision.
    rules: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """A JSON-ready dict: the message, and whichever pipeline fields are set."""
        wire = {name: getattr(self, name) for name in MESSAGE_FIELDS}
        for name in _PIPELINE_FIELDS:
            value = getattr(self, name)
            if value is not None and value is not False:
                wire[name] = value
        return wire

    @classmethod
    def from_wire(cls, wire: object) -> Envelope:
        """The envelope `to_wire` gave (unknown keys ignored), or PermanentError saying what is wrong."""
        if not isinstance(wire, dict):
            raise PermanentError("record is not a JSON object")
        missing = [f for f in MESSAGE_FIELDS if f not in wire]
        if missing:
            raise PermanentError(f"record lacks {', '.join(missing)}")
        if not valid_channel(wire["channel"]):
            raise PermanentError("record has an invalid channel")
        if not isinstance(wire["id"], str) or not ID_RE.fullmatch(wire["id"]):
            raise PermanentError("record has an invalid id")
        return cls(**{name: wire[name] for name in _FIELDS if name in wire})

    def with_rules(self, record: dict[str, Any]) -> Envelope:
        """This envelope with `rules` set to `record`: what `dataclasses.replace` makes, in half
        its time (a worker's rules step makes one for each message, matched or not)."""
        make: Callable[..., Envelope] = Envelope  # every field positionally, which mypy cannot count
        return make(*_ALL_BUT_RULES(self), record)

    def stripped(self) -> Envelope:
        """The message alone, as Kafka records and dead letters hold it."""
        return Envelope(*(getattr(self, name) for name in MESSAGE_FIELDS))


_FIELDS = tuple(f.name for f in dataclasses.fields(Envelope))
_PIPELINE_FIELDS = tuple(name for name in _FIELDS if name not in MESSAGE_FIELDS)
# Every field before `rules`, the last one, in order (Envelope.with_rules).
_ALL_BUT_RULES: Callable[[Envelope], tuple[Any, ...]] = operator.attrgetter(*_FIELDS[:-1])


# -- Kafka record headers: what travels beside a record's value ----------------------
ORIGIN_HEADER = "herald-origin"  # the WebSocket connection that published it (`origin_of`)
REQUEST_ID_HEADER = "x-request-id"  # the request that published it, for log lines
REPLAY_HEADER = "herald-replay"  # a dead letter sent back through the pipeline
Headers = list[tuple[str, bytes]]


def to_headers(origin: str | None, request_id: str | None) -> Headers:
    """The headers of a record ingest publishes: its origin and request id, those known."""
    headers = []
    if origin:
        headers.append((ORIGIN_HEADER, origin.encode()))
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    return headers


def from_headers(headers: list[tuple[str, bytes | None]] | None) -> tuple[str | None, str | None]:
    """The (origin, request id) `to_headers` wrote in a record's headers (None for each absent)."""
    found = dict(headers or ())
    return _header_text(found.get(ORIGIN_HEADER)), _header_text(found.get(REQUEST_ID_HEADER))


def replay_headers() -> Headers:
    """The headers of a dead letter published again."""
    return [(REPLAY_HEADER, b"1")]


def dead_letter_headers(*, reason: str, partition: int, offset: int, attempts: int, failed_at: int) -> Headers:
    """The headers of a dead letter: why it died (cut to 4 KiB), where its record was, how many
    attempts it had and when (ms)."""
    return [
        ("herald-error", reason.encode()[:4096]),
        ("herald-partition", str(partition).encode()),
        ("herald-offset", str(offset).encode()),
        ("herald-attempts", str(attempts).encode()),
        ("herald-failed-at", str(failed_at).encode()),
    ]


def _header_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


# -- origins ----------------------------------------------------------------------
def origin_of(node: str, client: str) -> str:
    """A WebSocket connection's name across the cluster, `node/client`: its member in the
    connection counts, and the origin of what it publishes (its status frames go to it)."""
    return f"{node}/{client}"


def parse_origin(origin: str | None) -> tuple[str, str]:
    """The (node, client) of an `origin_of` name; ("", "") when there is none."""
    if not origin or "/" not in origin:
        return "", ""
    node, client = origin.split("/", 1)
    return node, client


def offset_spans(envelopes: Iterable[Envelope]) -> dict[int | None, list[int | None]]:
    """{partition: [first offset, last offset]} of a batch's records, for its log lines."""
    spans: dict[int | None, list[int | None]] = {}
    for envelope in envelopes:
        spans.setdefault(envelope.partition, [envelope.offset, envelope.offset])[1] = envelope.offset
    return spans


def encode(envelope: Envelope) -> bytes:
    """`envelope.to_wire()` as compact, strict UTF-8 JSON (a record value, an in-flight entry)."""
    return dumps_bytes(envelope.to_wire())


def decode(value: bytes | str | None) -> Envelope:
    """Parse what `encode` wrote back into an envelope, or raise PermanentError saying why."""
    if value is None:
        raise PermanentError("record has no value")
    try:
        wire = loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PermanentError(f"record is not JSON: {exc}") from None
    envelope = Envelope.from_wire(wire)
    # A record another producer wrote to the topic bypassed ingest: the same bounds.
    problem = data_problem(envelope.data)
    if problem is not None:
        raise PermanentError(f"record's data {problem}")
    return envelope
