"""The HTTP API's request and response models (web/openapi.py turns them into the document).

Request models validate; response models describe what the views return, and
schemathesis checks every answer against them in `make test`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, WithJsonSchema

from pipeline.core.ids import MAX_CLIENT_ID
from pipeline.core.messages import ChannelName, MessageId, Publish, no_null_default
from pipeline.rules.schema import json_schema
from web.hub.presence import parse_cursor
from web.openapi import REF

# A Redis stream id, as history offsets are: 'ms-seq' or 'ms'. Nineteen digits
# keep each part below 2**64, which Redis requires (pipeline.core.streamids.valid).
StreamId = Annotated[str, Field(pattern=r"^[0-9]{1,19}(-[0-9]{1,19})?$")]
STATUSES = Literal["accepted", "processing", "delivered", "failed", "rejected", "archived"]
MAX_BATCH = 1000
# A rule set as PUT /api/v1/rules takes it: JSON Schema generated from the declarations
# that validate it (pipeline/rules/schema.py); the document lists its definitions among
# its components (web/openapi.py).
RULE_SET_INPUT = json_schema(REF)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishHeaders(BaseModel):
    """Headers of a publish."""

    model_config = ConfigDict(frozen=True)

    idempotency_key: Annotated[str, Field(pattern=f"^[A-Za-z0-9_.:-]{{1,{MAX_CLIENT_ID}}}$")] | None = Field(
        None, alias="Idempotency-Key",
        description="the message's id when the body has none, scoped to the sender (docs/protocol.md: Message "
                    "ids); the same key from the same sender within HERALD_STATUS_TTL is answered with the first "
                    "answer (a body `id` that differs is a 422)")


class Batch(_Request):
    """Up to 1,000 messages in one request."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    messages: Annotated[list[Publish], Field(min_length=1, max_length=MAX_BATCH)]


class MessagePath(_Request):
    """A message's id in the path."""

    msg_id: MessageId


class MessageQuery(BaseModel):
    """Whose message an id names."""

    model_config = ConfigDict(frozen=True)

    sender: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="the sender (a token's `sub`, a message frame's `sender`) whose id this is; the caller "
                          "when absent. A minted id or a `global_id` names a message whoever sent it")


class ChannelPath(_Request):
    """A channel's name in the path."""

    channel: ChannelName


class DeadLetterPath(_Request):
    """A dead letter's id in the path."""

    letter_id: MessageId


class HistoryQuery(BaseModel):
    """Paging through a channel's history."""

    model_config = ConfigDict(frozen=True)

    since: StreamId | None = Field(None, description="the offset of the last message seen (exclusive)")
    limit: Annotated[int, Field(ge=1, le=1000, description="messages a page holds at most; a page also stops "
                                "once its messages pass HERALD_HISTORY_PAGE_BYTES (`next` continues it)")] = 100


class DeadLetterQuery(BaseModel):
    """Paging through dead letters, newest first."""

    model_config = ConfigDict(frozen=True)

    limit: Annotated[int, Field(ge=1, le=500)] = 50
    cursor: Annotated[int, Field(ge=0, lt=1 << 53, description="`next` of the previous page")] = 0


class TestMessage(Publish):
    """A message as published, and who sent it."""

    # None stands only for "absent" (a default is not validated); the type stays `str` so that a null is refused.
    sender: str = Field(None, json_schema_extra=no_null_default,  # type: ignore[assignment]
                               description="the sender `sender` conditions see; the caller when absent")


class RulesTest(_Request):
    """A message to evaluate, and optionally a rule set (else the stored one)."""

    message: TestMessage
    # None stands only for "absent"; the type stays a dict so that a null is refused.
    rules: Annotated[dict[str, Any], WithJsonSchema(RULE_SET_INPUT)] = Field(
        None, json_schema_extra=no_null_default,  # type: ignore[arg-type]
        description="a rule set, as PUT /api/v1/rules takes it")


# -- answers --------------------------------------------------------------
class Accepted(BaseModel):
    """A message Kafka acknowledged."""

    id: str = Field(description="the id as sent (frames carry it), or the one Herald minted")
    global_id: str = Field(description="the id across senders: `id` when Herald minted it, else the sender's "
                                       "scope, '.', `id` (docs/design.md: Message ids)")
    channel: str
    status: Literal["accepted"]
    partition: int
    offset: int


