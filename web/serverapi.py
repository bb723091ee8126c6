"""The server API (admin token; docs/server-api.md): commands to the live sockets of a user on
every web process, and token revocations.

Each command is published once on the control channel (web/hub/control.py
owns its format), which every web process hears; the answer, 202, says how
many hubs received it (PUBLISH's count). A revocation is written to Redis
first, so a process that was not listening reads it when its link comes back,
and one started later reads it at start (web/revocations.py).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from flask import g
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, RootModel

from pipeline.core.messages import ChannelName
from web import api
from web.auth import MAX_JTI, MAX_USER, Identity
from web.hub import control
from web.openapi import STANDARD, Answer
from web.schemas import StreamId

log = logging.getLogger("herald.web")
blueprint = api.api_blueprint("serverapi")

User = Annotated[str, Field(min_length=1, max_length=MAX_USER, description="the user (a token's `sub`)")]
# JSON Schema's integer takes 4010.0 too; strict pydantic would not.
WholeNumber = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class UserPath(_Request):
    """A user in the path."""

    user: User


class UserChannelPath(_Request):
    """A user and a channel in the path."""

    user: User
    channel: ChannelName


class DisconnectBody(_Request):
    """How to close the user's sockets."""

    code: WholeNumber = Field(control.DISCONNECT_CODE, ge=control.CODES.start, le=control.CODES.stop - 1,
                              description="the close code, 4000-4999 (4010 by default)")
    reason: Annotated[str, AfterValidator(control.clip_reason)] = Field(
        control.DISCONNECT_REASON, max_length=control.MAX_REASON_BYTES,
        description=f"the close reason, at most {control.MAX_REASON_BYTES} characters; cut to "
                    f"{control.MAX_REASON_BYTES} bytes in UTF-8 (what a close frame carries)")


class SubscribeBody(_Request):
    """The channel to subscribe the user's sockets to."""

    channel: ChannelName
    since: StreamId | None = Field(None, description="replay the channel's history after this offset first")


class TokenRevocation(_Request):
    """One token, by its id."""

    jti: str = Field(min_length=1, max_length=MAX_JTI, description="the token's `jti`")


class UserRevocation(_Request):
    """Every token of a user issued before a time."""

    user: User
    issued_before: float | None = Field(
        None, ge=0, lt=1e11, description="seconds since the epoch (default: now); tokens of `user` whose `iat` is "
                                         "earlier are revoked. A time ahead also refuses the tokens issued until "
                                         "then. A user's cut-off only moves forward.")


class RevocationBody(RootModel[TokenRevocation | UserRevocation]):
    """A token id, or a user (with the time before which that user's tokens are revoked)."""


class Published(BaseModel):
    """The command went out to every web process listening."""

    command: str
    hubs: int = Field(description="web processes (hubs) that received the command; each applies it at once")


class Revoked(Published):
    """The revocation is stored and went out to every web process listening."""

    jti: str | None = None
    user: str | None = None
    issued_before: float | None = Field(None, description="the user's cut-off now in force")
    lapses: float | None = Field(None, description="when the token id's revocation is dropped "
                                                   "(HERALD_REVOCATION_TTL after now)")


def _answers(what: str, model: type[BaseModel] = Published) -> dict[int, Answer]:
    return {202: Answer(what, model), 503: Answer(STANDARD[503], headers=("Retry-After",))}


def publish(command: control.Command) -> int:
    """Publish a command on the control channel; returns how many hubs received it."""
    store = api.services().store
    return int(store.publish(store.keys.control_channel, control.encode(command)))


def _published(command: control.Command, **fields) -> tuple[dict, int]:
    hubs = publish(command)
    name = control.name_of(command)
    log.info("server command published", extra={
        "command": name, "hubs": hubs, "request_id": g.get("request_id"), "user": getattr(command, "user", None),
        "channel": getattr(command, "channel", None), "jti": getattr(command, "jti", None)})
    return {"command": name, "hubs": hubs, **fields}, 202


@api.contract.operation(blueprint, "POST", "/users/<user>/disconnect", summary="Close every socket of a user "
                        "(admin token)", auth="admin", path=UserPath, body=DisconnectBody,
                        body_limit=lambda settings: 4096,
                        description="Every web process closes the user's sockets with `code` (4010 by default) "
                                    "within a second. The user may connect again: to keep them out, revoke "
                                    "their tokens too (POST /api/v1/revocations).",
                        answers=_answers("Published to the web processes"), tags=("server",))
def disconnect(identity: Identity, path: UserPath, body: DisconnectBody):
    return _published(control.Disconnect(path.user, body.code, body.reason))


@api.contract.operation(blueprint, "POST", "/users/<user>/subscriptions", summary="Subscribe a user's live "
                        "sockets to a channel (admin token)", auth="admin", path=UserPath, body=SubscribeBody,
                        body_limit=lambda settings: 4096,
                        description="Each live socket of the user is subscribed as if it had asked (after `since`, "
                                    "when given), whatever its token's globs; it receives a `subscribed` frame "
                                    "with `by: server`. Sockets that connect later are not.",
                        answers=_answers("Published to the web processes"), tags=("server",))
def subscribe(identity: Identity, path: UserPath, body: SubscribeBody):
    return _published(control.Subscribe(path.user, body.channel, body.since))


@api.contract.operation(blueprint, "DELETE", "/users/<user>/subscriptions/<channel>", summary="Unsubscribe a "
                        "user's live sockets from a channel (admin token)", auth="admin", path=UserChannelPath,
                        description="Each live socket of the user subscribed to the channel receives an "
                                    "`unsubscribed` frame with `by: server`.",
                        answers=_answers("Published to the web processes"), tags=("server",))
def unsubscribe(identity: Identity, path: UserChannelPath):
    return _published(control.Unsubscribe(path.user, path.channel))


@api.contract.operation(blueprint, "POST", "/revocations", summary="Revoke a token, or a user's tokens (admin "
                        "token)", auth="admin", body=RevocationBody, body_limit=lambda settings: 4096,
                        description="`{jti}` revokes one token; `{user, issued_before?}` every token of the user "
                                    "whose `iat` is earlier (default: now). A revoked token is refused at connect "
                                    "(4001), on the HTTP API (401) and on its socket's next frame; its live "
                                    "sockets are closed 4001 within a second. A token with neither `jti` nor "
                                    "`iat` cannot be revoked.",
                        answers=_answers("Stored, and published to the web processes", Revoked), tags=("server",))
def revoke(identity: Identity, body: RevocationBody):
    revocations = api.services().revocations
    kind = body.root
    if isinstance(kind, TokenRevocation):
        lapses = revocations.record_token(kind.jti)
        return _published(control.RevokeToken(kind.jti, lapses), jti=kind.jti, lapses=lapses)
    cutoff = revocations.record_user(kind.user, kind.issued_before if kind.issued_before is not None else time.time())
    return _published(control.RevokeUser(kind.user, cutoff), user=kind.user, issued_before=cutoff)
