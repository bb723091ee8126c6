"""A message's status hash: moved forward only (accepted, processing, then a final one),
with its `status` frames.

Each change is one Lua script (set_status.lua, accept.lua), so a task that
runs twice, or two workers racing, cannot move a status backwards. On a
single Redis the script also publishes the frame; on a cluster the frame's
pub/sub channel sits in another slot and `publish_status` sends it after.
"""

from __future__ import annotations

import json
import time
import typing
from typing import Any, NamedTuple

from pipeline.core.frames import status_frame
from pipeline.core.ids import client_id
from pipeline.core.messages import Envelope, dumps_bytes
from pipeline.core.settings import Settings
from pipeline.store.keys import ROUTE_SEPARATOR, Keys, routed
from pipeline.store.scripts import Call, Runner, Script

STATUS_RANK = {"accepted": 1, "processing": 2, "delivered": 3, "failed": 3, "rejected": 3}
# What the `accepted` status stores: no `data`, since the rules (a `redact`)
# have not run yet and GET would serve it as published; the worker stores
# the data once the rules ran (mark_processing).
ACCEPTED_FIELDS = ("channel", "type", "sender", "ts", "partition", "offset")


class StatusKeys(NamedTuple):
    message: str  # the message's hash
    status_channel: str | None = None  # its channel's status pub/sub channel: on a single Redis only


class StatusArgs(NamedTuple):
    status: str
    expires_at: int  # Unix seconds (`expires_at`)
    frame: str  # the status frame, '' for none
    origin_channel: str  # the publisher's node pub/sub channel, or ''
    origin_client: str  # the publisher's client on that node
    force: str  # '1' lets a replay restart a finished message
    fields: list[str | bytes]  # field/value pairs to store


class AcceptKeys(NamedTuple):
    messages: list[str]  # the messages' hashes


class AcceptArgs(NamedTuple):
    values: list[Any]  # per message: when its hash expires, then its ACCEPTED_FIELDS


SET_STATUS = Script("set_status.lua", StatusKeys, StatusArgs, batched=True,
                    constants={"RANK": STATUS_RANK, "SEPARATOR": ROUTE_SEPARATOR})
# One call for a batch: a call per message (or the batched set_status.lua,
# with three times the arguments) cost a batch POST's web process more CPU.
ACCEPT = Script("accept.lua", AcceptKeys, AcceptArgs, constants={"RANK": STATUS_RANK, "ACCEPTED": ACCEPTED_FIELDS})


def expires_at(settings: Settings, envelope: Envelope) -> int:
    """When a message's status, dedupe marker and idempotency answer expire (Unix seconds):
    HERALD_STATUS_TTL after it was published, all three together, so that once its id
    may be published again nothing of the earlier message is left to make the new one
    a duplicate (docs/design.md: "Message ids"). A message handled later than that (a replay)
    keeps them HERALD_STATUS_TTL from now."""
    ttl = settings.status_ttl
    now = int(time.time())
    at = int(envelope.ts) // 1000 + ttl
    return at if at > now else now + ttl


def message_fields(envelope: Envelope) -> dict[str, Any]:
    """What a message's hash stores of it (an unknown Kafka position as '')."""
    return {
        "channel": envelope.channel, "type": envelope.type, "sender": envelope.sender or "",
        "ts": str(envelope.ts), "data": dumps_bytes(envelope.data),
        "partition": _or(envelope.partition, ""), "offset": _or(envelope.offset, ""),
    }


def _or(value: int | None, default: str) -> str:
    # Lua arguments cannot be nil: an unknown position goes as `default`.
    return default if value is None else str(value)


