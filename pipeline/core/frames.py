"""The text of the frames Herald writes into history and pub/sub (docs/protocol.md).

A `message` frame is stored without its offset, which Redis assigns when it
appends the frame to a channel's history (XADD): the store keeps the frame's
head (`message_frame_head`, ending in `"offset":"`) and closes it with the
stream id and `MESSAGE_TAIL` when it is read or published (`close_message`;
the Lua scripts are handed MESSAGE_TAIL as an argument). An ephemeral
message's frame, in no history, has no offset and is whole, as is a
`status` frame. `web/hub/frames.py` describes these frames as a schema; this writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from pipeline.core.ids import client_id
from pipeline.core.messages import MESSAGE_FIELDS, Envelope

# JSON as frames carry it: compact, UTF-8 left as it is. One encoder made
# once: json.dumps with any option makes a new one at every call.
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

OFFSET_OPEN = ',"offset":"'
MESSAGE_TAIL = '"}'
ALERT_TYPE = "rule.alert"
ALERT_SENDER = "herald"


class Emission(NamedTuple):
    """Message frames (their heads) bound for a channel's history on behalf of a message,
    written at most once for that (kind, message, channel): what a rule's effect hands
    to delivery."""

    channel: str
    kind: str  # "alerts" or "route": names the once-only marker (pipeline/store/keys.py: `effect`)
    msg_id: str  # the global id of the message whose rules produced it
    heads: list[str]


def message_frame(*, channel: str, id: str, type: str, data: Any, sender: str | None, ts: int,
                  offset: str) -> dict[str, Any]:
    """A whole `message` frame (`id` as its sender sent it)."""
    return {"op": "message", "channel": channel, "id": id, "type": type, "data": data, "sender": sender,
            "ts": ts, "offset": offset}


def message_frame_head(envelope: Envelope) -> str:
    """The `message` frame of an envelope without its offset (`close_message` adds it); its
    `id` is the id as its sender sent it (pipeline/core/ids.py)."""
    frame = {"op": "message", "channel": envelope.channel, "id": client_id(envelope.id), "type": envelope.type,
             "data": envelope.data, "sender": envelope.sender, "ts": envelope.ts}
    if envelope.rules and envelope.rules.get("tags"):
        frame["tags"] = envelope.rules["tags"]  # a rule's `tag` action
    return dumps(frame)[:-1] + OFFSET_OPEN


def ephemeral_frame(envelope: Envelope) -> str:
    """The `message` frame of an ephemeral message (docs/protocol.md: "Ephemeral messages"):
    whole at once, with `ephemeral: true` and no offset, as it is in no history."""
    return dumps({"op": "message", "channel": envelope.channel, "id": client_id(envelope.id), "type": envelope.type,
                  "data": envelope.data, "sender": envelope.sender, "ts": envelope.ts, "ephemeral": True})


def close_message(head: str, sid: str) -> str:
    """A `message` frame from its head and the stream id history gave it."""
    return head + sid + MESSAGE_TAIL


def status_frame(envelope: Envelope, status: str) -> str:
    """The `status` frame of a message (channel and id are ASCII by their patterns), with
    the id as its sender sent it."""
    return dumps({"op": "status", "channel": envelope.channel, "id": client_id(envelope.id), "status": status})


def alert_frame_heads(channel: str, envelope: Envelope, rules: Iterable[str], *, blocked_by: str | None,
                      matched: Sequence[Any], ts: int) -> list[str]:
    """The heads of the `rule.alert` messages on `channel` that rules (`rules`, each
    alerting) raise about `envelope`: each carries the rule, whether it blocked the
    message, what matched and the message itself. What every alert of the message repeats
    is encoded once."""
    message = dumps({name: getattr(envelope, name) for name in MESSAGE_FIELDS} | {"id": client_id(envelope.id)})
    head = f'{{"op":"message","channel":{dumps(channel)},"id":'
    tail = (f'"matched":{dumps(matched)},"message":{message}}},'
            f'"sender":{dumps(ALERT_SENDER)},"ts":{ts}{OFFSET_OPEN}')
    return [f'{head}{dumps(f"{envelope.id}:alert:{rule}")},"type":{dumps(ALERT_TYPE)},'
            f'"data":{{"rule":{dumps(rule)},"blocked":{"true" if blocked_by == rule else "false"},{tail}'
            for rule in rules]
