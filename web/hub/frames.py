"""The WebSocket protocol of /ws as models, and its AsyncAPI 3.0 document
(served at /api/v1/asyncapi.json).

The `publish` op is the HTTP API's `Publish` model, which validates both; the
frames the hub sends are checked against these models by
tests/integration/test_ws_frames.py, so the document cannot drift from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from pipeline.core import streamids
from pipeline.core.messages import ChannelName, MessageId, Publish, no_null_default

REF = "#/components/schemas/{model}"
Ref = Field(None, json_schema_extra=no_null_default, description="echoed in the reply, to match it to its op")


class _Frame(BaseModel):
    # Strict: `"status": "yes"` is refused, not read as true.
    model_config = ConfigDict(extra="forbid", strict=True)


# -- what a client sends --------------------------------------------------
Offset = Annotated[str, Field(pattern=streamids.PATTERN)]


class Connect(_Frame):
    """The first frame, when the token is not in the URL (`?token=`)."""

    op: Literal["connect"]
    token: str
    # None stands only for "absent"; the type stays a map: a null is refused.
    since: dict[ChannelName, Offset] = Field(
        None, json_schema_extra=no_null_default,  # type: ignore[arg-type]
        description="for the token's `channels`: the `offset` of the last message seen on each, to resume "
                    "after it (at most HERALD_WS_MAX_SUBSCRIPTIONS entries; other channels are ignored)")
    ref: Any = Ref


class Subscribe(_Frame):
    """Receive a channel's messages; with `since`, first those after that offset (resume)."""

    op: Literal["subscribe"]
    channel: ChannelName
    # None stands only for "absent" (a default is not validated); the type stays `str` so that a null is refused.
    since: str = Field(None, json_schema_extra=no_null_default, pattern=streamids.PATTERN,  # type: ignore[assignment]
                       description="the `offset` of the last message seen")
    status: bool = Field(False, description="also receive `status` frames of the channel's messages")
    presence: bool = Field(False, description="also receive `join` and `leave` frames, and join the channel's "
                                              "presence; without it the subscriber is not listed")
    ref: Any = Ref


class Unsubscribe(_Frame):
    """Stop receiving a channel."""

    op: Literal["unsubscribe"]
    channel: ChannelName
    ref: Any = Ref


class PublishOp(Publish):
    """Publish a message, as POST /api/v1/messages takes it; answered with `ack` once Kafka has it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, title="PublishOp")
    op: Literal["publish"]
    ref: Any = Ref


class Ping(_Frame):
    """Answered with `pong`: a heartbeat browsers can see."""

    op: Literal["ping"]
    ref: Any = Ref


# -- what the hub sends -----------------------------------------------------
class Connected(_Frame):
    """The connection is open."""

    op: Literal["connected"]
    client: str
    user: str
    ping_interval: float


class Subscribed(_Frame):
    """A subscription is live; `replayed` history messages follow it."""

    op: Literal["subscribed"]
    channel: str
    offset: str | None = Field(description="the offset the subscription starts after")
    recovered: bool = Field(description="false when history after `since` was trimmed away: a gap")
    replayed: int
    # None stands only for "absent"; the type stays `bool`: the frame never carries a null.
    more: bool = Field(None, json_schema_extra=no_null_default,  # type: ignore[assignment]
                       description="more replay pages follow")
    by: Literal["server", "token"] = Field(
        None, json_schema_extra=no_null_default,  # type: ignore[arg-type]
        description="absent when the client asked; `server`: the server API subscribed it; `token`: one of "
                    "its token's `channels`, subscribed on connect")
    ref: Any = Ref


class Unsubscribed(_Frame):
    """A subscription ended."""

    op: Literal["unsubscribed"]
    channel: str
    by: Literal["server"] = Field(None, json_schema_extra=no_null_default,  # type: ignore[arg-type]
                                  description="absent when the client asked; `server`: the server API ended it")
    ref: Any = Ref


class MessageFrame(_Frame):
    """A message of a subscribed channel, in the channel's order (an ephemeral one as it comes)."""

    op: Literal["message"]
    channel: str
    id: MessageId
    type: str
    data: Any
    sender: str | None
    ts: int
    # None stands only for "absent"; the types stay `str` and `list[str]`: the frame never carries a null.
    offset: str = Field(None, json_schema_extra=no_null_default,  # type: ignore[assignment]
                        description="its place in the channel's history: `since` to resume after it; absent "
                                    "from an ephemeral message, which is in no history")
    tags: list[str] = Field(None, json_schema_extra=no_null_default,  # type: ignore[arg-type]
                            description="tags rules gave it")
    ephemeral: Literal[True] = Field(None, json_schema_extra=no_null_default,  # type: ignore[arg-type]
                                     description="an ephemeral message (docs/protocol.md: Ephemeral messages): "
                                                 "sent to those subscribed now, not stored, not resumable")

    @model_validator(mode="after")
    def _offset_or_ephemeral(self) -> MessageFrame:
        # A stored message has its place in history; only an ephemeral one has none.
        if (self.offset is None) == (self.ephemeral is None):
            raise ValueError("a message frame has either an offset or `ephemeral: true`")
        return self


