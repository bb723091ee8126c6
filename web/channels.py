"""The server API's reads of occupancy (admin token; docs/occupancy.md): the active channels
by prefix with their subscriber counts, paged, and one channel's counts without its members.

Both read the counts the hub keeps (pipeline/store/occupancy.py): a page is one
ZRANGEBYLEX of at most `limit` names and two HMGETs, a channel's counts two
hash fields, whatever the number of channels or subscribers.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from flask import Blueprint
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline.core.messages import valid_channel
from pipeline.store.occupancy import MAX_PAGE
from web.api import contract, refused, services
from web.openapi import STANDARD, Answer
from web.problems import ANSWERS
from web.schemas import ChannelPath

blueprint = Blueprint("channels", __name__, url_prefix="/api/v1")
for _kind in ANSWERS:
    blueprint.register_error_handler(_kind, refused)


def encode_cursor(channel: str) -> str:
    """The opaque cursor of a page ending at `channel`."""
    return base64.urlsafe_b64encode(channel.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The channel a cursor of `encode_cursor` ends at; ValueError for any other text."""
    try:
        channel = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("cursor must be the `next` of a page") from None
    if not valid_channel(channel):
        raise ValueError("cursor must be the `next` of a page")
    return channel


class ChannelsQuery(BaseModel):
    """Paging through the active channels by prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_:.@-]*$",
                                 description="only channels whose names start with it")] = ""
    cursor: Annotated[str | None, Field(None, max_length=268, pattern=r"^[A-Za-z0-9_-]+$",
                                        description="the `next` of the page before; none for the first"),
                      AfterValidator(lambda cursor: cursor if cursor is None else decode_cursor(cursor))] = None
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE, description="channels a page holds at most")] = 100


class ChannelOccupancy(BaseModel):
    """A channel's subscriber counts now, across every web process."""

    channel: str
    subscribers: int = Field(description="subscriptions to the channel (a socket subscribed once counts once)")
    users: int = Field(description="distinct users among them")


class ChannelsPage(BaseModel):
    """A page of the channels with subscribers, in name order."""

    channels: list[ChannelOccupancy]
    next: str | None = Field(description="the cursor of the next page; null after the last")


@contract.operation(blueprint, "GET", "/channels", summary="Channels with subscribers, by prefix (admin token)",
                    auth="admin", query=ChannelsQuery,
                    description="In name order, with each channel's subscriptions and distinct users across "
                                "every web process. `next` continues the listing; a channel that gains or "
                                "loses its subscribers meanwhile may be in it or not.",
                    answers={200: Answer("A page", ChannelsPage),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("channels",))
def channels_list(identity, query: ChannelsQuery):
    channels, last = services().store.occupancy.page(query.prefix, query.cursor, query.limit)
    return {"channels": channels, "next": encode_cursor(last) if last is not None else None}


@contract.operation(blueprint, "GET", "/channels/<channel>/occupancy",
                    summary="A channel's subscriber counts, without its members (admin token)", auth="admin",
                    path=ChannelPath,
                    answers={200: Answer("The counts (0 for a channel nobody is subscribed to)", ChannelOccupancy),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("channels",))
def channel_occupancy(identity, path: ChannelPath):
    subscribers, users = services().store.occupancy.counts(path.channel)
    return {"channel": path.channel, "subscribers": subscribers, "users": users}