class Sent(BaseModel):
    """An ephemeral message sent to its channel's subscribers (docs/protocol.md: Ephemeral messages):
    nothing stored, so GET /messages/{id} does not know it."""

    id: str = Field(description="the id as sent (its frame carries it), or the one Herald minted")
    channel: str
    status: Literal["sent"]


class PublishAnswer(RootModel[Accepted | Sent]):
    """A message Kafka acknowledged, or an ephemeral one sent."""


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class BatchResults(BaseModel):
    """One result per message of a batch, in order."""

    results: list[Accepted | Sent | Problem]


class Message(BaseModel):
    """A message and what became of it."""

    id: str
    channel: str | None
    type: str | None
    data: Any
    sender: str | None
    ts: int | None
    status: STATUSES
    attempts: int
    error: str | None
    partition: int | None = None
    offset: int | None = None
    stream_id: str | None = None


class HistoryMessage(BaseModel):
    """A message of a channel's history; `offset` is its place in the history."""

    id: str
    channel: str
    type: str
    data: Any
    sender: str | None
    ts: int
    offset: str


class HistoryPage(BaseModel):
    """A page of history, oldest first."""

    messages: list[HistoryMessage]
    next: str | None = Field(description="`since` for the next page; null on the last")
    recovered: bool = Field(description="false when messages after `since` were trimmed away")


class Client(BaseModel):
    """A WebSocket client subscribed to a channel."""

    client: str
    user: str
    since: int


def _digits_below(limit: int) -> str:
    """A regex of the decimal texts (leading zeros allowed) of at most as many digits as
    `limit - 1` whose value is below `limit`."""
    top = str(limit - 1)
    branches = [f"[0-9]{{1,{len(top) - 1}}}", top]
    branches += [f"{top[:i]}[0-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}" for i, digit in enumerate(top)
                 if digit != "0"]
    return "|".join(branches)


class PresenceQuery(BaseModel):
    """Paging through a channel's presence."""

    model_config = ConfigDict(frozen=True)

    # parse_cursor checks the cursor (a Redis SCAN cursor: below 2**64) and says what is
    # wrong; the document states the same bound as a pattern.
    cursor: Annotated[str | None, Field(None, pattern=r"^[0-9]{1,20}$",
                                        description="the `next` of the page before; none for the first"),
                      AfterValidator(lambda cursor: cursor if cursor is None else str(parse_cursor(cursor))),
                      WithJsonSchema({"type": "string", "pattern": f"^(?:{_digits_below(2 ** 64)})$"})] = None


class Presence(BaseModel):
    """One page of who is subscribed to a channel now."""

    clients: list[Client]
    next: str | None = Field(description="the cursor of the next page; null after the last")


class DeadLetter(BaseModel):
    """A message the pipeline gave up on, and why."""

    id: str
    reason: str
    partition: int | None
    offset: int | None
    attempts: int | None
    failed_at: int
    channel: str | None
    message: dict[str, Any] | None
    raw: str | None


class DeadLetterPage(BaseModel):
    """Dead letters, newest first."""

    items: list[DeadLetter]
    next: int | None
    total: int


class RuleSet(BaseModel):
    """The rule set in force and its version."""

    version: int
    rules: list[dict[str, Any]]


_Pair = Annotated[list[str], Field(min_length=2, max_length=2)]  # [rule, action] or [rule, channel]


class RulesDecision(BaseModel):
    """What a rule set decides for a message."""

    version: int
    matched: list[_Pair] = Field(description="[rule, action] for each action applied, in order")
    blocked: str | None = Field(description="the rule that blocks it")
    alerts: list[str] = Field([], description="the rules that alert on it")
    routes: list[_Pair] = Field([], description="[rule, channel] for each channel it is also delivered to")
    tags: list[str] = []
    data: Any = Field(description="its data as delivered (redacted)")


class Health(BaseModel):
    """The process lives."""

    status: Literal["ok"]


class Ready(BaseModel):
    """Kafka and Redis answer."""

    status: Literal["ready"]