class StatusFrame(_Frame):
    """A message's status changed (subscriptions with `status: true`)."""

    op: Literal["status"]
    channel: str
    id: str
    status: Literal["accepted", "processing", "delivered", "failed", "rejected"]


class PresenceFrame(_Frame):
    """A client joined or left a channel (subscriptions with `presence: true`)."""

    op: Literal["join", "leave"]
    channel: str
    user: str
    client: str


class Ack(_Frame):
    """Kafka acknowledged a published message (`accepted`), or an ephemeral one was sent (`sent`)."""

    op: Literal["ack"]
    id: str
    status: Literal["accepted", "sent"]
    ref: Any = Ref


class Pong(_Frame):
    """The answer to `ping`."""

    op: Literal["pong"]
    ref: Any = Ref


# Every code an `error` frame carries: a closed set, chosen by the exception's type (web/hub/protocol.py).
ErrorCode = Literal["bad_frame", "bad_channel", "invalid_message", "forbidden", "too_many_subscriptions",
                    "data_out_of_bounds", "unencodable_data", "payload_too_large", "message_too_large",
                    "unavailable"]


class ErrorFrame(_Frame):
    """An op was refused; `unavailable` is worth retrying. Close codes: docs/protocol.md."""

    op: Literal["error"]
    code: ErrorCode = Field(description="`unavailable` is an outage, worth retrying; any other is the op's fault")
    message: str
    ref: Any = Ref


CLIENT_FRAMES = (Connect, Subscribe, Unsubscribe, PublishOp, Ping)
SERVER_FRAMES = (Connected, Subscribed, Unsubscribed, MessageFrame, StatusFrame, PresenceFrame, Ack, Pong,
                 ErrorFrame)
_BY_OP = {op: model for model in SERVER_FRAMES for op in get_args(model.model_fields["op"].annotation)}


def server_frame(frame: dict) -> BaseModel:
    """Validate a frame the hub sent against its model (pydantic.ValidationError if it does not match)."""
    return _BY_OP[frame["op"]].model_validate(frame)


def document() -> dict:
    """The AsyncAPI 3.0 document of /ws."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(model, "validation") for model in CLIENT_FRAMES]
    models += [(model, "serialization") for model in SERVER_FRAMES]
    names, defs = models_json_schema(models, ref_template=REF)
    messages = {model.__name__: {"name": model.__name__, "summary": (model.__doc__ or "").strip(),
                                 "payload": names[(model, mode)]} for model, mode in models}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Herald WebSocket", "version": "1.0.0",
                 "description": "JSON text frames on /ws. Authenticate with `?token=` or a first `connect` frame "
                                "within 10 s; ops that carry `ref` are answered with the same `ref`. Send queue, "
                                "inbox and history pages are bounded (docs/protocol.md: WebSocket limits)."},
        "channels": {"ws": {"address": "/ws", "messages": {name: {"$ref": f"#/components/messages/{name}"}
                                                           for name in messages}}},
        "operations": {
            "send": {"action": "send", "channel": {"$ref": "#/channels/ws"},
                     "messages": [{"$ref": f"#/channels/ws/messages/{m.__name__}"} for m in CLIENT_FRAMES]},
            "receive": {"action": "receive", "channel": {"$ref": "#/channels/ws"},
                        "messages": [{"$ref": f"#/channels/ws/messages/{m.__name__}"} for m in SERVER_FRAMES]},
        },
        "components": {"messages": messages, "schemas": defs.get("$defs", {})},
    }
