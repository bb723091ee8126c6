"""The webhook admin API (admin token; docs/webhooks.md): receivers, their dead letters, replay."""

from __future__ import annotations

from typing import Annotated, Any

from flask import current_app
from pydantic import BaseModel, ConfigDict, Field

from pipeline.webhooks.deadletters import MAX_IDS, ReplayFailed, UnknownReceiver, WebhookDeadLetters
from web.api import api_blueprint, contract, services
from web.auth import Identity
from web.openapi import STANDARD, Answer
from web.problems import problem

blueprint = api_blueprint("webhooks")

ReceiverName = Annotated[str, Field(pattern=r"^[0-9a-f]{12}$", description="the receiver's name (GET /webhooks)")]
LetterId = Annotated[str, Field(pattern=r"^[0-9]{1,19}-[0-9]{1,19}$")]
EventId = Annotated[str, Field(min_length=1, max_length=200)]
_UNAVAILABLE = Answer(STANDARD[503], headers=("Retry-After",))


class ReceiverPath(BaseModel):
    """A receiver's name in the path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ReceiverName


class WebhookReceiver(BaseModel):
    """A configured receiver and how it is doing."""

    name: str
    url: str
    events: list[str]
    cursor: str = Field(description="the stream id of the last event it was sent or had dead-lettered")
    lag_seconds: float = Field(description="age of the newest event minus that of the last one it was sent")
    dead_letters: int


class WebhookReceivers(BaseModel):
    """Every configured receiver."""

    receivers: list[WebhookReceiver]


class WebhookDeadLetterQuery(BaseModel):
    """Paging through a receiver's dead letters, newest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: Annotated[int, Field(ge=1, le=500)] = 50
    after: LetterId | None = Field(None, description="`next` of the previous page")


class WebhookDeadLetter(BaseModel):
    """An event a receiver did not accept in time, and why."""

    letter: str = Field(description="its place in the receiver's dead letters")
    reason: str
    failed_at: int = Field(description="milliseconds since the epoch")
    event: dict[str, Any]


class WebhookDeadLetterPage(BaseModel):
    """A receiver's dead letters, newest first."""

    items: list[WebhookDeadLetter]
    next: str | None
    total: int


class WebhookReplay(BaseModel):
    """Which dead letters to send again: the events named, or all (oldest first) without `ids`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: list[EventId] | None = Field(None, max_length=MAX_IDS, description="event ids")


class WebhookReplayed(BaseModel):
    """What a replay sent, and how many dead letters remain."""

    replayed: int
    remaining: int


def dead_letters() -> WebhookDeadLetters:
    """This web process's WebhookDeadLetters (its HTTP pool made at first use)."""
    extensions = current_app.extensions
    if "herald-webhooks" not in extensions:
        extensions["herald-webhooks"] = WebhookDeadLetters(services().store, services().settings)
    return extensions["herald-webhooks"]


@contract.operation(blueprint, "GET", "/webhooks", summary="Webhook receivers, their lag and dead letters "
                    "(admin token)", auth="admin", answers={200: Answer("The receivers", WebhookReceivers),
                                                            503: _UNAVAILABLE}, tags=("webhooks",))
def receivers(identity: Identity):
    from pipeline.webhooks.delivery import position

    store, letters = services().store, dead_letters()
    newest = store.redis.xrevrange(store.keys.events, "+", "-", count=1)
    last = position(newest[0][0])[0] if newest else 0
    out = []
    for receiver in services().settings.webhooks:
        cursor = store.webhooks.cursor(receiver.name)
        out.append({"name": receiver.name, "url": receiver.url, "events": list(receiver.events), "cursor": cursor,
                    "lag_seconds": max(0, last - position(cursor)[0]) / 1000 if position(cursor)[0] else 0,
                    "dead_letters": letters.count(receiver.name)})
    return {"receivers": out}


@contract.operation(blueprint, "GET", "/webhooks/<name>/dead-letters", summary="A receiver's dead letters, newest "
                    "first (admin token)", auth="admin", path=ReceiverPath, query=WebhookDeadLetterQuery,
                    answers={200: Answer("A page", WebhookDeadLetterPage), 404: Answer("No such receiver"),
                             503: _UNAVAILABLE}, tags=("webhooks",))
def webhook_dead_letters(identity: Identity, path: ReceiverPath, query: WebhookDeadLetterQuery):
    try:
        return dead_letters().page(path.name, query.limit, query.after)
    except UnknownReceiver as exc:
        return problem(404, str(exc), slug="unknown-receiver")


@contract.operation(blueprint, "POST", "/webhooks/<name>/dead-letters/replay", summary="Send a receiver's dead "
                    "letters to it again, with their event ids; those it accepts leave the list (admin token)",
                    auth="admin", path=ReceiverPath, body=WebhookReplay, body_limit=lambda _settings: 256 * 1024,
                    answers={200: Answer("Replayed", WebhookReplayed), 404: Answer("No such receiver"),
                             502: Answer("The receiver did not accept the replay; the events stay dead-lettered"),
                             503: _UNAVAILABLE}, tags=("webhooks",))
def webhook_replay(identity: Identity, path: ReceiverPath, body: WebhookReplay):
    try:
        return dead_letters().replay(path.name, body.ids)
    except UnknownReceiver as exc:
        return problem(404, str(exc), slug="unknown-receiver")
    except ReplayFailed as exc:
        return problem(502, str(exc), slug="replay-failed")