class Statuses:
    """Messages' status hashes and their frames."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings) -> None:
        self.runner = runner
        self.keys = keys
        self.settings = settings

    def call(self, envelope: Envelope, status: str, fields: dict[str, Any] | None = None,
             origin: str | None = None, force: bool = False) -> Call:
        """The set_status.lua call that moves `envelope` to `status` (storing `fields`)."""
        flat: list[str | bytes] = []
        for name, value in (fields or {}).items():
            flat += [name, value if isinstance(value, str | bytes) else json.dumps(value)]
        frame = status_frame(envelope, status) if status != "accepted" else ""
        keys = StatusKeys(self.keys.message(envelope.id))
        node, client = "", ""
        if not self.runner.cluster:  # on a cluster the frames are published apart (publish_status)
            keys = keys._replace(status_channel=self.keys.status_channel(envelope.channel))
            node, client = self.keys.origin_route(origin)
        return SET_STATUS(keys, StatusArgs(status, expires_at(self.settings, envelope), frame, node, client,
                                           "1" if force else "0", flat))

    def set_status(self, envelope: Envelope, status: str, *, fields: dict[str, Any] | None = None,
                   origin: str | None = None, force: bool = False) -> str:
        """Move a message's status forward (never back) and push the change; returns the status now."""
        return self._apply([(envelope, status, origin, self.call(envelope, status, fields, origin, force))])[0]

    def publish_status(self, envelope: Envelope, status: str, origin: str | None, client: Any, *,
                       channel: bool = True) -> None:
        """On a cluster: publish the status frame of a change the script made (through
        `client`, a pipeline), to the channel unless `channel` is false, and to its origin."""
        # A message's status and its channel's pub/sub channel sit in different
        # slots: the frames follow the status change, not in one script with it
        # (a process that dies in between loses them; the status itself is kept).
        if status == "accepted":
            return
        frame = status_frame(envelope, status)
        if channel:
            self.runner.publish(self.keys.status_channel(envelope.channel), frame, client)
        node, target = self.keys.origin_route(origin)
        if node:
            self.runner.publish(node, routed(target, frame), client)

    def accept_calls(self, accepted: list[tuple[Envelope, int, int]]) -> list[Call]:
        """The calls that note records Kafka acknowledged, (envelope, partition, offset) each,
        as `accepted` unless a worker already moved them further: one on a single Redis."""
        if self.runner.cluster:
            # Each hash has a slot of its own: a call each, spread over the nodes.
            calls = []
            for envelope, partition, offset in accepted:
                fields = message_fields(envelope) | {"partition": str(partition), "offset": str(offset)}
                calls.append(self.call(envelope, "accepted", {name: fields[name] for name in ACCEPTED_FIELDS}))
            return calls
        keys, values = [], []
        for envelope, partition, offset in accepted:
            keys.append(self.keys.message(envelope.id))
            fields = message_fields(envelope) | {"partition": str(partition), "offset": str(offset)}
            values += [expires_at(self.settings, envelope), *(fields[name] for name in ACCEPTED_FIELDS)]
        return [ACCEPT(AcceptKeys(keys), AcceptArgs(values))]

    def mark(self, marks: list[tuple[Envelope, str, dict[str, Any]]]) -> list[str]:
        """Move each (envelope, status, fields) in one round trip, the changes' frames pushed
        to the envelope's origin too; returns each one's status now."""
        return self._apply([(envelope, status, envelope.origin, self.call(envelope, status, fields, envelope.origin))
                            for envelope, status, fields in marks])

    def _apply(self, changes: list[tuple[Envelope, str, str | None, Call]]) -> list[str]:
        # (envelope, status, origin, its call) each; on a cluster the frames follow.
        calls = [call for _envelope, _status, _origin, call in changes]
        # A single change goes as one script call, which a cluster client follows
        # through a slot's move; the batch form fails there and is retried.
        replies = [self.runner.one(calls[0])] if len(calls) == 1 else self.runner.run(calls)
        if self.runner.cluster and any(changed == "1" for _now, changed in replies):
            pipe = self.runner.client.pipeline(transaction=False)
            for (envelope, status, origin, _call), (_now, changed) in zip(changes, replies):
                if changed == "1":
                    self.publish_status(envelope, status, origin, pipe)
            pipe.execute()
        return [str(now) for now, _changed in replies]

    def get_message(self, msg_id: str) -> dict[str, Any] | None:
        """The stored message with its status (by global id), or None."""
        raw = typing.cast(dict[str, str], self.runner.client.hgetall(self.keys.message(msg_id)))
        return message_from(msg_id, raw)


def message_from(msg_id: str, raw: dict[str, str]) -> dict[str, Any] | None:
    """A message's status hash (`msg_id` is its global id) as `GET /api/v1/messages/{id}`
    answers it, or None when empty: `data` is null until a worker took it (and for good
    once a rule blocked it)."""
    if not raw:
        return None
    out: dict[str, Any] = {"id": client_id(msg_id)}
    for name in ("channel", "type", "sender", "status", "error"):
        out[name] = raw.get(name)
    if raw.get("rule"):
        out["rule"] = raw["rule"]  # the rule that blocked it (docs/guide.md: "Rules")
    for name in ("ts", "attempts", "partition", "offset"):
        out[name] = int(raw[name]) if raw.get(name, "").lstrip("-").isdigit() else None
    out["attempts"] = out["attempts"] or 0
    out["data"] = json.loads(raw["data"]) if "data" in raw else None
    out["stream_id"] = raw.get("stream_id")
    return out
